"""The config contract (natfail/config.py): parsing, defaults, one broken
config per validation rule, check_files, and fuzzing that only ConfigError
ever escapes."""

from __future__ import annotations

import base64
import errno
import ipaddress
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from natfail import config as cfg
from natfail.config import (
    Backend,
    Config,
    ConfigError,
    DaemonSettings,
    Endpoint,
    ProbeSettings,
    check_files,
    load,
    load_key_file,
    parse,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "etc" / "natfail.toml"

KEY_BYTES = bytes(range(32))
KEY = base64.b64encode(KEY_BYTES).decode()
SHORT_KEY = base64.b64encode(b"0123456789abcdef").decode()  # 16 bytes

# Two services; every line a case below replaces is unique in this text.
BASE = f"""\
[daemon]
firewall = "nftables"
socket = "/run/natfail/natfail.sock"
state_dir = "/var/lib/natfail"
metrics_listen = ""

[probe]
private_key_file = "/etc/natfail/probe.key"
interval = 1.0
timeout = 0.5
rise = 2
fall = 3

[[service]]
name = "wg0"
public = "203.0.113.10:51820"
inbound_interface = "eth0"
server_public_key = "{KEY}"
preshared_key_file = ""
failback = "sticky"
preempt_delay = 30.0
source_nat = "preserve"
notify = ""

[service.probe]
rise = 1

[[service.backend]]
name = "a"
address = "10.0.0.2:51820"
priority = 100

[[service.backend]]
name = "b"
address = "10.0.0.3:51820"
priority = 50

[[service]]
name = "wg1"
public = "203.0.113.10:51821"
server_public_key = "{KEY}"

[[service.backend]]
name = "a"
address = "10.0.1.2:51820"
priority = 1
"""

MINIMAL = f"""\
[[service]]
name = "wg0"
public = "203.0.113.10:51820"
server_public_key = "{KEY}"

[[service.backend]]
name = "a"
address = "10.0.0.2:51820"
priority = 100
"""

MARK = "# <-"  # marks the line an error must point at


def mutate(old: str, new: str) -> str:
    assert BASE.count(old) == 1, f"{old!r} must occur exactly once in BASE"
    return BASE.replace(old, new)


@dataclass(frozen=True)
class Broken:
    id: str
    doc: str
    key: str  # exact key path; "" for file-level errors
    fragment: str  # part of the message


def case(id: str, old: str, new: str, key: str, fragment: str) -> Any:
    return pytest.param(Broken(id, mutate(old, new), key, fragment), id=id)


def whole(id: str, doc: str, key: str, fragment: str) -> Any:
    return pytest.param(Broken(id, doc, key, fragment), id=id)


S0 = 'name = "wg0"'
S1 = 'name = "wg1"'
B0 = 'name = "a"\naddress = "10.0.0.2:51820"'
B1_NAME = 'name = "b"'
B1_ADDR = 'address = "10.0.0.3:51820"'
PUB0 = 'public = "203.0.113.10:51820"'
PUB1 = 'public = "203.0.113.10:51821"'
BNAME1 = "service[0].backend[1].name"

BROKEN = [
    # unknown keys, with and without a suggestion
    case(
        "unknown-top",
        "[daemon]\nfirewall",
        f"deamon = 1 {MARK}\n[daemon]\nfirewall",
        "deamon",
        "unknown key 'deamon' (did you mean 'daemon'?)",
    ),
    case(
        "unknown-top-services",
        "[daemon]\nfirewall",
        f"services = [] {MARK}\n[daemon]\nfirewall",
        "services",
        "(did you mean 'service'?)",
    ),
    case(
        "unknown-daemon",
        'firewall = "nftables"',
        f'firewal = "nftables" {MARK}',
        "daemon.firewal",
        "unknown key 'firewal' (did you mean 'firewall'?)",
    ),
    case(
        "unknown-daemon-no-match",
        'metrics_listen = ""',
        f'metrics_listen = ""\nzzz = 1 {MARK}',
        "daemon.zzz",
        "unknown key 'zzz' (known keys: firewall, socket, state_dir",
    ),
    case(
        "unknown-probe",
        "interval = 1.0",
        f"intervall = 1.0 {MARK}",
        "probe.intervall",
        "unknown key 'intervall' (did you mean 'interval'?)",
    ),
    case(
        "unknown-service",
        'failback = "sticky"',
        f'fallback = "sticky" {MARK}',
        "service[0].fallback",
        "(did you mean 'failback'?)",
    ),
    case(
        "unknown-service-probe",
        "rise = 1",
        f"rice = 1 {MARK}",
        "service[0].probe.rice",
        "(did you mean 'rise'?)",
    ),
    case(
        "unknown-backend",
        "priority = 50",
        f"priorty = 50 {MARK}",
        "service[0].backend[1].priorty",
        "(did you mean 'priority'?)",
    ),
    case(
        "unknown-backend-2nd-service",
        "priority = 1\n",
        f"prioity = 1 {MARK}\n",
        "service[1].backend[0].prioity",
        "(did you mean 'priority'?)",
    ),
    case(
        "unknown-quoted-key",
        "priority = 50",
        f'"prio rity" = 50 {MARK}',
        'service[0].backend[1]."prio rity"',
        "unknown key 'prio rity'",
    ),
    # wrong types
    case(
        "type-firewall",
        'firewall = "nftables"',
        f"firewall = 1 {MARK}",
        "daemon.firewall",
        "must be a string, not an integer",
    ),
    case(
        "type-socket",
        'socket = "/run/natfail/natfail.sock"',
        f"socket = [] {MARK}",
        "daemon.socket",
        "must be a string (a path), not an array",
    ),
    case(
        "type-interval-str",
        "interval = 1.0",
        f'interval = "1s" {MARK}',
        "probe.interval",
        "must be a number of seconds, not a string",
    ),
    case(
        "type-rise-float",
        "rise = 2",
        f"rise = 2.0 {MARK}",
        "probe.rise",
        "must be an integer, not a float",
    ),
    case(
        "type-public",
        PUB0,
        f"public = 51820 {MARK}",
        "service[0].public",
        "must be a string, not an integer",
    ),
    case(
        "type-key",
        f'server_public_key = "{KEY}"\npreshared',
        f"server_public_key = 1 {MARK}\npreshared",
        "service[0].server_public_key",
        "must be a string, not an integer",
    ),
    case(
        "type-name", S1, f"name = 1 {MARK}", "service[1].name", "must be a string, not an integer"
    ),
    case(
        "type-service-probe",
        PUB1,
        f"{PUB1}\nprobe = 3 {MARK}",
        "service[1].probe",
        "must be a table, not an integer",
    ),
    case(
        "type-date",
        "timeout = 0.5",
        f"timeout = 1979-05-27 {MARK}",
        "probe.timeout",
        "not a date/time",
    ),
    whole(
        "type-daemon-not-table",
        f'daemon = "nftables" {MARK}\n' + MINIMAL,
        "daemon",
        "must be a table, not a string",
    ),
    whole(
        "type-service-single-table",
        f'[service] {MARK}\nname = "wg0"\n',
        "service",
        "must be an array of tables ([[service]]), not a table",
    ),
    whole(
        "type-backend-single-table",
        MINIMAL.replace("[[service.backend]]", f"[service.backend] {MARK}"),
        "service[0].backend",
        "must be an array of tables ([[service.backend]])",
    ),
    whole(
        "type-backend-item",
        MINIMAL.split("[[service.backend]]")[0] + f'backend = ["a"] {MARK}\n',
        "service[0].backend[0]",
        "must be a table, not a string",
    ),
    # bool is not an int / not a duration
    case("bool-fall", "fall = 3", f"fall = true {MARK}", "probe.fall", "not a boolean"),
    case(
        "bool-priority",
        "priority = 100",
        f"priority = true {MARK}",
        "service[0].backend[0].priority",
        "must be an integer, not a boolean",
    ),
    case(
        "bool-preempt-delay",
        "preempt_delay = 30.0",
        f"preempt_delay = false {MARK}",
        "service[0].preempt_delay",
        "must be a number of seconds, not a boolean",
    ),
    # ranges
    case(
        "range-interval-0",
        "interval = 1.0",
        f"interval = 0 {MARK}",
        "probe.interval",
        "must be > 0",
    ),
    case(
        "range-interval-neg",
        "interval = 1.0",
        f"interval = -1.5 {MARK}",
        "probe.interval",
        "must be > 0, got -1.5",
    ),
    case(
        "range-interval-inf", "interval = 1.0", f"interval = inf {MARK}", "probe.interval", "finite"
    ),
    case(
        "range-interval-nan", "interval = 1.0", f"interval = nan {MARK}", "probe.interval", "finite"
    ),
    case(
        "range-timeout-0", "timeout = 0.5", f"timeout = 0.0 {MARK}", "probe.timeout", "must be > 0"
    ),
    case(
        "range-preempt-delay",
        "preempt_delay = 30.0",
        f"preempt_delay = -1 {MARK}",
        "service[0].preempt_delay",
        "must be >= 0",
    ),
    case("range-rise", "rise = 2", f"rise = 0 {MARK}", "probe.rise", "must be >= 1, got 0"),
    case("range-fall", "fall = 3", f"fall = -3 {MARK}", "probe.fall", "must be >= 1"),
    case(
        "range-service-probe-rise",
        "rise = 1",
        f"rise = 0 {MARK}",
        "service[0].probe.rise",
        "must be >= 1",
    ),
    case(
        "range-service-probe-interval",
        "rise = 1",
        f"rise = 1\ninterval = -2 {MARK}",
        "service[0].probe.interval",
        "must be > 0",
    ),
    case(
        "range-priority-high",
        "priority = 50",
        f"priority = 2147483648 {MARK}",
        "service[0].backend[1].priority",
        "between -2147483648 and 2147483647",
    ),
    case(
        "range-priority-low",
        "priority = 50",
        f"priority = -2147483649 {MARK}",
        "service[0].backend[1].priority",
        "between",
    ),
    # names
    case("name-empty", S0, f'name = "" {MARK}', "service[0].name", "not a valid name"),
    case("name-space", S0, f'name = "wg 0" {MARK}', "service[0].name", "not a valid name"),
    case("name-too-long", S0, f'name = "{"x" * 33}" {MARK}', "service[0].name", "1 to 32"),
    case("name-dotdot", B1_NAME, f'name = ".." {MARK}', BNAME1, "not a valid"),
    case("name-dash", B1_NAME, f'name = "-b" {MARK}', BNAME1, "not a valid"),
    case("name-slash", B1_NAME, f'name = "a/b" {MARK}', BNAME1, "not a valid"),
    # inbound_interface
    case(
        "ifname-slash",
        'inbound_interface = "eth0"',
        f'inbound_interface = "eth0/1" {MARK}',
        "service[0].inbound_interface",
        "not a valid interface name",
    ),
    case(
        "ifname-colon",
        'inbound_interface = "eth0"',
        f'inbound_interface = "eth0:1" {MARK}',
        "service[0].inbound_interface",
        "not a valid interface name",
    ),
    case(
        "ifname-space",
        'inbound_interface = "eth0"',
        f'inbound_interface = "eth 0" {MARK}',
        "service[0].inbound_interface",
        "not a valid interface name",
    ),
    case(
        "ifname-long",
        'inbound_interface = "eth0"',
        f'inbound_interface = "{"e" * 16}" {MARK}',
        "service[0].inbound_interface",
        "1 to 15 bytes",
    ),
    case(
        "ifname-type",
        'inbound_interface = "eth0"',
        f"inbound_interface = 0 {MARK}",
        "service[0].inbound_interface",
        "must be a string",
    ),
    # addresses
    case(
        "addr-hostname",
        PUB0,
        f'public = "vpn.example.com:51820" {MARK}',
        "service[0].public",
        "is a hostname; give an IP address",
    ),
    case(
        "addr-missing-port",
        PUB0,
        f'public = "203.0.113.10" {MARK}',
        "service[0].public",
        "missing ':port'",
    ),
    case(
        "addr-port-0",
        B1_ADDR,
        f'address = "10.0.0.3:0" {MARK}',
        "service[0].backend[1].address",
        "port must be a number from 1 to 65535",
    ),
    case(
        "addr-port-70000",
        B1_ADDR,
        f'address = "10.0.0.3:70000" {MARK}',
        "service[0].backend[1].address",
        "1 to 65535",
    ),
    case(
        "addr-port-text",
        B1_ADDR,
        f'address = "10.0.0.3:wg" {MARK}',
        "service[0].backend[1].address",
        "1 to 65535",
    ),
    case(
        "addr-v6-no-brackets",
        PUB0,
        f'public = "2001:db8::1:51820" {MARK}',
        "service[0].public",
        "IPv6 address needs brackets",
    ),
    case(
        "addr-v6-missing-port",
        PUB0,
        f'public = "[2001:db8::1]" {MARK}',
        "service[0].public",
        "missing ':port'",
    ),
    case(
        "addr-v6-bad",
        PUB0,
        f'public = "[2001:db8::x]:51820" {MARK}',
        "service[0].public",
        "is not an IPv6 address",
    ),
    case(
        "addr-v4-in-brackets",
        PUB0,
        f'public = "[203.0.113.10]:51820" {MARK}',
        "service[0].public",
        "is not an IPv6 address",
    ),
    case(
        "addr-v4-bad",
        B1_ADDR,
        f'address = "10.0.0.300:51820" {MARK}',
        "service[0].backend[1].address",
        "is not an IPv4 address",
    ),
    case(
        "addr-scope-id",
        PUB0,
        f'public = "[fe80::1%eth0]:51820" {MARK}',
        "service[0].public",
        "scope id",
    ),
    case(
        "addr-unspecified",
        B1_ADDR,
        f'address = "0.0.0.0:51820" {MARK}',
        "service[0].backend[1].address",
        "must be a unicast address",
    ),
    case(
        "addr-multicast",
        PUB0,
        f'public = "224.0.0.1:51820" {MARK}',
        "service[0].public",
        "must be a unicast address",
    ),
    case(
        "metrics-no-port",
        'metrics_listen = ""',
        f'metrics_listen = "localhost" {MARK}',
        "daemon.metrics_listen",
        "missing ':port'",
    ),
    case(
        "metrics-v6-no-brackets",
        'metrics_listen = ""',
        f'metrics_listen = "::1:9585" {MARK}',
        "daemon.metrics_listen",
        "needs brackets",
    ),
    case(
        "metrics-port-0",
        'metrics_listen = ""',
        f'metrics_listen = "127.0.0.1:0" {MARK}',
        "daemon.metrics_listen",
        "1 to 65535",
    ),
    case(
        "metrics-bad-host",
        'metrics_listen = ""',
        f'metrics_listen = "a b:9585" {MARK}',
        "daemon.metrics_listen",
        "not an IPv4 address or hostname",
    ),
    # keys
    case(
        "key-bad-base64",
        f'server_public_key = "{KEY}"\npreshared',
        f'server_public_key = "not base64!!" {MARK}\npreshared',
        "service[0].server_public_key",
        "is not valid base64",
    ),
    case(
        "key-wrong-length",
        f'server_public_key = "{KEY}"\npreshared',
        f'server_public_key = "{SHORT_KEY}" {MARK}\npreshared',
        "service[0].server_public_key",
        "decodes to 16 bytes; a WireGuard key is 32 bytes",
    ),
    case(
        "key-missing",
        f'{S1}\n{PUB1}\nserver_public_key = "{KEY}"\n',
        f"{S1}\n{PUB1}\n",
        "service[1].server_public_key",
        "missing (required)",
    ),
    # uniqueness
    case(
        "dup-service-name",
        S1,
        f'name = "wg0" {MARK}',
        "service[1].name",
        "duplicate service name 'wg0'",
    ),
    case(
        "dup-public",
        PUB1,
        f'public = "203.0.113.10:51820" {MARK}',
        "service[1].public",
        "203.0.113.10:51820 is already the public endpoint of 'wg0'",
    ),
    case(
        "dup-backend-name",
        B1_NAME,
        f'name = "a" {MARK}',
        "service[0].backend[1].name",
        "duplicate backend name 'a'",
    ),
    case(
        "dup-backend-address",
        B1_ADDR,
        f'address = "10.0.0.2:51820" {MARK}',
        "service[0].backend[1].address",
        "10.0.0.2:51820 is already the address of 'a'",
    ),
    # enumerations
    case(
        "enum-firewall",
        'firewall = "nftables"',
        f'firewall = "pf" {MARK}',
        "daemon.firewall",
        "must be one of 'nftables', 'iptables', got 'pf'",
    ),
    case(
        "enum-failback",
        'failback = "sticky"',
        f'failback = "never" {MARK}',
        "service[0].failback",
        "must be one of 'sticky', 'preempt'",
    ),
    case(
        "enum-source-nat",
        'source_nat = "preserve"',
        f'source_nat = "snat" {MARK}',
        "service[0].source_nat",
        "must be one of 'preserve', 'masquerade'",
    ),
    # family mismatch
    case(
        "family-v6-backend",
        B1_ADDR,
        f'address = "[2001:db8::3]:51820" {MARK}',
        "service[0].backend[1].address",
        "DNAT cannot change the address family",
    ),
    whole(
        "family-v4-backend",
        mutate(PUB1, 'public = "[2001:db8::1]:51821"').replace(
            'address = "10.0.1.2:51820"', f'address = "10.0.1.2:51820" {MARK}'
        ),
        "service[1].backend[0].address",
        "is IPv4 but the public endpoint",
    ),
    # paths
    case(
        "path-empty-socket",
        'socket = "/run/natfail/natfail.sock"',
        f'socket = "" {MARK}',
        "daemon.socket",
        "must not be empty",
    ),
    case(
        "path-socket-too-long",
        'socket = "/run/natfail/natfail.sock"',
        f'socket = "/{"s" * 120}" {MARK}',
        "daemon.socket",
        "at most 107 bytes",
    ),
    case("path-nul", 'notify = ""', f'notify = "/bin/x\\u0000" {MARK}', "service[0].notify", "NUL"),
    # structure and required keys
    whole("no-service", "[daemon]\n", "service", "at least one [[service]] is required"),
    whole("empty-service-array", f"service = [] {MARK}\n", "service", "at least one [[service]]"),
    whole(
        "service-without-backends",
        f"[[service]] {MARK}\n" + MINIMAL.split("\n", 1)[1].split("[[service.backend]]")[0],
        "service[0].backend",
        "at least one [[service.backend]] is required",
    ),
    case(
        "missing-priority",
        "priority = 50\n",
        "",
        "service[0].backend[1].priority",
        "missing (required)",
    ),
    case("missing-public", f"{S1}\n{PUB1}\n", f"{S1}\n", "service[1].public", "missing (required)"),
    # TOML syntax
    case(
        "syntax",
        "rise = 2",
        f"rise = = 2 {MARK}",
        "",
        "TOML syntax error at column 8: Invalid value",
    ),
    case(
        "syntax-duplicate-key",
        "interval = 1.0",
        f"interval = 1.0\ninterval = 2.0 {MARK}",
        "",
        "TOML syntax error",
    ),
]

# Lines the error should point at, where the mark alone cannot say so.
LINE_AT_TABLE = {
    # a missing key is reported at the header of its table
    "missing-priority": "[[service.backend]]",  # the second one: see test
    "key-missing": "[[service]]",
    "missing-public": "[[service]]",
}


def expected_line(broken: Broken) -> int | None:
    lines = broken.doc.split("\n")
    if broken.id in LINE_AT_TABLE:
        header = LINE_AT_TABLE[broken.id]
        hits = [n for n, text in enumerate(lines, start=1) if text.strip() == header]
        # missing-priority: the 2nd [[service.backend]]; the others: the 2nd [[service]]
        return hits[1]
    marked = [n for n, text in enumerate(lines, start=1) if MARK in text]
    assert len(marked) <= 1
    return marked[0] if marked else None


@pytest.mark.parametrize("broken", BROKEN)
def test_broken_config(broken: Broken, tmp_path: Path) -> None:
    path = tmp_path / "natfail.toml"
    path.write_text(broken.doc)
    with pytest.raises(ConfigError) as info:
        load(path)
    err = info.value
    text = str(err)
    assert "\n" not in text and len(text.splitlines()) == 1
    line = expected_line(broken)
    assert err.key == broken.key
    assert err.line == line, text
    prefix = f"{path}: {broken.key}: " if broken.key else f"{path}: "
    assert text.startswith(prefix), text
    assert broken.fragment in text
    if line is None:
        assert "(line" not in text
    else:
        assert text.endswith(f" (line {line})")


def test_no_key_material_in_messages(tmp_path: Path) -> None:
    path = tmp_path / "natfail.toml"
    path.write_text(
        BASE.replace(
            f'server_public_key = "{KEY}"\npreshared',
            f'server_public_key = "{SHORT_KEY}"\npreshared',
        )
    )
    with pytest.raises(ConfigError) as info:
        load(path)
    assert SHORT_KEY not in str(info.value)


def test_every_rule_has_a_case() -> None:
    ids = {p.values[0].id for p in BROKEN}
    assert len(ids) == len(BROKEN), "case ids must be unique"
    for prefix in (
        "unknown-",
        "type-",
        "bool-",
        "range-",
        "name-",
        "ifname-",
        "addr-",
        "key-",
        "dup-",
        "enum-",
        "family-",
        "metrics-",
        "path-",
        "syntax",
    ):
        assert any(i.startswith(prefix) for i in ids), prefix


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: cannot read the config file: No such file or directory"


def test_directory_and_bad_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load(tmp_path)
    path = tmp_path / "natfail.toml"
    path.write_bytes(b'[daemon]\nfirewall = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value) == f"{path}: is not valid UTF-8 (line 2)"


def test_syntax_error_at_end_of_file() -> None:
    with pytest.raises(ConfigError) as info:
        parse("[probe]\nrise =\n", Path("x.toml"))
    assert str(info.value).startswith("x.toml: TOML syntax error")
    assert info.value.line == 2


def test_syntax_error_deep_nesting_and_huge_integer() -> None:
    for text in ["a = " + "[" * 5000, "a = " + "9" * 5000]:
        with pytest.raises(ConfigError) as info:
            parse(text, Path("x.toml"))
        assert len(str(info.value).splitlines()) == 1


# --------------------------------------------------------------------------
# what parses


def test_example_file_loads() -> None:
    conf = load(EXAMPLE)
    assert conf.path == EXAMPLE
    assert conf.daemon == DaemonSettings()
    assert conf.probe == ProbeSettings()
    (service,) = conf.services
    assert service.name == "wg0"
    assert [b.name for b in service.backends] == ["a", "b"]
    assert service.probe == conf.probe
    assert service.inbound_interface is None


def test_example_file_shows_every_key() -> None:
    text = EXAMPLE.read_text()
    for key in cfg._DAEMON_KEYS + cfg._PROBE_KEYS + cfg._SERVICE_KEYS + cfg._BACKEND_KEYS:
        if key not in ("probe", "backend"):
            assert f"\n{key} = " in text, key
    assert "\n# [service.probe]\n" in text
    # the commented-out override is valid once uncommented
    uncommented = text.replace("# [service.probe]", "[service.probe]")
    for key in cfg._PROBE_KEYS:
        uncommented = uncommented.replace(f"# {key} = ", f"{key} = ")
    assert parse(uncommented, EXAMPLE).services[0].probe == ProbeSettings()


def test_example_file_only_misses_the_probe_key() -> None:
    problems = [str(p) for p in check_files(load(EXAMPLE))]
    assert all("probe.private_key_file" in p for p in problems)
    assert len(problems) <= 1


def test_defaults_match_design() -> None:
    conf = parse(MINIMAL, Path("/etc/natfail/natfail.toml"))
    assert conf.daemon == DaemonSettings(
        firewall="nftables",
        socket=Path("/run/natfail/natfail.sock"),
        state_dir=Path("/var/lib/natfail"),
        metrics_listen="",
    )
    assert conf.probe == ProbeSettings(
        private_key_file=Path("/etc/natfail/probe.key"), interval=1.0, timeout=0.5, rise=2, fall=3
    )
    (service,) = conf.services
    assert service.inbound_interface is None
    assert service.preshared_key_file is None
    assert service.failback == "sticky"
    assert service.preempt_delay == 30.0
    assert service.source_nat == "preserve"
    assert service.notify is None
    assert service.probe == conf.probe
    assert service.server_public_key == KEY_BYTES
    assert service.backends == (Backend("a", Endpoint.parse("10.0.0.2:51820"), 100),)


def test_base_document() -> None:
    conf = parse(BASE, Path("/etc/natfail/natfail.toml"))
    assert isinstance(conf, Config)
    assert [s.name for s in conf.services] == ["wg0", "wg1"]
    wg0 = conf.service("wg0")
    assert wg0 is not None and wg0.inbound_interface == "eth0"
    assert conf.service("nope") is None
    b = wg0.backend("b")
    assert b is not None and b.priority == 50 and str(b.address) == "10.0.0.3:51820"
    assert wg0.backend("c") is None
    # the same backend name in two services is fine
    wg1 = conf.service("wg1")
    assert wg1 is not None and wg1.backend("a") is not None


def test_service_probe_overrides_a_subset() -> None:
    doc = mutate("rise = 1", 'rise = 1\ninterval = 2\nprivate_key_file = "keys/wg0.key"')
    conf = parse(doc, Path("/etc/natfail/natfail.toml"))
    wg0, wg1 = conf.services
    assert wg0.probe == ProbeSettings(
        private_key_file=Path("/etc/natfail/keys/wg0.key"),
        interval=2.0,
        timeout=0.5,
        rise=1,
        fall=3,
    )
    assert isinstance(wg0.probe.interval, float)
    assert wg1.probe == conf.probe


def test_accepted_edge_values() -> None:
    doc = (
        mutate("preempt_delay = 30.0", "preempt_delay = 0")
        .replace('name = "wg1"', f'name = "{"W" * 32}"')
        .replace('inbound_interface = "eth0"', f'inbound_interface = "{"e" * 15}"')
        .replace('metrics_listen = ""', 'metrics_listen = "localhost:9585"')
        .replace('failback = "sticky"', 'failback = "preempt"')
        .replace('source_nat = "preserve"', 'source_nat = "masquerade"')
        .replace('firewall = "nftables"', 'firewall = "iptables"')
        .replace("priority = 50", "priority = -2147483648")
        .replace("priority = 100", "priority = 2147483647")
        .replace("interval = 1.0", "interval = 5")
    )
    conf = parse(doc, Path("/etc/natfail/natfail.toml"))
    assert conf.services[0].preempt_delay == 0.0
    assert conf.services[0].failback == "preempt"
    assert conf.services[0].source_nat == "masquerade"
    assert conf.daemon.firewall == "iptables"
    assert conf.daemon.metrics_listen == "localhost:9585"
    assert conf.probe.interval == 5.0 and isinstance(conf.probe.interval, float)


def test_ipv6_service() -> None:
    doc = MINIMAL.replace("203.0.113.10:51820", "[2001:db8::1]:51820").replace(
        "10.0.0.2:51820", "[2001:db8::2]:51820"
    )
    conf = parse(doc, Path("x.toml"))
    assert conf.services[0].public.family == 6
    assert conf.services[0].backends[0].address.family == 6


def test_relative_paths_follow_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "natfail.toml"
    path.write_text(
        '[daemon]\nsocket = "run/s.sock"\nstate_dir = "state"\n'
        '[probe]\nprivate_key_file = "probe.key"\n'
        + MINIMAL.replace(
            "server_public_key", 'notify = "hook.sh"\npreshared_key_file = "psk"\nserver_public_key'
        )
    )
    conf = load(path)
    assert conf.daemon.socket == tmp_path / "run/s.sock"
    assert conf.daemon.state_dir == tmp_path / "state"
    assert conf.probe.private_key_file == tmp_path / "probe.key"
    assert conf.services[0].notify == tmp_path / "hook.sh"
    assert conf.services[0].preshared_key_file == tmp_path / "psk"


def test_config_error_str_format() -> None:
    assert str(ConfigError("f.toml", "probe.rise", "bad", 3)) == "f.toml: probe.rise: bad (line 3)"
    assert str(ConfigError("f.toml", "", "bad")) == "f.toml: bad"
    assert str(ConfigError("f\n.toml", "a", "x\ny")) == "f\\n.toml: a: x\\ny"


# --------------------------------------------------------------------------
# Endpoint


@pytest.mark.parametrize(
    ("text", "family", "shown"),
    [
        ("1.2.3.4:51820", 4, "1.2.3.4:51820"),
        ("10.0.0.2:1", 4, "10.0.0.2:1"),
        ("[2001:db8::1]:51820", 6, "[2001:db8::1]:51820"),
        ("[2001:0db8:0:0::1]:65535", 6, "[2001:db8::1]:65535"),
        ("[::ffff:10.0.0.1]:51820", 6, "[::ffff:a00:1]:51820"),
    ],
)
def test_endpoint_parse(text: str, family: int, shown: str) -> None:
    ep = Endpoint.parse(text)
    assert ep.family == family
    assert str(ep) == shown
    assert Endpoint.parse(str(ep)) == ep
    assert ep.sockaddr() == (str(ep.ip), ep.port)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("example.com:51820", "hostname"),
        ("localhost:51820", "hostname"),
        ("1.2.3.4", "missing ':port'"),
        ("1.2.3.4:0", "1 to 65535"),
        ("1.2.3.4:70000", "1 to 65535"),
        ("1.2.3.4:+5", "1 to 65535"),
        ("1.2.3.4: 5", "1 to 65535"),
        ("1.2.3.4:", "1 to 65535"),
        ("2001:db8::1:51820", "needs brackets"),
        ("2001:db8::1", "needs brackets"),
        ("[2001:db8::1]", "missing ':port'"),
        ("[2001:db8::1]51820", "expected ':port'"),
        ("[2001:db8::1:51820", "missing ']'"),
        ("[1.2.3.4]:5", "not an IPv6 address"),
        ("[]:5", "not an IPv6 address"),
        (":5", "not an IPv4 address"),
        ("1.2.3:5", "not an IPv4 address"),
        ("01.2.3.4:5", "not an IPv4 address"),
        ("[fe80::1%eth0]:5", "scope id"),
        ("0.0.0.0:5", "unicast"),
        ("[::]:5", "unicast"),
        ("239.1.1.1:5", "unicast"),
        ("[ff02::1]:5", "unicast"),
        ("255.255.255.255:5", "unicast"),
        ("", "missing ':port'"),
    ],
)
def test_endpoint_parse_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        Endpoint.parse(text)
    assert len(str(info.value).splitlines()) == 1


