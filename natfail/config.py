"""The config contract: ``natfail.toml`` → frozen dataclasses.

All validation lives here, so the daemon, ``natfailctl check-config`` and
``natfailctl reload`` accept and refuse exactly the same files. Every error is
a :class:`ConfigError` whose text is one line naming the file, the key path
(``service[0].backend[1].address``) and, where it can be found, the line.

Rules beyond the types, and why:

* Unknown keys are errors (with a "did you mean" hint): a typo such as
  ``intervall`` must not silently fall back to a default.
* Relative paths are resolved against the directory of the config file, so a
  config means the same thing whatever the working directory of the daemon.
* ``timeout`` may be larger than ``interval``: the contract does not forbid
  it, so it is not enforced here.
* ``priority`` has no default in the contract, so every backend must give one.
* Endpoints are IP literals only (no DNS: a failover path must not depend on
  a resolver) and must be unicast (DNAT to 0.0.0.0 or a multicast group is
  never what was meant).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has no tomllib
    import tomli as tomllib

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
from natfail.core.model import (
    kind as _kind,
)
from natfail.core.model import (
    looks_like_hostname as _looks_like_hostname,
)
from natfail.core.model import (
    show as _show,
)
from natfail.core.model import (
    split_host_port as _split_host_port,
)
from natfail.core.selector import FAILBACKS, Failback

__all__ = [
    "DEFAULT_PATH",
    "Backend",
    "Config",
    "ConfigError",
    "DaemonSettings",
    "Endpoint",
    "KeyFileError",
    "ProbeSettings",
    "Problem",
    "Service",
    "check_files",
    "decode_key",
    "from_mapping",
    "load",
    "load_key_file",
    "parse",
    "parse_listen",
    "read_config_file",
    "read_raw",
]

DEFAULT_PATH: Final = Path("/etc/natfail/natfail.toml")


FIREWALLS: Final[tuple[Firewall, ...]] = ("nftables", "iptables")
SOURCE_NATS: Final[tuple[SourceNat, ...]] = ("preserve", "masquerade")

DEFAULT_FAILBACK: Final[Failback] = "sticky"
DEFAULT_PREEMPT_DELAY: Final = 30.0
DEFAULT_SOURCE_NAT: Final[SourceNat] = "preserve"

KEY_LEN: Final = 32  # Curve25519 keys and WireGuard preshared keys
PRIORITY_MIN: Final = -(2**31)
PRIORITY_MAX: Final = 2**31 - 1
# Service and backend names end up in nft rule comments, iptables chain names,
# state files and natfailctl arguments: keep them short and plain. The first
# character may not be '.' or '-', so a name is never '.'/'..' in a file path
# nor looks like an option on a command line. (iptables chain names are at
# most 28 characters: the ruleset must not paste a 32-character name behind
# a prefix verbatim.)
NAME_MAX: Final = 32
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}")
IFNAMSIZ: Final = 16  # kernel limit, including the trailing NUL
UNIX_PATH_MAX: Final = 107  # sun_path is 108 bytes, including the NUL
_KEY_FILE_LIMIT: Final = 1024  # a key file is one 44-character line
# Far more than 1000 services need (about 300 bytes each), far less than hurts.
CONFIG_FILE_LIMIT: Final = 4 * 1024 * 1024


# --------------------------------------------------------------------------
# errors


def _one_line(text: str) -> str:
    """Escape anything that could break a message over lines (a newline in a
    file name or a key), so scripts and the journal always get one line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class ConfigError(Exception):
    """A config that cannot be used. ``str()`` is one line:
    ``FILE: KEY_PATH: message (line N)``; the key path is empty for
    file-level problems and the line is left out when unknown."""

    def __init__(self, file: Path | str, key: str, message: str, line: int | None = None) -> None:
        super().__init__(file, key, message, line)
        self.file = Path(file)
        self.key = key
        self.message = message
        self.line = line

    def __str__(self) -> str:
        parts = [str(self.file), self.key, self.message]
        text = ": ".join(part for part in parts if part)
        if self.line is not None:
            text += f" (line {self.line})"
        return _one_line(text)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config, as a value: the config file, the key
    path, the file it names (if any) and why. ``str()`` is the one line the
    user sees."""

    config: Path
    key: str
    file: Path | None
    reason: str

    @property
    def message(self) -> str:
        return f"{self.file}: {self.reason}" if self.file is not None else self.reason

    def __str__(self) -> str:
        return _one_line(f"{self.config}: {self.key}: {self.message}")

    def error(self) -> ConfigError:
        return ConfigError(self.config, self.key, self.message)


class KeyFileError(ValueError):
    """A key file that cannot be used; ``reason`` never contains key material."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return _one_line(f"{self.path}: {self.reason}")


