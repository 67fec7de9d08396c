"""The frozen model every layer shares: endpoints, backends, services, the
probe and daemon settings, the whole config.

:mod:`natfail.config` reads TOML into it; the core decides over it; the
edges take their addresses from it. Pure: it reads no file and opens no
socket (parsing an endpoint is only string work)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from natfail.core.selector import Failback
from natfail.locations import DEFAULT_SOCKET

Firewall = Literal["nftables", "iptables"]
SourceNat = Literal["preserve", "masquerade"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def show(text: str, limit: int = 60) -> str:
    """A user value for a message: quoted, one line, never huge."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return repr(text)


def kind(value: object) -> str:
    """What the user wrote, in TOML words, for 'must be X, not Y'."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return "a date/time" if type(value).__module__ == "datetime" else type(value).__name__


_PORT_RE: Final = re.compile(r"[0-9]{1,5}")
_HOST_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE: Final = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")
_FORMS: Final = "write IPv4:port or [IPv6]:port"


def split_host_port(text: str) -> tuple[str, bool, int]:
    """'1.2.3.4:5' → ('1.2.3.4', False, 5); '[::1]:5' → ('::1', True, 5).
    Raises ValueError with a message that starts with the quoted input."""
    if not isinstance(text, str):
        raise ValueError(f"must be a string, not {kind(text)}")
    shown = show(text)
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ValueError(f"{shown}: missing ']' after the IPv6 address")
        host, rest = text[1:close], text[close + 1 :]
        if not rest:
            raise ValueError(f"{shown}: missing ':port' ({_FORMS})")
        if not rest.startswith(":"):
            raise ValueError(f"{shown}: expected ':port' after ']' ({_FORMS})")
        return host, True, _parse_port(rest[1:], shown)
    colons = text.count(":")
    if colons == 0:
        raise ValueError(f"{shown}: missing ':port' ({_FORMS})")
    if colons > 1:
        raise ValueError(f"{shown}: an IPv6 address needs brackets: [IPv6]:port")
    host, port_text = text.split(":")
    return host, False, _parse_port(port_text, shown)


def _parse_port(text: str, shown: str) -> int:
    if not _PORT_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"{shown}: the port must be a number from 1 to 65535")
    return int(text)


def looks_like_hostname(host: str) -> bool:
    # A final label of digits only is a mangled IPv4 address, not a name.
    return bool(_HOSTNAME_RE.fullmatch(host)) and not host.rstrip(".").split(".")[-1].isdigit()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A UDP endpoint given as an IP literal: ``1.2.3.4:51820`` or
    ``[2001:db8::1]:51820``."""

    ip: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            raise ValueError(f"not an IP address: {self.ip!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise ValueError(f"port must be an integer, not {kind(self.port)}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not in 1..65535")

    @property
    def family(self) -> int:
        """4 or 6."""
        return self.ip.version

    def sockaddr(self) -> tuple[str, int]:
        """The address as the socket module wants it."""
        return str(self.ip), self.port

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """Parse ``IPv4:port`` or ``[IPv6]:port``; no hostnames, no scope
        ids, unicast only. Raises ValueError with a one-line reason."""
        host, bracketed, port = split_host_port(text)
        shown = show(text)
        if bracketed:
            if "%" in host:
                raise ValueError(f"{shown}: an IPv6 scope id (%...) is not supported")
            try:
                ip: IPAddress = ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{shown}: {show(host)} is not an IPv6 address") from None
        else:
            try:
                ip = ipaddress.IPv4Address(host)
            except ValueError:
                if looks_like_hostname(host):
                    raise ValueError(
                        f"{shown}: {show(host)} is a hostname; give an IP address ({_FORMS})"
                    ) from None
                raise ValueError(f"{shown}: {show(host)} is not an IPv4 address") from None
        if ip.is_unspecified or ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
            raise ValueError(f"{shown}: must be a unicast address")
        return cls(ip, port)


@dataclass(frozen=True, slots=True)
class ProbeSettings:
    private_key_file: Path = Path("/etc/natfail/probe.key")
    interval: float = 1.0  # seconds between probes of one backend
    timeout: float = 0.5  # seconds to wait for the handshake response
    rise: int = 2  # consecutive successes before a backend is up
    fall: int = 3  # consecutive failures before a backend is down


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    address: Endpoint
    priority: int  # higher wins
    agent: Endpoint | None = None  # the backend host's natfail agent, if it runs one


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    public: Endpoint
    inbound_interface: str | None
    server_public_key: bytes  # 32 raw bytes
    preshared_key_file: Path | None
    failback: Failback
    preempt_delay: float
    source_nat: SourceNat
    notify: Path | None
    probe: ProbeSettings  # effective: [probe] with [service.probe] applied
    backends: tuple[Backend, ...]

    def backend(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    firewall: Firewall = "nftables"
    socket: Path = DEFAULT_SOCKET
    state_dir: Path = Path("/var/lib/natfail")
    metrics_listen: str = ""  # "" = no metrics endpoint
    pair: bool = False  # one of a keepalived pair: decide only while holding the public address


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    daemon: DaemonSettings
    probe: ProbeSettings  # the [probe] defaults
    services: tuple[Service, ...]

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)
