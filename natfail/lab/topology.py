"""The lab's shape: namespace roles, veths, a bridge, addresses and routes.

Topology (every name carries the lab's random id, so two labs never collide)::

    client  nf<id>-cl          gateway  nf<id>-gw               backend  nf<id>-b0, -b1 ...
    eth0 198.51.100.2/24 ─veth─ wan 198.51.100.1/24   br0 ─veth─ eth0 10.0.0.2/24, .3 ...
         2001:db8:1::2/64           2001:db8:1::1/64  (vb0..)         fd00::2/64, ::3 ...
    route 203.0.113.0/24,           public 203.0.113.10/32          default via 10.0.0.1,
          2001:db8::/64 via gw             2001:db8::10/128                     fd00::1
    wc<id> 10.99.0.2/24             br0 10.0.0.1/24 fd00::1/64      wb<id>0 10.99.0.1/24
           fd99::2/64               ip_forward, ipv6 forwarding             fd99::1/64, :51820

The client has no default route: if its WireGuard ever roams to a backend's
private address, it cannot reach it (which is exactly the failure natfail's SNAT
prevents). Nothing here installs a firewall rule except :func:`static_dnat_script`,
the scaffolding of tests that prove the lab itself."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from natfail.lab.processes import ip_batch, ns_argv, run
from natfail.lab.wireguard import WgProcess

if TYPE_CHECKING:
    from natfail.lab.lab import Lab

PUBLIC_V4: Final = "203.0.113.10"
PUBLIC_V6: Final = "2001:db8::10"
PUBLIC_PORT: Final = 51820
PUBLIC_NET_V4: Final = "203.0.113.0/24"
PUBLIC_NET_V6: Final = "2001:db8::/64"

GATEWAY_WAN_V4: Final = "198.51.100.1"
CLIENT_WAN_V4: Final = "198.51.100.2"
WAN_PREFIXLEN_V4: Final = 24
GATEWAY_WAN_V6: Final = "2001:db8:1::1"
CLIENT_WAN_V6: Final = "2001:db8:1::2"
WAN_PREFIXLEN_V6: Final = 64

GATEWAY_LAN_V4: Final = "10.0.0.1"
GATEWAY_LAN_V6: Final = "fd00::1"
LAN_PREFIXLEN_V4: Final = 24
LAN_PREFIXLEN_V6: Final = 64

SERVER_TUNNEL_V4: Final = "10.99.0.1"
SERVER_TUNNEL_V6: Final = "fd99::1"
CLIENT_TUNNEL_V4: Final = "10.99.0.2"
CLIENT_TUNNEL_V6: Final = "fd99::2"

GATEWAY_WAN_IF: Final = "wan"
GATEWAY_LAN_IF: Final = "br0"
NODE_IF: Final = "eth0"  # the one link of the client and of each backend

BACKEND_NAMES: Final = "abcdefghijklmnopqrstuvwxyz"


def public_endpoint(family: int) -> str:
    """The public address:port, IPv4 (4) or IPv6 (6)."""
    return f"[{PUBLIC_V6}]:{PUBLIC_PORT}" if family == 6 else f"{PUBLIC_V4}:{PUBLIC_PORT}"


@dataclass(frozen=True)
class LabGateway:
    """The gateway namespace: owns the public addresses, routes between wan and br0."""

    ns: str
    wan_if: str = GATEWAY_WAN_IF
    lan_if: str = GATEWAY_LAN_IF
    wan_v4: str = GATEWAY_WAN_V4
    wan_v6: str = GATEWAY_WAN_V6
    lan_v4: str = GATEWAY_LAN_V4
    lan_v6: str = GATEWAY_LAN_V6


@dataclass(frozen=True)
class LabClient:
    """The client namespace with its wireguard-go interface."""

    ns: str
    wg_if: str
    v4: str = CLIENT_WAN_V4
    v6: str = CLIENT_WAN_V6
    tunnel_v4: str = CLIENT_TUNNEL_V4
    tunnel_v6: str = CLIENT_TUNNEL_V6


@dataclass
class LabBackend:
    """One backend namespace with its wireguard-go (port 51820, the shared server key)."""

    name: str
    index: int
    ns: str
    wg_if: str
    v4: str
    v6: str | None
    port: int = PUBLIC_PORT
    tunnel_v4: str = SERVER_TUNNEL_V4
    tunnel_v6: str = SERVER_TUNNEL_V6
    _lab: Lab | None = field(default=None, repr=False, compare=False)
    _wg: WgProcess | None = field(default=None, repr=False, compare=False)

    @property
    def address(self) -> str:
        """``10.0.0.2:51820``, as natfail's config wants a backend address."""
        return f"{self.v4}:{self.port}"

    @property
    def address_v6(self) -> str | None:
        return f"[{self.v6}]:{self.port}" if self.v6 else None

    @property
    def running(self) -> bool:
        return self._wg is not None and self._wg.running

    @property
    def paused(self) -> bool:
        return self.running and self._wg is not None and self._wg.paused

    @property
    def pid(self) -> int | None:
        return self._wg.proc.pid if self._wg and self._wg.proc and self.running else None

    def stop(self) -> None:
        """Kills the backend's wireguard-go: a dead backend (UDP port closed, no interface)."""
        if self._wg is not None:
            self._wg.stop()

    def start(self) -> None:
        """Starts wireguard-go again with the same configuration (fresh sessions)."""
        if self._lab is None:
            raise RuntimeError("backend does not belong to a lab")
        self._lab._start_backends([self])

    def pause(self) -> None:
        """SIGSTOP: a hung backend; packets queue, nothing answers, no ICMP error. Its
        control socket does not answer either, so the lab reports no counters for it."""
        if self._wg is None:
            raise RuntimeError("backend was never started")
        self._wg.signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._wg is None:
            raise RuntimeError("backend was never started")
        self._wg.signal(signal.SIGCONT)