# Inside the validator a problem is raised with its key path as a tuple
# (str for keys, int for array indices); parse() turns it into a ConfigError
# once, adding the file name and the line.
_Where = tuple[str | int, ...]


class _Invalid(Exception):
    def __init__(self, where: _Where, message: str) -> None:
        super().__init__(where, message)
        self.where = where
        self.message = message


_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")


def _render(where: _Where) -> str:
    """('service', 0, 'backend', 1, 'address') → service[0].backend[1].address"""
    out = ""
    for part in where:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        key = part if _BARE_KEY_RE.fullmatch(part) else json.dumps(part)
        out = f"{out}.{key}" if out else key
    return out


def _show_number(value: float) -> str:
    # str() of a huge int raises ValueError past 4300 digits; keep it short.
    if isinstance(value, int) and value.bit_length() > 64:
        return "a number that large"
    return repr(value)


# --------------------------------------------------------------------------
# addresses and keys


def parse_listen(text: str) -> tuple[str, int]:
    """A listen address ``host:port`` (``[IPv6]:port`` for IPv6); the host may
    be an IP literal or a hostname such as ``localhost``. Returns the host
    without brackets and the port; raises ValueError."""
    host, bracketed, port = _split_host_port(text)
    shown = _show(text)
    if bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{shown}: {_show(host)} is not an IPv6 address") from None
        return host, port
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _looks_like_hostname(host) or len(host) > 253:
            raise ValueError(f"{shown}: {_show(host)} is not an IPv4 address or hostname") from None
    return host, port


