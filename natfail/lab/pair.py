"""A pair lab: a client, two gateways under keepalived (VRRP) and N backends, in network
namespaces, with real wireguard-go, built in the constructor and torn down by
:meth:`PairLab.close`.

Topology (every name carries the lab's random id, like :mod:`natfail.lab.topology`)::

    client nf<id>-cl           switch nf<id>-sw               gateways nf<id>-gw1, -gw2
    eth0 198.51.100.2/24 ──── bridge "pub" ───────────────── wan 198.51.100.11/24, .12/24
         2001:db8:1::2/64                                         2001:db8:1::11/64, ::12/64
    route 203.0.113.0/24 dev eth0,                             VIPs (on the VRRP master):
          2001:db8::/64 dev eth0                                  203.0.113.10/32
                                                                  2001:db8::10/128
                                                               lan 10.0.0.251/24, .252/24
    backends nf<id>-b0, -b1 ...                                    fd00::251/64, ::252/64
    eth0 10.0.0.2/24, .3 ... ──── bridge "ins" ───────────── VIPs: 10.0.0.1/24, fd00::1/64
         fd00::2/64, ::3 ...
    default via 10.0.0.1, fd00::1 (the inside VIPs)

The client and both gateways share one L2 segment, and the client routes the public
prefixes straight onto it: ARP and neighbour discovery resolve the public VIP to the
master's MAC, and keepalived's gratuitous ARP / unsolicited NA on takeover repoint
the client (and the backends, for the inside VIP) at the new master.

keepalived (Debian's) runs in each gateway namespace in the foreground with its own
config, pid files and log under the lab's directory: VRRPv3, two instances
(``public`` on ``wan``, ``inside`` on ``lan``) in one ``vrrp_sync_group``, both
``state BACKUP`` with ``nopreempt``, priorities 150 (gw1) and 100 (gw2), the IPv6
VIPs as ``virtual_ipaddress_excluded`` of the instance of their link.

WireGuard is as in :class:`natfail.lab.Lab` (the class this one extends): the
server key on every backend, the client as a peer; but each gateway has a probe
key of its own, and every backend has both as peers. ``probe_key`` (what
:class:`Lab` and its readings know) is gw1's; ``probe_keys`` has both."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from natfail.lab import config_file, leftovers
from natfail.lab.agents import LabAgents
from natfail.lab.lab import Lab
from natfail.lab.processes import (
    LabError,
    ip_batch,
    kill_pids,
    ns_argv,
    ns_pids,
    proc_starttime,
    run,
    wait_until,
)
from natfail.lab.topology import (
    CLIENT_TUNNEL_V4,
    CLIENT_TUNNEL_V6,
    LAN_PREFIXLEN_V4,
    LAN_PREFIXLEN_V6,
    NODE_IF,
    PUBLIC_PORT,
    PUBLIC_V4,
    PUBLIC_V6,
    SERVER_TUNNEL_V4,
    SERVER_TUNNEL_V6,
    WAN_PREFIXLEN_V4,
    WAN_PREFIXLEN_V6,
    LabBackend,
    LabClient,
    LabGateway,
    configure_backends,
    configure_client,
    public_endpoint,
    static_dnat_script,
)
from natfail.lab.wireguard import (
    WgKey,
    genkey,
    new_key,
    server_argv,
    tunnel_cmds,
    write_secret,
)
from natfail.oneline import one_line

PAIR_WAN_IF: Final = "wan"
PAIR_LAN_IF: Final = "lan"
INSIDE_VIP_V4: Final = "10.0.0.1"  # the backends' default gateway
INSIDE_VIP_V6: Final = "fd00::1"
GATEWAY_NAMES: Final = ("gw1", "gw2")
GATEWAY_WAN_V4S: Final = ("198.51.100.11", "198.51.100.12")
GATEWAY_WAN_V6S: Final = ("2001:db8:1::11", "2001:db8:1::12")
GATEWAY_LAN_V4S: Final = ("10.0.0.251", "10.0.0.252")
GATEWAY_LAN_V6S: Final = ("fd00::251", "fd00::252")
PRIORITIES: Final = (150, 100)
VRID_PUBLIC: Final = 51
VRID_INSIDE: Final = 52
SWITCH_PUBLIC: Final = "pub"
SWITCH_INSIDE: Final = "ins"
KEEPALIVED_STOP: Final = 5.0


@dataclass(frozen=True)
class PairGateway(LabGateway):
    """One gateway of the pair. ``wan_v4`` ... ``lan_v6`` are its own addresses; the
    VIPs (``PUBLIC_V4``, ``PUBLIC_V6``, ``INSIDE_VIP_V4``, ``INSIDE_VIP_V6``) come and
    go with keepalived."""

    name: str = "gw1"
    index: int = 0
    priority: int = PRIORITIES[0]

    @property
    def vips(self) -> dict[str, str]:
        """VIP -> the interface keepalived puts it on (IPv4 and IPv6)."""
        return {
            PUBLIC_V4: self.wan_if,
            PUBLIC_V6: self.wan_if,
            INSIDE_VIP_V4: self.lan_if,
            INSIDE_VIP_V6: self.lan_if,
        }


def _gateway(base: str, i: int) -> PairGateway:
    return PairGateway(
        ns=f"{base}-{GATEWAY_NAMES[i]}",
        wan_if=PAIR_WAN_IF,
        lan_if=PAIR_LAN_IF,
        wan_v4=GATEWAY_WAN_V4S[i],
        wan_v6=GATEWAY_WAN_V6S[i],
        lan_v4=GATEWAY_LAN_V4S[i],
        lan_v6=GATEWAY_LAN_V6S[i],
        name=GATEWAY_NAMES[i],
        index=i,
        priority=PRIORITIES[i],
    )


# -- topology ------------------------------------------------------------------------------


def build_pair_network(
    switch: str,
    gateways: Sequence[PairGateway],
    cl: LabClient,
    backends: Sequence[LabBackend],
    *,
    ipv6: bool,
) -> None:
    """Creates the namespaces and wires them as the module's picture shows (no VIPs:
    keepalived adds them)."""
    namespaces = [switch, cl.ns, *(g.ns for g in gateways), *(b.ns for b in backends)]
    for ns in namespaces:
        run(["ip", "netns", "add", ns])
    gw_names = {g.ns for g in gateways}
    for ns in namespaces:
        sysctls = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
        if ns == switch:
            sysctls += ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
        elif ipv6:
            sysctls += ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
        if ns in gw_names:
            sysctls.append("net.ipv4.ip_forward=1")
            if ipv6:
                sysctls.append("net.ipv6.conf.all.forwarding=1")
        run(ns_argv(ns, ["sysctl", "-q", "-w", *sysctls]))

    bridge = "type bridge stp_state 0 mcast_snooping 0"
    cmds = [
        "link set lo up",
        f"link add {SWITCH_PUBLIC} {bridge}",
        f"link add {SWITCH_INSIDE} {bridge}",
    ]
    ports: list[tuple[str, str, str, str]] = [(f"p-{cl.ns[-2:]}", NODE_IF, cl.ns, SWITCH_PUBLIC)]
    for g in gateways:
        ports.append((f"p-{g.name}", g.wan_if, g.ns, SWITCH_PUBLIC))
        ports.append((f"i-{g.name}", g.lan_if, g.ns, SWITCH_INSIDE))
    for b in backends:
        ports.append((f"i-b{b.index}", NODE_IF, b.ns, SWITCH_INSIDE))
    for port, peer, ns, br in ports:
        cmds += [
            f"link add {port} type veth peer name {peer} netns {ns}",
            f"link set {port} master {br}",
            f"link set {port} up",
        ]
    cmds += [f"link set {SWITCH_PUBLIC} up", f"link set {SWITCH_INSIDE} up"]
    ip_batch(switch, cmds)

    for g in gateways:
        cmds = [
            "link set lo up",
            f"addr add {g.wan_v4}/{WAN_PREFIXLEN_V4} dev {g.wan_if}",
            f"addr add {g.lan_v4}/{LAN_PREFIXLEN_V4} dev {g.lan_if}",
        ]
        if ipv6:
            cmds += [
                f"addr add {g.wan_v6}/{WAN_PREFIXLEN_V6} dev {g.wan_if} nodad",
                f"addr add {g.lan_v6}/{LAN_PREFIXLEN_V6} dev {g.lan_if} nodad",
            ]
        cmds += [f"link set {g.wan_if} up", f"link set {g.lan_if} up"]
        ip_batch(g.ns, cmds)

    # The client reaches the VIPs on its own segment (ARP/NDP find the master).
    configure_client(cl, ipv6, f"dev {NODE_IF}", f"dev {NODE_IF}")
    configure_backends(backends, INSIDE_VIP_V4, INSIDE_VIP_V6)


# -- keepalived ----------------------------------------------------------------------------


def keepalived_config(
    gw: PairGateway,
    peer: PairGateway,
    *,
    router_id: str,
    advert_int: float,
    unicast: bool,
    ipv6: bool,
    garp_refresh: int = 10,
) -> str:
    """keepalived.conf for one gateway of the pair (see etc/keepalived.conf for the
    operator's version with its reasons)."""

    def instance(
        name: str, vrid: int, ifname: str, own: str, other: str, vips: str, ex: str
    ) -> str:
        lines = [
            f"vrrp_instance {name} {{",
            "    state BACKUP",
            "    nopreempt",
            f"    interface {ifname}",
            f"    virtual_router_id {vrid}",
            f"    priority {gw.priority}",
            f"    advert_int {advert_int:g}",
        ]
        if unicast:
            lines += [f"    unicast_src_ip {own}", f"    unicast_peer {{\n        {other}\n    }}"]
        lines.append(f"    virtual_ipaddress {{\n        {vips}\n    }}")
        if ex:
            lines.append(f"    virtual_ipaddress_excluded {{\n        {ex}\n    }}")
        lines.append("}")
        return "\n".join(lines)

    pub_ex = f"{PUBLIC_V6}/128 dev {gw.wan_if} preferred_lft forever" if ipv6 else ""
    ins_ex = f"{INSIDE_VIP_V6}/{LAN_PREFIXLEN_V6} dev {gw.lan_if}" if ipv6 else ""
    return "\n".join(
        [
            "global_defs {",
            f"    router_id {router_id}",
            "    vrrp_version 3",
            f"    vrrp_garp_master_refresh {garp_refresh}",
            "    vrrp_garp_master_delay 1",
            # real-time scheduling: adverts keep their pace on a loaded machine
            "    vrrp_rt_priority 50",
            "}",
            "vrrp_sync_group natfail {",
            "    group {\n        public\n        inside\n    }",
            "}",
            instance(
                "public",
                VRID_PUBLIC,
                gw.wan_if,
                gw.wan_v4,
                peer.wan_v4,
                f"{PUBLIC_V4}/32 dev {gw.wan_if}",
                pub_ex,
            ),
            instance(
                "inside",
                VRID_INSIDE,
                gw.lan_if,
                gw.lan_v4,
                peer.lan_v4,
                f"{INSIDE_VIP_V4}/{LAN_PREFIXLEN_V4} dev {gw.lan_if}",
                ins_ex,
            ),
            "",
        ]
    )


class PairAgents(LabAgents):
    """``natfail agent`` on the backends of a pair lab, obeying both gateways' probe keys."""

    lab: PairLab

    def __init__(self, lab: PairLab) -> None:
        super().__init__(lab)

    def gateway_keys(self) -> list[str]:
        return [k.public_b64 for k in self.lab.probe_keys.values()]


# -- the lab -------------------------------------------------------------------------------


class PairLab(Lab):
    """A client, two gateways under keepalived and N backends, with real WireGuard.

    Built in the constructor; keepalived starts on both gateways unless
    ``keepalived=False`` (then :meth:`start_keepalived`). A context manager;
    :meth:`close` is idempotent, never raises and is registered with atexit.

    Of :class:`Lab`'s single-gateway API: ``gateway`` is gw1 (the default namespace
    of :class:`natfail.lab.DaemonRunner`: pass ``ns=`` for gw2), ``probe_key`` is
    gw1's probe key; :meth:`set_static_dnat` and :meth:`flush_conntrack` act on both
    gateways unless given ``gw``; :meth:`write_config` needs ``gw``."""

    def __init__(
        self,
        backends: int = 2,
        *,
        keepalive: int | None = None,
        ipv6: bool = True,
        client_endpoint_family: int = 4,
        preshared_key: bool = False,
        prefix: str = "nf",
        wg_log_level: str = "error",
        clean_stale: bool = True,
        advert_int: float = 0.2,
        unicast: bool = False,
        keepalived: bool = True,
    ) -> None:
        if not 0.01 <= advert_int <= 40.95:
            raise ValueError("advert_int must be 0.01..40.95 seconds (VRRPv3 centiseconds)")
        # Lab.__init__ builds the single-gateway topology: what it sets is set here
        # instead, so that Lab's client, backend and teardown methods work unchanged.
        base = self._begin(
            backends, keepalive, ipv6, client_endpoint_family, prefix, wg_log_level, clean_stale
        )
        self.advert_int = advert_int
        self.unicast = unicast
        self._keepalived: dict[str, subprocess.Popen[str]] = {}
        self.switch = f"{base}-sw"
        self.gw1 = _gateway(base, 0)
        self.gw2 = _gateway(base, 1)
        self.gateways: tuple[PairGateway, PairGateway] = (self.gw1, self.gw2)
        self.gateway = self.gw1
        namespaces = [
            self.switch,
            self.client.ns,
            *(g.ns for g in self.gateways),
            *(b.ns for b in self.backends),
        ]
        super(Lab, self).__init__(f"pair lab {self.id}", namespaces)
        self.ifnames: set[str] = {self.client.wg_if} | {b.wg_if for b in self.backends}
        self.dir = Path(tempfile.mkdtemp(prefix=f"natfail-lab-{self.id}-"))
        atexit.register(self._close_at_exit)
        try:
            leftovers.write_marker(self.id, prefix, self.namespaces, self.ifnames, [self.dir])
            for g in self.gateways:
                self.gateway_dir(g).mkdir(mode=0o700)
            self.server_key = new_key(self.dir, "server")
            self.client_key = new_key(self.dir, "client")
            self.probe_keys: dict[str, WgKey] = {
                g.name: new_key(self.gateway_dir(g), "probe") for g in self.gateways
            }
            self.probe_key = self.probe_keys[self.gw1.name]
            self.psk: str | None = None
            self.psk_file: Path | None = None
            if preshared_key:
                self.psk = genkey()
                self.psk_file = self.dir / "probe.psk"
                write_secret(self.psk_file, self.psk)
            self._client_wg = self._wg(self.client.ns, self.client.wg_if, "client")
            for b in self.backends:
                b._wg = self._wg(b.ns, b.wg_if, f"backend-{b.name}")
            build_pair_network(self.switch, self.gateways, self.client, self.backends, ipv6=ipv6)
            self._start_backends(self.backends)
            self._start_client()
            if keepalived:
                for g in self.gateways:
                    self.start_keepalived(g)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PairLab:
        return self

    def __repr__(self) -> str:
        state = "closed" if self._closed else "up"
        return f"<PairLab {self.id} {state}: 2 gateways, {len(self.backends)} backends>"

    # -- WireGuard -------------------------------------------------------------------------

    def _start_backends(self, backends: Sequence[LabBackend]) -> None:
        """Like :meth:`Lab._start_backends`, with every gateway's probe key as a peer."""
        self._check_open()
        wgs = [b._wg for b in backends if b._wg is not None]
        for wg in wgs:
            wg.spawn()
        client_ips = f"{CLIENT_TUNNEL_V4}/32" + (f",{CLIENT_TUNNEL_V6}/128" if self.ipv6 else "")
        first, *others = self.probe_keys.values()
        for b in backends:
            assert b._wg is not None
            b._wg.wait_ready()
            argv = server_argv(
                b.wg_if,
                b.port,
                self.server_key.file,
                self.client_key.public_b64,
                client_ips,
                first.public_b64,
                self.psk_file,
            )
            for key in others:
                argv += ["peer", key.public_b64]
                if self.psk_file is not None:
                    argv += ["preshared-key", str(self.psk_file)]
            run(ns_argv(b.ns, argv))
            v6 = self._tunnel_v6(SERVER_TUNNEL_V6)
            ip_batch(b.ns, tunnel_cmds(b.wg_if, SERVER_TUNNEL_V4, v6))

    # -- gateways --------------------------------------------------------------------------

    def gw(self, gw: PairGateway | str) -> PairGateway:
        """A gateway by name ("gw1", "gw2") or itself."""
        if isinstance(gw, PairGateway):
            if gw not in self.gateways:
                raise ValueError(f"{gw.ns} is not a gateway of pair lab {self.id}")
            return gw
        for g in self.gateways:
            if g.name == gw:
                return g
        raise KeyError(f"pair lab {self.id} has no gateway {gw!r}")

    def other(self, gw: PairGateway | str) -> PairGateway:
        """The other gateway of the pair."""
        g = self.gw(gw)
        return self.gw2 if g == self.gw1 else self.gw1

    def gateway_dir(self, gw: PairGateway | str) -> Path:
        """The directory of one gateway's files (probe key, natfail's config, socket and
        state, keepalived's config, pid files and log)."""
        return self.dir / self.gw(gw).name

    def keepalived_config_path(self, gw: PairGateway | str) -> Path:
        return self.gateway_dir(gw) / "keepalived.conf"

    def keepalived_log(self, gw: PairGateway | str) -> str:
        path = self.gateway_dir(gw) / "keepalived.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def write_keepalived_config(self, gw: PairGateway | str) -> Path:
        g = self.gw(gw)
        path = self.keepalived_config_path(g)
        path.write_text(
            keepalived_config(
                g,
                self.other(g),
                router_id=g.ns,
                advert_int=self.advert_int,
                unicast=self.unicast,
                ipv6=self.ipv6,
            )
        )
        return path

    def keepalived_running(self, gw: PairGateway | str) -> bool:
        proc = self._keepalived.get(self.gw(gw).name)
        return proc is not None and proc.poll() is None

    def start_keepalived(self, gw: PairGateway | str) -> None:
        """Starts keepalived (VRRP only, in the foreground, logging to the gateway's
        keepalived.log) in the gateway's namespace; it starts as BACKUP."""
        g = self.gw(gw)
        if self.keepalived_running(g):
            raise RuntimeError(f"keepalived already runs in {g.name}")
        d = self.gateway_dir(g)
        config = self.write_keepalived_config(g)
        pidfiles = [d / "keepalived.pid", d / "keepalived-vrrp.pid"]
        if not self._keepalived_pids(g):
            # a killed keepalived leaves its pid files, and its VRRP child may stay a
            # zombie nobody reaps: keepalived would take that for a live instance
            for f in pidfiles:
                f.unlink(missing_ok=True)
        argv = [
            "keepalived",
            "--vrrp", "--dont-fork", "--log-console", "--log-detail", "--no-syslog",
            "--use-file", str(config),
            "--pid", str(pidfiles[0]),
            "--vrrp_pid", str(pidfiles[1]),
        ]  # fmt: skip
        log_path = d / "keepalived.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "a") as out:
            proc = self.popen(g, argv, stdout=out, stderr=subprocess.STDOUT)
        self._keepalived[g.name] = proc

        def started() -> bool:
            return "(public) Entering" in self.keepalived_log(g)[offset:] or proc.poll() is not None

        wait_until(started, 5.0)
        if proc.poll() is not None or not started():
            tail = one_line(self.keepalived_log(g)[offset:][-800:])
            self.stop_keepalived(g)
            raise LabError(f"keepalived in {g.name} did not start: {tail}", argv)

    def _keepalived_pids(self, g: PairGateway) -> list[int]:
        """Live (not zombie) keepalived processes in the gateway's namespace."""
        pids = []
        for pid in ns_pids(g.ns):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() != "keepalived":
                    continue
                if proc_starttime(pid) is not None:
                    pids.append(pid)
        return pids

    def stop_keepalived(self, gw: PairGateway | str) -> None:
        """SIGTERM: a clean stop; keepalived removes its VIPs and sends priority 0 adverts,
        so the peer takes over at once."""
        g = self.gw(gw)
        proc = self._keepalived.pop(g.name, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(KEEPALIVED_STOP)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(2)
        kill_pids(self._keepalived_pids(g))

    def kill_gateway(self, gw: PairGateway | str) -> float:
        """A crash: SIGKILLs every process in the gateway's namespace (keepalived's VRRP
        child first, so that its parent's death cannot make it stop cleanly; natfail too),
        then takes its links down. The VIPs stay configured on the dead gateway, as on a
        machine that lost power, but unreachable. Returns the time.time() of the kill."""
        g = self.gw(gw)
        proc = self._keepalived.pop(g.name, None)
        parent = proc.pid if proc is not None else None
        pids = [p for p in ns_pids(g.ns) if p != parent]
        at = time.time()
        for pid in [*pids, *([parent] if parent else [])]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        ip_batch(g.ns, [f"link set {g.wan_if} down", f"link set {g.lan_if} down"])
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2)
        return at

    def revive_gateway(self, gw: PairGateway | str) -> None:
        """Brings a killed gateway's links up again, without the VIPs a crash left on it
        and without conntrack entries (a rebooted machine); keepalived is not started."""
        g = self.gw(gw)
        cmds = []
        for vip, ifname in g.vips.items():
            if self.ipv6 or ":" not in vip:
                plen = {PUBLIC_V4: 32, PUBLIC_V6: 128}.get(vip)
                plen = plen or (LAN_PREFIXLEN_V6 if ":" in vip else LAN_PREFIXLEN_V4)
                cmds.append(f"addr del {vip}/{plen} dev {ifname}")
        for cmd in cmds:  # one by one: a missing address fails only its own line
            run(["ip", "-n", g.ns, *cmd.split()], check=False)
        up = [f"link set {g.wan_if} up", f"link set {g.lan_if} up"]
        if self.ipv6:  # IPv6 addresses go with the link: its own come back
            up += [
                f"addr replace {g.wan_v6}/{WAN_PREFIXLEN_V6} dev {g.wan_if} nodad",
                f"addr replace {g.lan_v6}/{LAN_PREFIXLEN_V6} dev {g.lan_if} nodad",
            ]
        ip_batch(g.ns, up)
        self.flush_conntrack(gw=g)

    def gateway_up(self, gw: PairGateway | str) -> bool:
        """Whether the gateway's links are up (False after :meth:`kill_gateway`)."""
        g = self.gw(gw)
        cp = self.exec(g, ["ip", "-j", "link", "show", "dev", g.wan_if])
        links = json.loads(cp.stdout or "[]")
        return bool(links) and "UP" in links[0].get("flags", [])

    def addresses(self, gw: PairGateway | str) -> set[str]:
        """Every address on the gateway's wan and lan links (without prefix length)."""
        g = self.gw(gw)
        cp = self.exec(g, ["ip", "-j", "addr", "show"])
        found: set[str] = set()
        for link in json.loads(cp.stdout or "[]"):
            if link.get("ifname") in (g.wan_if, g.lan_if):
                found.update(a["local"] for a in link.get("addr_info", []) if "local" in a)
        return found

    def vips(self, gw: PairGateway | str) -> set[str]:
        """The VIPs the gateway holds now (IPv6 ones only in a lab with IPv6)."""
        g = self.gw(gw)
        return self.addresses(g) & set(g.vips)

    def holders(self, address: str = PUBLIC_V4) -> list[PairGateway]:
        """The gateways, with their links up, that hold ``address`` now."""
        return [g for g in self.gateways if self.gateway_up(g) and address in self.addresses(g)]

    def master(self) -> PairGateway | None:
        """The gateway (links up) that holds the public IPv4 VIP now; None when none or
        both do."""
        holders = self.holders(PUBLIC_V4)
        return holders[0] if len(holders) == 1 else None

    def wait_master(
        self,
        timeout: float = 10.0,
        *,
        gw: PairGateway | str | None = None,
        interval: float = 0.02,
    ) -> PairGateway | None:
        """Waits until one gateway (``gw`` if given) is master; returns it, None if none
        became master within ``timeout`` seconds."""
        want = self.gw(gw) if gw is not None else None
        found: list[PairGateway] = []

        def elected() -> bool:
            m = self.master()
            found[:] = [m] if m is not None else []
            return m is not None and (want is None or m == want)

        return found[0] if wait_until(elected, timeout, interval) else None

    def client_neighbour(self, address: str = PUBLIC_V4) -> str | None:
        """The MAC address the client's neighbour table has for ``address`` (None: none)."""
        cp = self.exec(self.client, ["ip", "-j", "neigh", "show", "to", address])
        for entry in json.loads(cp.stdout or "[]"):
            mac = entry.get("lladdr")
            if isinstance(mac, str):
                return mac
        return None

    def mac(self, gw: PairGateway | str, ifname: str | None = None) -> str:
        """The MAC address of a gateway's wan link (or of ``ifname``)."""
        g = self.gw(gw)
        cp = self.exec(g, ["ip", "-j", "link", "show", "dev", ifname or g.wan_if])
        return str(json.loads(cp.stdout)[0]["address"])

    # -- Lab's gateway helpers, for two gateways ----------------------------------------------

    def _targets(self, gw: PairGateway | str | None) -> tuple[PairGateway, ...]:
        return self.gateways if gw is None else (self.gw(gw),)

    def set_static_dnat(
        self,
        v4: LabBackend | None,
        v6: LabBackend | None = None,
        *,
        gw: PairGateway | str | None = None,
    ) -> None:
        """Lab's fixed DNAT (not natfail), in both gateways unless ``gw``."""
        script = static_dnat_script(v4, v6, ipv6=self.ipv6)
        for g in self._targets(gw):
            self.exec(g, ["nft", "-f", "-"], input=script)

    def flush_conntrack(self, *, gw: PairGateway | str | None = None) -> None:
        """Empties the conntrack table of both gateways (or of ``gw``); a gateway whose
        links are down is flushed too."""
        for g in self._targets(gw):
            for family in ("ipv4", "ipv6") if self.ipv6 else ("ipv4",):
                self.exec(g, ["conntrack", "-F", "-f", family], timeout=5.0)

    def write_config(
        self,
        path: Path | None = None,
        *,
        firewall: str = "nftables",
        service: str = "wg0",
        extra_service: str = "",
        agents: bool = False,
        gw: PairGateway | str | None = None,
        pair: bool = False,
        inbound_interface: bool = False,
    ) -> Path:
        """A natfail config for one gateway (``gw`` is required): one service on the
        public IPv4 address with every backend (priorities descending from a), socket,
        state and probe key of that gateway, under :meth:`gateway_dir`.

        ``agents``: every backend has its agent (see :class:`PairAgents`); ``pair``:
        writes ``[daemon] pair = true``; ``inbound_interface``: the service only
        matches traffic arriving on the gateway's wan link."""
        if gw is None:
            raise ValueError("a pair lab's config is one gateway's: give gw=")
        g = self.gw(gw)
        return config_file.write_config(
            self,
            path,
            firewall=firewall,
            service=service,
            extra_service=extra_service,
            agents=agents,
            directory=self.gateway_dir(g),
            probe_key_file=self.probe_keys[g.name].file,
            pair=pair,
            inbound_interface=g.wan_if if inbound_interface else None,
        )

    def agents(self) -> PairAgents:
        """A :class:`PairAgents` for this lab (nothing started yet)."""
        return PairAgents(self)

    def describe(self) -> str:
        lines = [
            f"pair lab {self.id}: switch {self.switch}; VIPs {PUBLIC_V4}"
            + (f", {PUBLIC_V6}" if self.ipv6 else "")
            + f" port {PUBLIC_PORT} and inside {INSIDE_VIP_V4}"
            + (f", {INSIDE_VIP_V6}" if self.ipv6 else ""),
        ]
        for g in self.gateways:
            lines.append(
                f"  gateway {g.name}: {g.ns} wan {g.wan_if} {g.wan_v4} lan {g.lan_if} {g.lan_v4}"
                f" priority {g.priority} probe key {self.probe_keys[g.name].public_b64}"
            )
        lines.append(
            f"  client {self.client.ns} wg {self.client.wg_if} tunnel {CLIENT_TUNNEL_V4}"
            f" -> endpoint {public_endpoint(self.client_endpoint_family)}"
        )
        for b in self.backends:
            v6 = f" {b.address_v6}" if b.address_v6 else ""
            lines.append(f"  backend {b.name}: {b.ns} wg {b.wg_if} {b.address}{v6}")
        lines.append(f"  server public key {self.server_key.public_b64}")
        return "\n".join(lines)