def test_endpoint_constructor_checks_port() -> None:
    ip = ipaddress.IPv4Address("1.2.3.4")
    with pytest.raises(ValueError):
        Endpoint(ip, 0)
    with pytest.raises(ValueError):
        Endpoint(ip, True)
    assert Endpoint(ip, 5) == Endpoint.parse("1.2.3.4:5")
    assert len({Endpoint(ip, 5), Endpoint.parse("1.2.3.4:5")}) == 1


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:9585", "127.0.0.1", 9585),
        ("[::1]:9585", "::1", 9585),
        ("localhost:1", "localhost", 1),
        ("0.0.0.0:9585", "0.0.0.0", 9585),
        ("[::]:80", "::", 80),
    ],
)
def test_parse_listen(text: str, host: str, port: int) -> None:
    assert cfg.parse_listen(text) == (host, port)


def test_decode_key() -> None:
    assert cfg.decode_key(KEY) == KEY_BYTES
    with pytest.raises(ValueError, match="not valid base64"):
        cfg.decode_key("é" * 44)


# --------------------------------------------------------------------------
# check_files


def write_config(tmp_path: Path, *, service_extra: str = "", probe_extra: str = "") -> Config:
    path = tmp_path / "natfail.toml"
    path.write_text(
        f'[probe]\nprivate_key_file = "probe.key"\n{probe_extra}\n'
        + MINIMAL.replace("server_public_key", f"{service_extra}\nserver_public_key")
    )
    return load(path)