def decode_key(text: str) -> bytes:
    """Decode a base64 WireGuard key (32 bytes). The ValueError never quotes
    the input: it may be a private key."""
    if not isinstance(text, str):
        raise ValueError(f"a key must be a string, not {_kind(text)}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None
    if len(raw) != KEY_LEN:
        raise ValueError(
            f"decodes to {len(raw)} bytes; a WireGuard key is {KEY_LEN} bytes "
            "(44 base64 characters)"
        )
    return raw


def load_key_file(path: Path | str) -> bytes:
    """Read a WireGuard key file (as written by ``wg genkey``/``wg genpsk``):
    one line of base64 for 32 bytes, surrounding whitespace allowed.
    Raises KeyFileError (a ValueError) whose message names the file and
    never contains key material."""
    path = Path(path)
    data = _read_small_file(path)
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFileError(path, "is not text; expected one line of base64") from None
    if not text:
        raise KeyFileError(path, "is empty; expected one line of base64")
    if any(ch.isspace() for ch in text):
        raise KeyFileError(path, "must hold exactly one key on one line")
    try:
        return decode_key(text)
    except ValueError as exc:
        raise KeyFileError(path, f"content {exc}") from None


def _too_open(mode: int) -> str | None:
    """Why a secret's permissions are refused, as ssh refuses a private key
    that anyone but its owner may touch: a key another local user can read
    lets them impersonate the probe, one they can write lets them swap it."""
    if mode & 0o077:
        return (
            f"permissions {stat.S_IMODE(mode):04o} are too open: a key must not be "
            "accessible by group or others (chmod 600)"
        )
    return None


def _foreign_owner(uid: int, what: str) -> str | None:
    """Why a file another user owns is refused: its owner can change it at will
    (a key to impersonate the probe, a hook to run as natfail, CAP_NET_ADMIN)."""
    if uid in (0, os.geteuid()):
        return None
    return (
        f"is owned by uid {uid}: {what} must be owned by root or by the user natfail "
        "runs as (chown)"
    )


class _Unreadable(Exception):
    """Why `_read_regular` gave up: ``kind`` is one of "missing", "denied",
    "open", "type", "vetted", "read" and "size"; ``detail`` says more."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail


def _read_regular(
    path: Path, limit: int, vet: Callable[[os.stat_result], str | None] | None = None
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, for every file natfail
    reads from its config (keys, the config itself): a FIFO, a device or a huge file in
    its place must not hang or exhaust the reader. ``vet`` may refuse the file by its
    fstat (of the descriptor read, so the checked file is the read one)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _Unreadable("missing", "No such file or directory") from None
    except PermissionError:
        raise _Unreadable("denied", "Permission denied") from None
    except (OSError, ValueError) as exc:
        raise _Unreadable("open", _os_reason(exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _Unreadable("type")
        problem = vet(info) if vet is not None else None
        if problem is not None:
            raise _Unreadable("vetted", problem)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # the file may grow while it is read
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise _Unreadable("read", _os_reason(exc)) from None
    finally:
        os.close(fd)
    if size > limit:
        raise _Unreadable("size")
    return b"".join(chunks)


def _read_small_file(path: Path) -> bytes:
    def vet(info: os.stat_result) -> str | None:
        return _too_open(info.st_mode) or _foreign_owner(info.st_uid, "a key")

    try:
        return _read_regular(path, _KEY_FILE_LIMIT, vet)
    except _Unreadable as exc:
        reason = {
            "missing": "does not exist",
            "denied": "is not readable (permission denied)",
            "open": f"cannot be opened: {exc.detail}",
            "type": "is not a regular file",
            "vetted": exc.detail,
            "read": f"cannot be read: {exc.detail}",
            "size": f"is larger than {_KEY_FILE_LIMIT} bytes; expected one key",
        }[exc.kind]
        raise KeyFileError(path, reason) from None


def _os_reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


# --------------------------------------------------------------------------
# the model


DEFAULT_DAEMON: Final = DaemonSettings()
DEFAULT_PROBE: Final = ProbeSettings()

# The known keys of each table, in the order the example file documents them.
_ROOT_KEYS: Final = ("daemon", "probe", "service")
_DAEMON_KEYS: Final = ("firewall", "socket", "state_dir", "metrics_listen")
_PROBE_KEYS: Final = ("private_key_file", "interval", "timeout", "rise", "fall")
_SERVICE_KEYS: Final = (
    "name",
    "public",
    "inbound_interface",
    "server_public_key",
    "preshared_key_file",
    "failback",
    "preempt_delay",
    "source_nat",
    "notify",
    "probe",
    "backend",
)
_BACKEND_KEYS: Final = ("name", "address", "priority")


# --------------------------------------------------------------------------
# validation


_MISSING: Final = object()
_L = TypeVar("_L", bound=str)


def _unknown_key(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"unknown key {_show(key)} (did you mean {close[0]!r}?)"
    return f"unknown key {_show(key)} (known keys: {', '.join(known)})"


class _Table:
    """One TOML table under validation: typed getters that raise _Invalid
    with the exact key path."""

    __slots__ = ("base_dir", "data", "where")

    def __init__(self, value: object, where: _Where, known: Sequence[str], base_dir: Path) -> None:
        if not isinstance(value, Mapping):
            raise _Invalid(where, f"must be a table, not {_kind(value)}")
        for key in value:
            if key not in known:
                raise _Invalid((*where, str(key)), _unknown_key(str(key), known))
        self.data: Mapping[object, object] = value
        self.where = where
        self.base_dir = base_dir

    def at(self, key: str) -> _Where:
        return (*self.where, key)

    def raw(self, key: str) -> object:
        return self.data.get(key, _MISSING)

    def invalid(self, key: str, message: str) -> _Invalid:
        return _Invalid(self.at(key), message)

    def text(self, key: str, default: str | None) -> str:
        """A string; default None means the key is required."""
        value = self.raw(key)
        if value is _MISSING:
            if default is None:
                raise self.invalid(key, "missing (required)")
            return default
        if not isinstance(value, str):
            raise self.invalid(key, f"must be a string, not {_kind(value)}")
        return value

    def integer(self, key: str, default: int | None, low: int, high: int | None = None) -> int:
        value = self.raw(key)
        if value is _MISSING:
            if default is None:
                raise self.invalid(key, "missing (required)")
            return default
        # bool is an int subclass in Python, but `rise = true` is a mistake.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.invalid(key, f"must be an integer, not {_kind(value)}")
        if value < low or (high is not None and value > high):
            wanted = f">= {low}" if high is None else f"between {low} and {high}"
            raise self.invalid(key, f"must be {wanted}, got {_show_number(value)}")
        return value

    def seconds(self, key: str, default: float, *, allow_zero: bool) -> float:
        """A duration in seconds: an integer or a float, finite."""
        value = self.raw(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.invalid(key, f"must be a number of seconds, not {_kind(value)}")
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds):
            raise self.invalid(key, "must be a finite number of seconds")
        if seconds < 0 or (seconds == 0 and not allow_zero):
            wanted = ">= 0" if allow_zero else "> 0"
            raise self.invalid(key, f"must be {wanted}, got {_show_number(value)}")
        return seconds

    def choice(self, key: str, choices: tuple[_L, ...], default: _L) -> _L:
        value = self.text(key, default)
        for choice in choices:
            if value == choice:
                return choice
        allowed = ", ".join(repr(c) for c in choices)
        raise self.invalid(key, f"must be one of {allowed}, got {_show(value)}")

    def path(self, key: str, default: Path) -> Path:
        value = self.optional_path(key, default)
        if value is None:
            raise self.invalid(key, "must not be empty")
        return value

    def optional_path(self, key: str, default: Path | None) -> Path | None:
        """A file path; "" means none. Relative paths are taken from the
        directory of the config file."""
        value = self.raw(key)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise self.invalid(key, f"must be a string (a path), not {_kind(value)}")
        if not value:
            return None
        if "\0" in value:
            raise self.invalid(key, "must not contain a NUL character")
        path = Path(value)
        return path if path.is_absolute() else self.base_dir / path

    def sub(self, key: str, known: Sequence[str]) -> _Table | None:
        value = self.raw(key)
        if value is _MISSING:
            return None
        return _Table(value, self.at(key), known, self.base_dir)

    def tables(self, key: str, header: str, known: Sequence[str]) -> list[_Table]:
        """An array of tables (``[[header]]``); at least one is required."""
        value = self.raw(key)
        if value is _MISSING or (isinstance(value, (list, tuple)) and not value):
            raise self.invalid(key, f"at least one {header} is required")
        if not isinstance(value, (list, tuple)):
            raise self.invalid(key, f"must be an array of tables ({header}), not {_kind(value)}")
        return [
            _Table(item, (*self.at(key), index), known, self.base_dir)
            for index, item in enumerate(value)
        ]


def _name(table: _Table) -> str:
    name = table.text("name", None)
    if not _NAME_RE.fullmatch(name):
        raise table.invalid(
            "name",
            f"{_show(name)} is not a valid name: 1 to {NAME_MAX} of A-Z a-z 0-9 _ . -, "
            "not starting with '.' or '-'",
        )
    return name


def _endpoint(table: _Table, key: str) -> Endpoint:
    try:
        return Endpoint.parse(table.text(key, None))
    except ValueError as exc:
        raise table.invalid(key, str(exc)) from None


def _key(table: _Table, key: str) -> bytes:
    try:
        return decode_key(table.text(key, None))
    except ValueError as exc:
        raise table.invalid(key, str(exc)) from None


def _interface(table: _Table) -> str | None:
    name = table.text("inbound_interface", "")
    if not name:
        return None
    # The kernel's dev_valid_name(): under IFNAMSIZ bytes, not '.'/'..', and
    # no '/', ':' or whitespace. Control characters are refused as well.
    size = len(name.encode("utf-8", "surrogatepass"))
    bad = any(ch in "/:" or ch.isspace() or not ch.isprintable() for ch in name)
    if size >= IFNAMSIZ or bad or name in (".", ".."):
        raise table.invalid(
            "inbound_interface",
            f"{_show(name)} is not a valid interface name "
            f"(1 to {IFNAMSIZ - 1} bytes, no '/', ':' or whitespace)",
        )
    return name


def _probe(table: _Table | None, base: ProbeSettings) -> ProbeSettings:
    """[probe] over the built-in defaults, or [service.probe] over [probe]:
    every key is optional and falls back to `base`."""
    if table is None:
        return base
    return ProbeSettings(
        private_key_file=table.path("private_key_file", base.private_key_file),
        interval=table.seconds("interval", base.interval, allow_zero=False),
        timeout=table.seconds("timeout", base.timeout, allow_zero=False),
        rise=table.integer("rise", base.rise, 1),
        fall=table.integer("fall", base.fall, 1),
    )


def _daemon(table: _Table | None) -> DaemonSettings:
    if table is None:
        return DEFAULT_DAEMON
    firewall = table.choice("firewall", FIREWALLS, DEFAULT_DAEMON.firewall)
    socket = table.path("socket", DEFAULT_DAEMON.socket)
    if len(str(socket).encode("utf-8", "surrogatepass")) > UNIX_PATH_MAX:
        raise table.invalid("socket", f"a unix socket path is at most {UNIX_PATH_MAX} bytes")
    state_dir = table.path("state_dir", DEFAULT_DAEMON.state_dir)
    metrics_listen = table.text("metrics_listen", DEFAULT_DAEMON.metrics_listen)
    if metrics_listen:
        try:
            parse_listen(metrics_listen)
        except ValueError as exc:
            raise table.invalid("metrics_listen", f'{exc} ("" turns metrics off)') from None
    return DaemonSettings(firewall, socket, state_dir, metrics_listen)


def _backend(table: _Table, public: Endpoint) -> Backend:
    name = _name(table)
    address = _endpoint(table, "address")
    if address.family != public.family:
        raise table.invalid(
            "address",
            f"{address} is IPv{address.family} but the public endpoint {public} is "
            f"IPv{public.family}; DNAT cannot change the address family",
        )
    priority = table.integer("priority", None, PRIORITY_MIN, PRIORITY_MAX)
    return Backend(name, address, priority)


def _backends(service: _Table, public: Endpoint) -> tuple[Backend, ...]:
    tables = service.tables("backend", "[[service.backend]]", _BACKEND_KEYS)
    backends: list[Backend] = []
    for table in tables:
        backend = _backend(table, public)
        for other in backends:
            if other.name == backend.name:
                raise table.invalid("name", f"duplicate backend name {backend.name!r}")
            if other.address == backend.address:
                raise table.invalid(
                    "address", f"{backend.address} is already the address of {other.name!r}"
                )
        backends.append(backend)
    return tuple(backends)


def _service(table: _Table, default_probe: ProbeSettings) -> Service:
    # Checked in the order the keys are documented, so the first error a
    # user sees is the first one in the file.
    name = _name(table)
    public = _endpoint(table, "public")
    return Service(
        name=name,
        public=public,
        inbound_interface=_interface(table),
        server_public_key=_key(table, "server_public_key"),
        preshared_key_file=table.optional_path("preshared_key_file", None),
        failback=table.choice("failback", FAILBACKS, DEFAULT_FAILBACK),
        preempt_delay=table.seconds("preempt_delay", DEFAULT_PREEMPT_DELAY, allow_zero=True),
        source_nat=table.choice("source_nat", SOURCE_NATS, DEFAULT_SOURCE_NAT),
        notify=table.optional_path("notify", None),
        probe=_probe(table.sub("probe", _PROBE_KEYS), default_probe),
        backends=_backends(table, public),
    )


def _services(root: _Table, default_probe: ProbeSettings) -> tuple[Service, ...]:
    services: list[Service] = []
    for table in root.tables("service", "[[service]]", _SERVICE_KEYS):
        service = _service(table, default_probe)
        for other in services:
            if other.name == service.name:
                raise table.invalid("name", f"duplicate service name {service.name!r}")
            if other.public == service.public:
                raise table.invalid(
                    "public", f"{service.public} is already the public endpoint of {other.name!r}"
                )
            for index, backend in enumerate(service.backends):
                # One address behind two public endpoints: its own packets
                # could leave as only one of them (one SNAT per source).
                taken = next((b for b in other.backends if b.address == backend.address), None)
                if taken is not None:
                    raise _Invalid(
                        (*table.at("backend"), index, "address"),
                        f"{backend.address} is already the address of backend "
                        f"{taken.name!r} of service {other.name!r}; a backend serves one service",
                    )
        services.append(service)
    return tuple(services)


def _build(data: object, path: Path) -> Config:
    root = _Table(data, (), _ROOT_KEYS, _base_dir(path))
    daemon = _daemon(root.sub("daemon", _DAEMON_KEYS))
    probe = _probe(root.sub("probe", _PROBE_KEYS), DEFAULT_PROBE)
    services = _services(root, probe)
    # Imported here: the ruleset module builds on this one's model.
    from natfail.core import ruleset

    problems = ruleset.validate(services)
    if problems:
        raise _Invalid(("service",), problems[0])
    return Config(path, daemon, probe, services)


def _base_dir(path: Path) -> Path:
    try:
        return Path(os.path.abspath(path)).parent
    except (OSError, ValueError):  # the working directory is gone
        return path.parent


# --------------------------------------------------------------------------
# line numbers (best effort)

_KEY_PART: Final = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_DOTTED: Final = rf"{_KEY_PART}(?:[ \t]*\.[ \t]*{_KEY_PART})*"
_HEADER_RE: Final = re.compile(rf"[ \t]*(\[\[?)[ \t]*({_DOTTED})[ \t]*(\]\]?)[ \t]*(?:#.*)?\r?")
_ASSIGN_RE: Final = re.compile(rf"[ \t]*({_DOTTED})[ \t]*=")
_PART_RE: Final = re.compile(_KEY_PART)


def _key_parts(dotted: str) -> list[str]:
    parts = []
    for token in _PART_RE.findall(dotted):
        if token.startswith('"'):
            try:
                token = str(json.loads(token))
            except ValueError:  # a TOML escape JSON lacks; good enough
                token = token[1:-1]
        elif token.startswith("'"):
            token = token[1:-1]
        parts.append(token)
    return parts


def _resolve_header(parts: list[str], is_array: bool, counts: dict[_Where, int]) -> list[_Where]:
    """The key path of a table header, with array indices: the second
    [[service.backend]] inside the first [[service]] is service[0].backend[1].
    Returns every path on the way, so a table's own line is known too."""
    where: _Where = ()
    seen: list[_Where] = []
    for position, part in enumerate(parts):
        where = (*where, part)
        seen.append(where)
        if is_array and position == len(parts) - 1:
            counts[where] = counts.get(where, 0) + 1
            where = (*where, counts[where] - 1)
            seen.append(where)
        elif where in counts:
            where = (*where, counts[where] - 1)
    return seen


def _line_index(source: str) -> dict[_Where, int]:
    """Map each key path to the first line that sets it, tracking table
    headers and array-of-table indices. Multi-line strings are skipped
    roughly; inline tables are not entered (their key's line is used)."""
    index: dict[_Where, int] = {}
    counts: dict[_Where, int] = {}
    table: _Where = ()
    in_string: str | None = None
    for number, line in enumerate(source.split("\n"), start=1):
        if in_string is not None:
            if in_string in line:
                in_string = None
            continue
        header = _HEADER_RE.fullmatch(line)
        if header and len(header.group(1)) == len(header.group(3)):
            paths = _resolve_header(_key_parts(header.group(2)), header.group(1) == "[[", counts)
            for where in paths:
                index.setdefault(where, number)
            table = paths[-1]
            continue
        assign = _ASSIGN_RE.match(line)
        if assign:
            where = table
            for part in _key_parts(assign.group(1)):
                where = (*where, part)
                index.setdefault(where, number)
        for quotes in ('"""', "'''"):
            if line.count(quotes) % 2 == 1:
                in_string = quotes
                break
    return index


def _line_of(source: str, where: _Where) -> int | None:
    """The line of `where`, else of its nearest enclosing key or table (a
    missing key is reported at its table's header). Never raises."""
    if not source:
        return None
    try:
        index = _line_index(source)
        while where:
            if where in index:
                return index[where]
            where = where[:-1]
    except Exception:  # a helper for messages must never hide the real error
        return None
    return None


# --------------------------------------------------------------------------
# entry points

_AT_RE: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _syntax_error(path: Path, exc: Exception, text: str) -> ConfigError:
    message = str(exc)
    found = _AT_RE.search(message)
    if found is None:
        if message.endswith(" (at end of document)"):
            message = message.removesuffix(" (at end of document)")
            last_line = text.rstrip("\n").count("\n") + 1
            return ConfigError(path, "", f"TOML syntax error at the end: {message}", last_line)
        return ConfigError(path, "", f"TOML syntax error: {message}")
    message = message[: found.start()]
    line, column = int(found.group(1)), int(found.group(2))
    return ConfigError(path, "", f"TOML syntax error at column {column}: {message}", line)


def from_mapping(data: Mapping[str, object], path: Path | str, *, source: str = "") -> Config:
    """Validate an already parsed document. `path` is used in messages and as
    the base of relative paths; `source`, when given, supplies line numbers."""
    path = Path(path)
    try:
        return _build(data, path)
    except _Invalid as exc:
        line = _line_of(source, exc.where)
        raise ConfigError(path, _render(exc.where), exc.message, line) from None


def parse(text: str, path: Path | str) -> Config:
    """Parse and validate the text of a config file; raises ConfigError."""
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(path, exc, text) from None
    except RecursionError:
        raise ConfigError(path, "", "TOML syntax error: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(path, "", f"TOML value error: {exc}") from None
    return from_mapping(data, path, source=text)


def load(path: Path | str = DEFAULT_PATH) -> Config:
    """Read, parse and validate a config file; raises ConfigError."""
    path = Path(path)
    raw = read_config_file(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(path, "", "is not valid UTF-8", line) from None
    return parse(text, path)


def read_raw(path: Path | str) -> dict[str, Any]:
    """The TOML document of a config file, unvalidated (for a tool that must find the
    socket in a config with mistakes elsewhere); ConfigError when unreadable."""
    path = Path(path)
    text = read_config_file(path).decode("utf-8-sig", errors="replace")
    try:
        return tomllib.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(path, "", f"TOML syntax error: {_one_line(str(exc))}") from None


def read_config_file(path: Path) -> bytes:
    """The bytes of the config file, read as the key files are (`_read_regular`),
    at most CONFIG_FILE_LIMIT; ConfigError naming the file otherwise."""
    try:
        return _read_regular(path, CONFIG_FILE_LIMIT)
    except _Unreadable as exc:
        if exc.kind == "type":
            reason = "it is not a regular file"
        elif exc.kind == "size":
            reason = f"it is larger than {CONFIG_FILE_LIMIT // 1024 // 1024} MiB"
        else:
            reason = exc.detail
        raise ConfigError(path, "", f"cannot read the config file: {reason}") from None


# --------------------------------------------------------------------------
# files the daemon will need


def _executable_problem(path: Path) -> str | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return "does not exist"
    except (OSError, ValueError) as exc:
        return f"cannot be inspected: {_os_reason(exc)}"
    mode = info.st_mode
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if mode & 0o022:
        return (
            f"permissions {stat.S_IMODE(mode):04o} let group or others change it, and it "
            "runs with natfail's privileges (chmod go-w)"
        )
    owner = _foreign_owner(info.st_uid, "a notify hook")
    if owner is not None:
        return owner
    if not os.access(path, os.X_OK):
        return "is not executable"
    return None


def check_files(config: Config) -> list[Problem]:
    """What the daemon will need on disk, as one line per problem naming the
    config file, the key path and the file: probe private keys (the [probe]
    default when some service uses it, and each [service.probe] override),
    preshared keys, and notify executables. Never contains key material."""
    problems: list[Problem] = []

    def report(where: _Where, file: Path, reason: str) -> None:
        problems.append(Problem(config.path, _render(where), file, reason))

    key_files: list[tuple[_Where, Path]] = []
    default_key = config.probe.private_key_file
    if any(s.probe.private_key_file == default_key for s in config.services):
        key_files.append((("probe", "private_key_file"), default_key))
    seen = {default_key}
    for index, service in enumerate(config.services):
        own_key = service.probe.private_key_file
        if own_key not in seen:
            seen.add(own_key)
            key_files.append((("service", index, "probe", "private_key_file"), own_key))
        if service.preshared_key_file is not None:
            key_files.append((("service", index, "preshared_key_file"), service.preshared_key_file))

    for where, file in key_files:
        try:
            load_key_file(file)
        except KeyFileError as exc:
            report(where, file, exc.reason)

    for index, service in enumerate(config.services):
        if service.notify is not None:
            reason = _executable_problem(service.notify)
            if reason is not None:
                report(("service", index, "notify"), service.notify, reason)
    return problems
