"""The config contract: ``natfail.toml`` → the frozen model of
:mod:`natfail.core.model`.

All validation lives here, so the daemon, ``natfailctl check-config`` and
``natfailctl reload`` accept and refuse exactly the same files. Every problem
is a :class:`Problem` value naming the file, the key path
(``service[0].backend[1].address``) and, where it can be found, the line;
``str()`` of it, or of the :class:`ConfigError` that carries it, is one line.

The parts: :mod:`~natfail.config.reader` (files and TOML in, the model out),
:mod:`~natfail.config.schema` (the tables, keys and rules),
:mod:`~natfail.config.tables` (typed getters for one table),
:mod:`~natfail.config.lines` (line numbers for messages),
:mod:`~natfail.config.keys` (WireGuard key text and key files),
:mod:`~natfail.config.files` (the bounded reader every file goes through),
:mod:`~natfail.config.checks` (the files the daemon will need) and
:mod:`~natfail.config.problems` (the problem values).
"""

from __future__ import annotations

from natfail.config.checks import check_files, warnings
from natfail.config.keys import (
    KEY_FILE_LIMIT,
    KEY_LEN,
    KeyFileError,
    create_key_file,
    decode_key,
    encode_key,
    generate_key,
    load_key_file,
)
from natfail.config.problems import ConfigError, Problem
from natfail.config.reader import (
    DEFAULT_PATH,
    from_mapping,
    load,
    parse,
    read_config_file,
    read_raw,
)

# The known keys of each table, for the tests that walk every one of them.
from natfail.config.schema import _BACKEND_KEYS as _BACKEND_KEYS
from natfail.config.schema import _DAEMON_KEYS as _DAEMON_KEYS
from natfail.config.schema import _PROBE_KEYS as _PROBE_KEYS
from natfail.config.schema import _ROOT_KEYS as _ROOT_KEYS
from natfail.config.schema import _SERVICE_KEYS as _SERVICE_KEYS
from natfail.config.schema import (
    DEFAULT_DAEMON,
    DEFAULT_FAILBACK,
    DEFAULT_PREEMPT_DELAY,
    DEFAULT_PROBE,
    DEFAULT_SOURCE_NAT,
    FIREWALLS,
    IFNAMSIZ,
    NAME_MAX,
    PRIORITY_MAX,
    PRIORITY_MIN,
    SOURCE_NATS,
    parse_listen,
)
from natfail.core.model import (
    Backend,
    Config,
    DaemonSettings,
    Endpoint,
    Firewall,
    ProbeSettings,
    Service,
    SourceNat,
)
from natfail.core.selector import FAILBACKS, Failback
from natfail.locations import CONFIG_FILE_LIMIT, UNIX_PATH_MAX

__all__ = [
    "CONFIG_FILE_LIMIT",
    "DEFAULT_DAEMON",
    "DEFAULT_FAILBACK",
    "DEFAULT_PATH",
    "DEFAULT_PREEMPT_DELAY",
    "DEFAULT_PROBE",
    "DEFAULT_SOURCE_NAT",
    "FAILBACKS",
    "FIREWALLS",
    "IFNAMSIZ",
    "KEY_FILE_LIMIT",
    "KEY_LEN",
    "NAME_MAX",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "SOURCE_NATS",
    "UNIX_PATH_MAX",
    "Backend",
    "Config",
    "ConfigError",
    "DaemonSettings",
    "Endpoint",
    "Failback",
    "Firewall",
    "KeyFileError",
    "ProbeSettings",
    "Problem",
    "Service",
    "SourceNat",
    "check_files",
    "create_key_file",
    "decode_key",
    "encode_key",
    "from_mapping",
    "generate_key",
    "load",
    "load_key_file",
    "parse",
    "parse_listen",
    "read_config_file",
    "read_raw",
    "warnings",
]