def write_key(path: Path, content: bytes | str, mode: int = 0o600) -> None:
    """A key file with the owner-only permissions check_files demands."""
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)


def test_check_files_missing_probe_key(tmp_path: Path) -> None:
    conf = write_config(tmp_path)
    assert [str(p) for p in check_files(conf)] == [
        f"{conf.path}: probe.private_key_file: {tmp_path / 'probe.key'}: does not exist"
    ]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "is empty"),
        (b"not a key\n", "must hold exactly one key on one line"),
        (b"!!!!\n", "not valid base64"),
        (SHORT_KEY.encode() + b"\n", "decodes to 16 bytes"),
        (KEY.encode() + b"\n" + KEY.encode() + b"\n", "exactly one key on one line"),
        (b"\xff" * 44, "is not text"),
        (b"A" * 2000, "larger than 1024 bytes"),
    ],
)
def test_check_files_bad_probe_key(tmp_path: Path, content: bytes, reason: str) -> None:
    conf = write_config(tmp_path)
    write_key(tmp_path / "probe.key", content)
    (problem,) = [str(p) for p in check_files(conf)]
    assert problem.startswith(f"{conf.path}: probe.private_key_file: {tmp_path / 'probe.key'}: ")
    assert reason in problem
    assert len(problem.splitlines()) == 1
    if content:
        assert content.decode("ascii", "replace").strip()[:20] not in problem