def build_network(
    gw: LabGateway, cl: LabClient, backends: Sequence[LabBackend], *, ipv6: bool
) -> None:
    """Creates the namespaces and wires them as the module's picture shows."""
    namespaces = [gw.ns, cl.ns, *(b.ns for b in backends)]
    for ns in namespaces:
        run(["ip", "netns", "add", ns])
    for ns in namespaces:
        sysctls = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
        if ipv6:
            sysctls += ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        if ns == gw.ns:
            sysctls.append("net.ipv4.ip_forward=1")
            if ipv6:
                sysctls.append("net.ipv6.conf.all.forwarding=1")
        run(ns_argv(ns, ["sysctl", "-q", "-w", *sysctls]))

    cmds = [
        "link set lo up",
        f"link add {gw.wan_if} type veth peer name {NODE_IF} netns {cl.ns}",
        f"addr add {gw.wan_v4}/{WAN_PREFIXLEN_V4} dev {gw.wan_if}",
        f"addr add {PUBLIC_V4}/32 dev {gw.wan_if}",
        f"link add {gw.lan_if} type bridge stp_state 0 mcast_snooping 0",
        f"addr add {gw.lan_v4}/{LAN_PREFIXLEN_V4} dev {gw.lan_if}",
    ]
    if ipv6:
        cmds += [
            f"addr add {gw.wan_v6}/{WAN_PREFIXLEN_V6} dev {gw.wan_if} nodad",
            f"addr add {PUBLIC_V6}/128 dev {gw.wan_if} nodad",
            f"addr add {gw.lan_v6}/{LAN_PREFIXLEN_V6} dev {gw.lan_if} nodad",
        ]
    cmds += [f"link set {gw.wan_if} up", f"link set {gw.lan_if} up"]
    for b in backends:
        port = f"vb{b.index}"
        cmds += [
            f"link add {port} type veth peer name {NODE_IF} netns {b.ns}",
            f"link set {port} master {gw.lan_if}",
            f"link set {port} up",
        ]
    ip_batch(gw.ns, cmds)

    configure_client(cl, ipv6, f"via {gw.wan_v4}", f"via {gw.wan_v6}")
    configure_backends(backends, gw.lan_v4, gw.lan_v6)


def configure_client(cl: LabClient, ipv6: bool, route_v4: str, route_v6: str) -> None:
    """The client's one link, and its routes to the public prefixes (``via X``
    or ``dev Y``); no default route."""
    cmds = [
        "link set lo up",
        f"addr add {cl.v4}/{WAN_PREFIXLEN_V4} dev {NODE_IF}",
        f"link set {NODE_IF} up",
        f"route add {PUBLIC_NET_V4} {route_v4}",
    ]
    if ipv6:
        cmds[2:2] = [f"addr add {cl.v6}/{WAN_PREFIXLEN_V6} dev {NODE_IF} nodad"]
        cmds.append(f"route add {PUBLIC_NET_V6} {route_v6}")
    ip_batch(cl.ns, cmds)


def configure_backends(backends: Sequence[LabBackend], gateway_v4: str, gateway_v6: str) -> None:
    """Each backend's one link, with its default route via the gateway's address."""
    for b in backends:
        cmds = [
            "link set lo up",
            f"addr add {b.v4}/{LAN_PREFIXLEN_V4} dev {NODE_IF}",
            f"link set {NODE_IF} up",
            f"route add default via {gateway_v4}",
        ]
        if b.v6:
            cmds[2:2] = [f"addr add {b.v6}/{LAN_PREFIXLEN_V6} dev {NODE_IF} nodad"]
            cmds.append(f"route add ::/0 via {gateway_v6}")
        ip_batch(b.ns, cmds)


def static_dnat_script(v4: LabBackend | None, v6: LabBackend | None, *, ipv6: bool) -> str:
    """An ``nft -f`` script pointing public:51820 at the given backend(s) with a fixed
    DNAT in tables of the lab's own (``ip labstatic`` / ``ip6 labstatic``); None for
    both removes it. Not natfail."""
    table = "labstatic"
    script = [f"table ip {table} {{}}", f"delete table ip {table}"]
    if ipv6:
        script += [f"table ip6 {table} {{}}", f"delete table ip6 {table}"]
    chain = "type nat hook prerouting priority dstnat; policy accept;"
    if v4 is not None:
        script.append(
            f"table ip {table} {{\n chain pre {{\n  {chain}\n"
            f"  ip daddr {PUBLIC_V4} udp dport {PUBLIC_PORT} dnat to {v4.address}\n }}\n}}"
        )
    if v6 is not None:
        script.append(
            f"table ip6 {table} {{\n chain pre {{\n  {chain}\n"
            f"  ip6 daddr {PUBLIC_V6} udp dport {PUBLIC_PORT} dnat to {v6.address_v6}\n }}\n}}"
        )
    return "\n".join(script) + "\n"
