"""The config's tables and keys, and the model built from a parsed document.

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

import ipaddress
import os
import re
from pathlib import Path
from typing import Final

from natfail.config.keys import decode_key
from natfail.config.problems import Invalid, InvalidAll
from natfail.config.tables import Table
from natfail.core import ruleset
from natfail.core.model import (
    Backend,
    Config,
    DaemonSettings,
    Endpoint,
    Firewall,
    ProbeSettings,
    Service,
    SourceNat,
    looks_like_hostname,
    show,
    split_host_port,
)
from natfail.core.selector import FAILBACKS, Failback
from natfail.locations import UNIX_PATH_MAX

FIREWALLS: Final[tuple[Firewall, ...]] = ("nftables", "iptables")
SOURCE_NATS: Final[tuple[SourceNat, ...]] = ("preserve", "masquerade")

DEFAULT_FAILBACK: Final[Failback] = "sticky"
DEFAULT_PREEMPT_DELAY: Final = 30.0
DEFAULT_SOURCE_NAT: Final[SourceNat] = "preserve"
DEFAULT_DAEMON: Final = DaemonSettings()
DEFAULT_PROBE: Final = ProbeSettings()

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

# The known keys of each table, in the order the example file documents them.
_ROOT_KEYS: Final = ("daemon", "probe", "service")
_DAEMON_KEYS: Final = ("firewall", "socket", "state_dir", "metrics_listen", "pair")
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
_BACKEND_KEYS: Final = ("name", "address", "priority", "agent")


def parse_listen(text: str) -> tuple[str, int]:
    """A listen address ``host:port`` (``[IPv6]:port`` for IPv6); the host may
    be an IP literal or a hostname such as ``localhost``. Returns the host
    without brackets and the port; raises ValueError."""
    host, bracketed, port = split_host_port(text)
    shown = show(text)
    if bracketed:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{shown}: {show(host)} is not an IPv6 address") from None
        return host, port
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not looks_like_hostname(host) or len(host) > 253:
            raise ValueError(f"{shown}: {show(host)} is not an IPv4 address or hostname") from None
    return host, port


def _name(table: Table) -> str:
    name = table.text("name", None)
    if not _NAME_RE.fullmatch(name):
        raise table.invalid(
            "name",
            f"{show(name)} is not a valid name: 1 to {NAME_MAX} of A-Z a-z 0-9 _ . -, "
            "not starting with '.' or '-'",
        )
    return name


def _endpoint(table: Table, key: str) -> Endpoint:
    try:
        return Endpoint.parse(table.text(key, None))
    except ValueError as exc:
        raise table.invalid(key, str(exc)) from None


def _key(table: Table, key: str) -> bytes:
    try:
        return decode_key(table.text(key, None))
    except ValueError as exc:
        raise table.invalid(key, str(exc)) from None


def _interface(table: Table) -> str | None:
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
            f"{show(name)} is not a valid interface name "
            f"(1 to {IFNAMSIZ - 1} bytes, no '/', ':' or whitespace)",
        )
    return name


def _probe(table: Table | None, base: ProbeSettings) -> ProbeSettings:
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


def _daemon(table: Table | None) -> DaemonSettings:
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
    pair = table.flag("pair", DEFAULT_DAEMON.pair)
    return DaemonSettings(firewall, socket, state_dir, metrics_listen, pair)


def _backend(table: Table, public: Endpoint) -> Backend:
    name = _name(table)
    address = _endpoint(table, "address")
    if address.family != public.family:
        raise table.invalid(
            "address",
            f"{address} is IPv{address.family} but the public endpoint {public} is "
            f"IPv{public.family}; DNAT cannot change the address family",
        )
    priority = table.integer("priority", None, PRIORITY_MIN, PRIORITY_MAX)
    agent: Endpoint | None = None
    if table.text("agent", ""):
        agent = _endpoint(table, "agent")
    return Backend(name, address, priority, agent)


def _backends(
    service: Table, public: Endpoint, pair: bool, found: list[Invalid]
) -> tuple[Backend, ...]:
    """The service's backends; a backend with a problem is left out, its
    problem added to ``found`` (every backend is checked)."""
    tables = service.tables("backend", "[[service.backend]]", _BACKEND_KEYS)
    backends: list[Backend] = []
    for table in tables:
        try:
            backends.append(_checked_backend(table, public, pair, backends))
        except Invalid as exc:
            found.append(exc)
    return tuple(backends)


def _checked_backend(
    table: Table, public: Endpoint, pair: bool, backends: list[Backend]
) -> Backend:
    backend = _backend(table, public)
    if pair and backend.agent is None:
        # The two gateways agree on the active backend through the agents.
        raise table.invalid(
            "agent", "missing: [daemon] pair = true needs an agent on every backend"
        )
    for other in backends:
        if other.name == backend.name:
            raise table.invalid("name", f"duplicate backend name {backend.name!r}")
        if other.address == backend.address:
            raise table.invalid(
                "address", f"{backend.address} is already the address of {other.name!r}"
            )
    return backend


def _service(
    table: Table, default_probe: ProbeSettings, pair: bool, found: list[Invalid]
) -> Service:
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
        backends=_backends(table, public, pair, found),
    )


def _services(
    root: Table, default_probe: ProbeSettings, pair: bool, found: list[Invalid]
) -> tuple[Service, ...]:
    """The valid services; every problem of the others goes to ``found``."""
    services: list[Service] = []
    # Indexes of what earlier services took, so a thousand services are
    # checked in linear time; the first conflict in file order is reported.
    by_name: dict[str, int] = {}
    by_public: dict[Endpoint, int] = {}
    by_address: dict[Endpoint, tuple[int, str]] = {}
    by_agent: dict[tuple[Endpoint, bytes], str] = {}
    for table in root.tables("service", "[[service]]", _SERVICE_KEYS):
        in_backends: list[Invalid] = []
        try:
            service = _service(table, default_probe, pair, in_backends)
        except Invalid as exc:
            found.append(exc)
            continue
        if in_backends:
            found.extend(in_backends)
            continue
        try:
            _conflicts(table, service, services, pair, by_name, by_public, by_address, by_agent)
        except Invalid as exc:
            found.append(exc)
            continue
        position = len(services)
        by_name.setdefault(service.name, position)
        by_public.setdefault(service.public, position)
        for backend in service.backends:
            by_address.setdefault(backend.address, (position, backend.name))
        services.append(service)
    return tuple(services)


def _conflicts(
    table: Table,
    service: Service,
    services: list[Service],
    pair: bool,
    by_name: dict[str, int],
    by_public: dict[Endpoint, int],
    by_address: dict[Endpoint, tuple[int, str]],
    by_agent: dict[tuple[Endpoint, bytes], str],
) -> None:
    """Raises Invalid where ``service`` takes what an earlier one has."""
    if pair:
        # An agent records one activation epoch per interface: two services
        # on one interface would read each other's choices.
        for index, backend in enumerate(service.backends):
            if backend.agent is None:
                continue
            owner = by_agent.setdefault((backend.agent, service.server_public_key), service.name)
            if owner != service.name:
                raise Invalid(
                    (*table.at("backend"), index, "agent"),
                    f"the agent at {backend.agent} already serves service {owner!r} with "
                    "the same server key; in a pair each WireGuard interface serves one "
                    "service",
                )
    conflicts: list[tuple[int, int, int]] = []  # (earlier service, kind, backend index)
    if service.name in by_name:
        conflicts.append((by_name[service.name], 0, 0))
    if service.public in by_public:
        conflicts.append((by_public[service.public], 1, 0))
    for index, backend in enumerate(service.backends):
        if backend.address in by_address:
            conflicts.append((by_address[backend.address][0], 2, index))
    if conflicts:
        other_index, kind, index = min(conflicts)
        other = services[other_index]
        if kind == 0:
            raise table.invalid("name", f"duplicate service name {service.name!r}")
        if kind == 1:
            raise table.invalid(
                "public", f"{service.public} is already the public endpoint of {other.name!r}"
            )
        # One address behind two public endpoints: its own packets
        # could leave as only one of them (one SNAT per source).
        backend = service.backends[index]
        taken = by_address[backend.address][1]
        raise Invalid(
            (*table.at("backend"), index, "address"),
            f"{backend.address} is already the address of backend "
            f"{taken!r} of service {other.name!r}; a backend serves one service",
        )


def build(data: object, path: Path) -> Config:
    """The model of a parsed document; raises Invalid with the first problem
    (:class:`InvalidAll` when there are more: every table is checked)."""
    root = Table(data, (), _ROOT_KEYS, _base_dir(path))
    found: list[Invalid] = []
    daemon, probe = DEFAULT_DAEMON, DEFAULT_PROBE
    try:
        daemon = _daemon(root.sub("daemon", _DAEMON_KEYS))
    except Invalid as exc:
        found.append(exc)
    try:
        probe = _probe(root.sub("probe", _PROBE_KEYS), DEFAULT_PROBE)
    except Invalid as exc:
        found.append(exc)
    services: tuple[Service, ...] = ()
    try:
        services = _services(root, probe, daemon.pair, found)
    except Invalid as exc:  # no [[service]] array at all, or not one
        found.append(exc)
    if not found:
        problems = ruleset.validate(services)
        if problems:
            raise Invalid(("service",), problems[0])
    if len(found) == 1:
        raise found[0]
    if found:
        raise InvalidAll(found)
    return Config(path, daemon, probe, services)


def _base_dir(path: Path) -> Path:
    try:
        return Path(os.path.abspath(path)).parent
    except (OSError, ValueError):  # the working directory is gone
        return path.parent