def test_check_files_good_keys(tmp_path: Path) -> None:
    psk = base64.b64encode(b"\x01" * 32).decode()
    conf = write_config(tmp_path, service_extra='preshared_key_file = "psk"\nnotify = "hook"')
    write_key(tmp_path / "probe.key", f"\n  {KEY}  \n")
    write_key(tmp_path / "psk", psk + "\n")
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    assert [str(p) for p in check_files(conf)] == []
    assert load_key_file(tmp_path / "probe.key") == KEY_BYTES


def test_check_files_psk_and_notify(tmp_path: Path) -> None:
    conf = write_config(tmp_path, service_extra='preshared_key_file = "psk"\nnotify = "hook"')
    write_key(tmp_path / "probe.key", KEY + "\n")
    write_key(tmp_path / "psk", SHORT_KEY + "\n")
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o644)
    assert [str(p) for p in check_files(conf)] == [
        f"{conf.path}: service[0].preshared_key_file: {tmp_path / 'psk'}: content decodes to "
        "16 bytes; a WireGuard key is 32 bytes (44 base64 characters)",
        f"{conf.path}: service[0].notify: {hook}: is not executable",
    ]
    hook.unlink()
    assert [str(p) for p in check_files(conf)][-1].endswith(": does not exist")
    hook.mkdir()
    assert [str(p) for p in check_files(conf)][-1].endswith(": is not a regular file")


def test_check_files_not_regular_key(tmp_path: Path) -> None:
    conf = write_config(tmp_path)
    os.mkfifo(tmp_path / "probe.key")  # must not hang
    (problem,) = [str(p) for p in check_files(conf)]
    assert problem.endswith("is not a regular file")


def test_check_files_unreadable_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = write_config(tmp_path)
    key = tmp_path / "probe.key"
    key.write_text(KEY)
    key.chmod(0)
    if os.geteuid() == 0:  # root reads any file: make the kernel's answer the one a user gets
        real_open = os.open

        def denying_open(path: object, *args: object, **kwargs: object) -> int:
            if Path(str(path)) == key:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", denying_open)
    (problem,) = [str(p) for p in check_files(conf)]
    assert problem.endswith("is not readable (permission denied)")


def test_check_files_service_probe_key(tmp_path: Path) -> None:
    conf = write_config(tmp_path)
    override = '[service.probe]\nprivate_key_file = "own.key"\n\n'
    doc = conf.path.read_text().replace("[[service.backend]]", override + "[[service.backend]]")
    conf.path.write_text(doc)
    conf = load(conf.path)
    # the [probe] default is used by no service, so only the override matters
    assert [str(p) for p in check_files(conf)] == [
        f"{conf.path}: service[0].probe.private_key_file: {tmp_path / 'own.key'}: does not exist"
    ]


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o620, 0o602, 0o660, 0o666])
def test_check_files_refuses_keys_open_to_others(tmp_path: Path, mode: int) -> None:
    psk = base64.b64encode(b"\x01" * 32).decode()
    conf = write_config(tmp_path, service_extra='preshared_key_file = "psk"')
    write_key(tmp_path / "probe.key", KEY + "\n", mode)
    write_key(tmp_path / "psk", psk + "\n", mode)
    too_open = (
        f"permissions {mode:04o} are too open: a key must not be accessible by "
        "group or others (chmod 600)"
    )
    assert [str(p) for p in check_files(conf)] == [
        f"{conf.path}: probe.private_key_file: {tmp_path / 'probe.key'}: {too_open}",
        f"{conf.path}: service[0].preshared_key_file: {tmp_path / 'psk'}: {too_open}",
    ]
    for problem in [str(p) for p in check_files(conf)]:
        assert KEY not in problem and psk not in problem
    with pytest.raises(ValueError, match="too open"):
        load_key_file(tmp_path / "probe.key")
    # owner-only modes, read-only included, are accepted
    for good in (0o600, 0o400):
        (tmp_path / "probe.key").chmod(good)
        (tmp_path / "psk").chmod(good)
        assert [str(p) for p in check_files(conf)] == []


def test_load_key_file_errors_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_key_file(tmp_path / "missing")


# --------------------------------------------------------------------------
# fuzzing: only ConfigError ever escapes


def assert_clean(err: ConfigError, path: Path) -> None:
    text = str(err)
    assert len(text.splitlines()) == 1
    assert text.startswith(f"{path}: ")


scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        [
            "nftables",
            "sticky",
            "preempt",
            "masquerade",
            "10.0.0.2:51820",
            "[2001:db8::1]:51820",
            KEY,
            "",
            "eth0",
            "a",
            "wg0",
        ]
    ),
    st.dates(),
    st.datetimes(),
)
KNOWN_KEYS = sorted(
    set(cfg._ROOT_KEYS + cfg._DAEMON_KEYS + cfg._PROBE_KEYS + cfg._SERVICE_KEYS + cfg._BACKEND_KEYS)
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=10))
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=5))
def test_random_mappings_only_raise_config_error(data: dict[str, Any]) -> None:
    path = Path("/fuzz.toml")
    try:
        cfg.from_mapping(data, path)
    except ConfigError as err:
        assert_clean(err, path)


def _set_at(data: Any, route: list[Any], value: Any) -> None:
    for step in route[:-1]:
        data = data[step]
    data[route[-1]] = value


def _routes(data: Any, prefix: list[Any]) -> list[list[Any]]:
    out: list[list[Any]] = []
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for k, v in items:
        out.append([*prefix, k])
        if isinstance(v, (dict, list)):
            out.extend(_routes(v, [*prefix, k]))
    return out


BASE_ROUTES = _routes(tomllib.loads(BASE), [])


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(BASE_ROUTES), values, st.booleans())
def test_mutated_valid_config_only_raises_config_error(
    route: list[Any], value: Any, delete: bool
) -> None:
    data = tomllib.loads(BASE)
    if delete:
        target = data
        for step in route[:-1]:
            target = target[step]
        del target[route[-1]]
    else:
        _set_at(data, route, value)
    path = Path("/fuzz.toml")
    try:
        cfg.from_mapping(data, path, source=BASE)
    except ConfigError as err:
        assert_clean(err, path)


toml_lines = st.one_of(
    st.sampled_from(
        [
            "[daemon]",
            "[probe]",
            "[[service]]",
            "[service.probe]",
            "[[service.backend]]",
            "[service]",
            "[[daemon]]",
            '["quoted key"]',
            '"""',
            "x = '''",
            "[a.b.c]",
            "[[service.backend.x]]",
            "# comment",
            "",
        ]
    ),
    st.builds(
        lambda k, v: f"{k} = {v}",
        st.sampled_from([*KNOWN_KEYS, "a.b", '"q.k"', "probe.rise", "x"]),
        st.sampled_from(
            [
                '"nftables"',
                "1",
                "0",
                "-1",
                "1.5",
                "true",
                "inf",
                "nan",
                f'"{KEY}"',
                '"10.0.0.2:51820"',
                '"[::1]:1"',
                '"203.0.113.10:51820"',
                "[]",
                "{}",
                '{ name = "a" }',
                '"wg0"',
                '"a"',
                "1979-05-27",
                '""',
            ]
        ),
    ),
    st.text(max_size=30),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(toml_lines, max_size=25))
def test_random_toml_documents_only_raise_config_error(lines: list[str]) -> None:
    path = Path("/fuzz.toml")
    text = "\n".join(lines)
    try:
        parse(text, path)
    except ConfigError as err:
        assert_clean(err, path)
        if err.line is not None:
            assert 1 <= err.line <= text.count("\n") + 1


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_random_text_only_raises_config_error(text: str) -> None:
    path = Path("/fuzz.toml")
    try:
        parse(text, path)
    except ConfigError as err:
        assert_clean(err, path)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_endpoint_parse_only_raises_value_error(text: str) -> None:
    try:
        ep = Endpoint.parse(text)
    except ValueError as err:
        assert len(str(err).splitlines()) == 1
    else:
        assert Endpoint.parse(str(ep)) == ep


# --------------------------------------------------------------------------
# hostile files: bounded reads, owners, one backend in two services


def test_config_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)  # nobody writes it: a blocking read would hang forever
    with pytest.raises(ConfigError, match="not a regular file"):
        load(fifo)
    zero = tmp_path / "zero.toml"
    zero.symlink_to("/dev/zero")  # an endless read
    with pytest.raises(ConfigError, match="not a regular file"):
        load(zero)


def test_config_larger_than_the_limit_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    with open(big, "wb") as f:
        f.truncate(100 * 1024 * 1024)  # sparse: 100 MB that cost nothing to make
    with pytest.raises(ConfigError) as info:
        load(big)
    assert "larger than 4 MiB" in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_a_backend_address_in_two_services_is_refused(tmp_path: Path) -> None:
    second = MINIMAL.replace('name = "wg0"', 'name = "wg1"').replace(':51820"\n', ':51821"\n', 1)
    path = tmp_path / "natfail.toml"
    path.write_text(MINIMAL + "\n" + second)
    with pytest.raises(ConfigError) as info:
        load(path)
    text = str(info.value)
    assert "service[1].backend[0].address" in text
    assert "a backend serves one service" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_key_and_hook_owned_by_another_user_are_refused(tmp_path: Path) -> None:
    conf = write_config(tmp_path, service_extra='notify = "hook"')
    write_key(tmp_path / "probe.key", KEY + "\n")
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    assert [str(p) for p in check_files(conf)] == []
    os.chown(tmp_path / "probe.key", 4242, -1)
    os.chown(hook, 4242, -1)
    problems = [str(p) for p in check_files(conf)]
    assert len(problems) == 2
    assert all("is owned by uid 4242" in p for p in problems)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_a_key_owned_by_the_service_user_is_accepted_by_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The packaged key is natfail:natfail 0600; root's check-config reads it too."""
    from natfail.config import files

    conf = write_config(tmp_path)
    write_key(tmp_path / "probe.key", KEY + "\n")
    os.chown(tmp_path / "probe.key", 4243, -1)
    assert len(check_files(conf)) == 1  # no such service user: refused
    monkeypatch.setattr(files, "service_uid", lambda: 4243)
    assert [str(p) for p in check_files(conf)] == []


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_hook_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    conf = write_config(tmp_path, service_extra='notify = "hook"')
    write_key(tmp_path / "probe.key", KEY + "\n")
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(mode)
    (problem,) = [str(p) for p in check_files(conf)]
    assert problem.startswith(f"{conf.path}: service[0].notify: {hook}: permissions ")
    assert "chmod go-w" in problem


# --------------------------------------------------------------------------
# problems as values


def test_check_files_problems_are_values(tmp_path: Path) -> None:
    conf = write_config(tmp_path, service_extra='notify = "hook"')
    key_problem, hook_problem = check_files(conf)
    assert key_problem == cfg.Problem(
        conf.path, "probe.private_key_file", "does not exist", file=tmp_path / "probe.key"
    )
    assert (hook_problem.key, hook_problem.file, hook_problem.message) == (
        "service[0].notify",
        tmp_path / "hook",
        "does not exist",
    )
    assert hook_problem.line is None


def test_problem_str_is_the_config_error_line() -> None:
    path = Path("/etc/natfail/natfail.toml")
    plain = cfg.Problem(path, "service[0].name", "missing (required)", line=7)
    assert str(plain) == f"{path}: service[0].name: missing (required) (line 7)"
    assert str(cfg.Problem(path, "", "is not valid UTF-8")) == f"{path}: is not valid UTF-8"
    named = cfg.Problem(path, "probe.private_key_file", "is empty", file=Path("/k\nx"))
    assert str(named) == f"{path}: probe.private_key_file: /k\\nx: is empty"
    # a ConfigError is one problem, whichever way it was made
    err = ConfigError(path, "service[0].name", "missing (required)", 7)
    assert err.problem == plain and str(err) == str(plain)
    from_named = ConfigError.from_problem(named)
    assert from_named.problem is named and str(from_named) == str(named)
    assert (from_named.file, from_named.key, from_named.line) == (path, named.key, None)
    assert from_named.message == "/k\nx: is empty"
    assert str(named.error()) == str(named)


# --------------------------------------------------------------------------
# writing keys


def test_generated_key_files_read_back(tmp_path: Path) -> None:
    key = cfg.generate_key()
    assert len(key) == 32 and key != cfg.generate_key()
    assert key[0] & 7 == 0 and key[31] & 0xC0 == 0x40  # clamped as wg genkey does
    path = tmp_path / "probe.key"
    cfg.create_key_file(path, key)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text() == cfg.encode_key(key) + "\n"
    assert load_key_file(path) == key
    with pytest.raises(FileExistsError):
        cfg.create_key_file(path, cfg.generate_key())
    assert load_key_file(path) == key


def test_the_model_reads_no_files() -> None:
    # The core shares the model: importing it must bring in no reader.
    code = (
        "import sys, natfail.core.model\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('tomllib', 'tomli', 'socket', 'subprocess', 'asyncio')\n"
        "       or m.startswith('natfail.config')]\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""


def test_backend_agent_is_optional() -> None:
    doc = mutate("priority = 50", 'priority = 50\nagent = "10.0.0.3:51821"')
    wg0 = parse(doc, Path("x.toml")).services[0]
    a, b = wg0.backends
    assert a.agent is None
    assert b.agent is not None and str(b.agent) == "10.0.0.3:51821"


def test_backend_agent_must_be_an_endpoint() -> None:
    doc = mutate("priority = 50", 'priority = 50\nagent = "10.0.0.3"')
    with pytest.raises(ConfigError) as err:
        parse(doc, Path("x.toml"))
    assert "service[0].backend[1].agent" in str(err.value)
    assert "port" in str(err.value)


# --------------------------------------------------------------------------
# problems of a big file


def test_the_lines_of_many_problems_come_from_one_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each problem looked its line up by reading the whole file again: a
    broken config of a thousand services took minutes to report."""
    from natfail.config import lines

    calls: list[int] = []
    real = lines._line_index

    def counted(source: str) -> dict[tuple[str | int, ...], int]:
        calls.append(1)
        return real(source)

    monkeypatch.setattr(lines, "_line_index", counted)
    backends = "".join(
        f'[[service]]\nname = "s{i}"\npublic = "203.0.113.10:{40000 + i}"\n'
        f'server_public_key = "{KEY}"\n[[service.backend]]\nname = "a"\n'
        f'address = "10.0.0.2:{20000 + i}"\n'
        for i in range(50)
    )
    with pytest.raises(ConfigError) as caught:
        cfg.parse(backends, tmp_path / "natfail.toml")
    assert len(caught.value.problems) == 50
    assert [p.line for p in caught.value.problems][:2] == [5, 12]  # each [[service.backend]]
    assert calls == [1]
