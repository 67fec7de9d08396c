"""The lab: a client, a gateway and N backends in network namespaces, with real
wireguard-go, built in the constructor and torn down by :meth:`Lab.close`.

Every backend runs wireguard-go with the same server key, the client as a peer
(AllowedIPs 10.99.0.2/32, fd99::2/128) and the probe key as a peer without
AllowedIPs (optionally with a preshared key). The client's only peer is the
server, at the gateway's public address. A client whose handshake went
unanswered only retries after 5 s, and a client whose session went to another
backend only re-handshakes after 15 s without replies:
:meth:`Lab.client_rehandshake` forces a fresh handshake at once."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final

from natfail.lab import config_file, leftovers, pings, topology
from natfail.lab.processes import ip_batch, kill_pids, ns_argv, run
from natfail.lab.readings import WireGuardReadings
from natfail.lab.topology import (
    BACKEND_NAMES,
    CLIENT_TUNNEL_V4,
    CLIENT_TUNNEL_V6,
    PUBLIC_PORT,
    PUBLIC_V4,
    PUBLIC_V6,
    SERVER_TUNNEL_V4,
    SERVER_TUNNEL_V6,
    LabBackend,
    LabClient,
    LabGateway,
    public_endpoint,
)
from natfail.lab.wireguard import (
    WgProcess,
    client_peer_argv,
    genkey,
    new_key,
    server_argv,
    tunnel_cmds,
    write_secret,
)

log = logging.getLogger("natfail.lab")

_PREFIX_RE: Final = re.compile(r"[a-z]{1,4}")


def _check_options(
    backends: int,
    keepalive: int | None,
    ipv6: bool,
    family: int,
    prefix: str,
    wg_log_level: str,
) -> None:
    if isinstance(backends, bool) or not isinstance(backends, int):
        raise TypeError("backends must be an int")
    if not 1 <= backends <= len(BACKEND_NAMES):
        raise ValueError(f"backends must be 1..{len(BACKEND_NAMES)}, not {backends}")
    if keepalive is not None and not 1 <= keepalive <= 65535:
        raise ValueError("keepalive must be None or 1..65535 seconds")
    if family not in (4, 6):
        raise ValueError("client_endpoint_family must be 4 or 6")
    if family == 6 and not ipv6:
        raise ValueError("client_endpoint_family=6 needs ipv6=True")
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError("prefix must be 1-4 lowercase letters")
    if wg_log_level not in ("verbose", "error", "silent"):
        raise ValueError("wg_log_level must be verbose, error or silent")


class Lab(WireGuardReadings):
    """A client, a gateway and N backends in network namespaces, with real WireGuard.

    Building happens in the constructor (``Lab(...)``); use it
    as a context manager or call :meth:`close` (idempotent, never raises, also
    registered with atexit).
    """

    public_v4: Final = PUBLIC_V4
    public_v6: Final = PUBLIC_V6
    public_port: Final = PUBLIC_PORT

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
    ) -> None:
        base = self._begin(
            backends, keepalive, ipv6, client_endpoint_family, prefix, wg_log_level, clean_stale
        )
        self.gateway = LabGateway(ns=f"{base}-gw")
        super().__init__(
            f"lab {self.id}", [self.gateway.ns, self.client.ns, *(b.ns for b in self.backends)]
        )
        self.ifnames: set[str] = {self.client.wg_if} | {b.wg_if for b in self.backends}
        self.dir = Path(tempfile.mkdtemp(prefix=f"natfail-lab-{self.id}-"))
        atexit.register(self._close_at_exit)
        try:
            leftovers.write_marker(self.id, prefix, self.namespaces, self.ifnames, [self.dir])
            self.server_key = new_key(self.dir, "server")
            self.client_key = new_key(self.dir, "client")
            self.probe_key = new_key(self.dir, "probe")
            self.psk: str | None = None
            self.psk_file: Path | None = None
            if preshared_key:
                self.psk = genkey()
                self.psk_file = self.dir / "probe.psk"
                write_secret(self.psk_file, self.psk)
            self._client_wg = self._wg(self.client.ns, self.client.wg_if, "client")
            for b in self.backends:
                b._wg = self._wg(b.ns, b.wg_if, f"backend-{b.name}")
            topology.build_network(self.gateway, self.client, self.backends, ipv6=ipv6)
            self._start_backends(self.backends)
            self._start_client()
        except BaseException:
            self.close()
            raise

    def _begin(
        self,
        backends: int,
        keepalive: int | None,
        ipv6: bool,
        client_endpoint_family: int,
        prefix: str,
        wg_log_level: str,
        clean_stale: bool,
    ) -> str:
        """What every lab sets first (the client and the backends included);
        returns the base of its namespaces' names."""
        _check_options(backends, keepalive, ipv6, client_endpoint_family, prefix, wg_log_level)
        self.keepalive = keepalive
        self.ipv6 = ipv6
        self.client_endpoint_family = client_endpoint_family
        self.prefix = prefix
        self._log_level = wg_log_level
        self._owner_pid = os.getpid()
        self._wgs: list[WgProcess] = []
        if clean_stale:
            leftovers.cleanup_stale(prefix)
        self.id = leftovers.new_id()
        base = f"{prefix}{self.id}"
        self.client = LabClient(ns=f"{base}-cl", wg_if=f"wc{self.id}")
        self.backends = [
            LabBackend(
                name=BACKEND_NAMES[i],
                index=i,
                ns=f"{base}-b{i}",
                wg_if=f"wb{self.id}{i}",
                v4=f"10.0.0.{i + 2}",
                v6=f"fd00::{i + 2:x}" if ipv6 else None,
                _lab=self,
            )
            for i in range(backends)
        ]
        return base

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "up"
        return f"<Lab {self.id} {state}: {len(self.backends)} backends>"

    # -- WireGuard processes --------------------------------------------------------------

    def _wg(self, ns: str, ifname: str, name: str) -> WgProcess:
        wg = WgProcess(ns, ifname, self.dir / f"{name}.log", self._log_level)
        self._wgs.append(wg)
        return wg

    def _tunnel_v6(self, v6: str) -> str | None:
        return v6 if self.ipv6 else None

    def _start_backends(self, backends: Sequence[LabBackend]) -> None:
        self._check_open()
        wgs = [b._wg for b in backends if b._wg is not None]
        for wg in wgs:
            wg.spawn()
        client_ips = f"{CLIENT_TUNNEL_V4}/32" + (f",{CLIENT_TUNNEL_V6}/128" if self.ipv6 else "")
        for b in backends:
            assert b._wg is not None
            b._wg.wait_ready()
            argv = server_argv(
                b.wg_if,
                b.port,
                self.server_key.file,
                self.client_key.public_b64,
                client_ips,
                self.probe_key.public_b64,
                self.psk_file,
            )
            run(ns_argv(b.ns, argv))
            v6 = self._tunnel_v6(SERVER_TUNNEL_V6)
            ip_batch(b.ns, tunnel_cmds(b.wg_if, SERVER_TUNNEL_V4, v6))

    def _client_peer_argv(self) -> list[str]:
        allowed = "10.99.0.0/24" + (",fd99::/64" if self.ipv6 else "")
        endpoint = public_endpoint(self.client_endpoint_family)
        return client_peer_argv(
            self.client.wg_if, self.server_key.public_b64, endpoint, allowed, self.keepalive
        )

    def _start_client(self) -> None:
        self._client_wg.spawn()
        self._client_wg.wait_ready()
        cl = self.client
        self.exec(cl, ["wg", "set", cl.wg_if, "private-key", str(self.client_key.file)])
        self.exec(cl, self._client_peer_argv())
        v6 = self._tunnel_v6(CLIENT_TUNNEL_V6)
        ip_batch(cl.ns, tunnel_cmds(cl.wg_if, CLIENT_TUNNEL_V4, v6))

    # -- client actions --------------------------------------------------------------------

    def client_ping(
        self,
        target: str = SERVER_TUNNEL_V4,
        count: int = 3,
        interval: float = 0.2,
        timeout: float = 5.0,
    ) -> bool:
        """Pings ``target`` from the client namespace (through the tunnel for 10.99.0.1 or
        fd99::1); True when ``count`` replies came back within ``timeout`` seconds."""
        if count < 1 or interval <= 0 or timeout <= 0:
            raise ValueError("count must be >= 1, interval and timeout > 0")
        argv = [
            "ping", "-n", "-q",
            "-c", str(count),
            "-i", f"{interval:g}",
            "-w", str(max(1, int(timeout + 0.999))),
            target,
        ]  # fmt: skip
        cp = self.exec(self.client, argv, check=False, timeout=timeout + 5.0)
        return pings.received(cp.stdout) >= count

    def client_rehandshake(self) -> None:
        """Makes the client forget its session, so its next packet starts a handshake at
        once (removes and re-adds the server peer). Without this, a client whose backend
        changed only re-handshakes after ~15 s without replies, and a client whose
        handshake went unanswered retries every 5 s."""
        cl = self.client
        self.exec(cl, ["wg", "set", cl.wg_if, "peer", self.server_key.public_b64, "remove"])
        self.exec(cl, self._client_peer_argv())

    def reset_sessions(self) -> None:
        """Fresh WireGuard state everywhere: restarts every running backend's wireguard-go
        and makes the client forget its session and any roamed endpoint.

        Useful between tests that share a lab: a backend that carried traffic and then
        stopped hearing from the client (because the DNAT moved away) initiates a
        handshake towards the client about 15 s later; without natfail's SNAT that
        packet reaches the client from the backend's private address and the client
        roams its endpoint there."""
        running = [b for b in self.backends if b.running]
        for b in running:
            b.stop()
        self._start_backends(running)
        self.client_rehandshake()

    def set_client_endpoint(self, family: int) -> None:
        """Points the client's peer at the public IPv4 (4) or IPv6 (6) address:port."""
        if family not in (4, 6) or (family == 6 and not self.ipv6):
            raise ValueError("family must be 4, or 6 in a lab with ipv6")
        self.client_endpoint_family = family
        cl = self.client
        argv = ["wg", "set", cl.wg_if, "peer", self.server_key.public_b64]
        self.exec(cl, [*argv, "endpoint", public_endpoint(family)])

    # -- gateway helpers -------------------------------------------------------------------

    def write_config(
        self,
        path: Path | None = None,
        *,
        firewall: str = "nftables",
        service: str = "wg0",
        extra_service: str = "",
        agents: bool = False,
    ) -> Path:
        """A natfail config for this lab: see :func:`natfail.lab.config_file.write_config`."""
        return config_file.write_config(
            self,
            path,
            firewall=firewall,
            service=service,
            extra_service=extra_service,
            agents=agents,
        )

    def set_static_dnat(self, v4: LabBackend | None, v6: LabBackend | None = None) -> None:
        """Points public:51820 at the given backend(s) with a fixed DNAT in tables of the
        lab's own (``ip labstatic`` / ``ip6 labstatic``), replaced in one nft transaction;
        None removes it. Not natfail: scaffolding for tests that prove the lab itself."""
        script = topology.static_dnat_script(v4, v6, ipv6=self.ipv6)
        self.exec(self.gateway, ["nft", "-f", "-"], input=script)

    def flush_conntrack(self) -> None:
        """Empties the gateway's conntrack table (IPv4 and IPv6)."""
        for family in ("ipv4", "ipv6") if self.ipv6 else ("ipv4",):
            self.exec(self.gateway, ["conntrack", "-F", "-f", family], timeout=5.0)

    def describe(self) -> str:
        lines = [
            f"lab {self.id}: gateway {self.gateway.ns} (public {PUBLIC_V4}"
            + (f", {PUBLIC_V6}" if self.ipv6 else "")
            + f" port {PUBLIC_PORT}, wan if {self.gateway.wan_if}, lan if {self.gateway.lan_if})",
            f"  client {self.client.ns} wg {self.client.wg_if} tunnel {CLIENT_TUNNEL_V4}"
            f" -> endpoint {public_endpoint(self.client_endpoint_family)}",
        ]
        for b in self.backends:
            v6 = f" {b.address_v6}" if b.address_v6 else ""
            lines.append(f"  backend {b.name}: {b.ns} wg {b.wg_if} {b.address}{v6}")
        lines += [
            f"  server public key {self.server_key.public_b64}",
            f"  probe public key  {self.probe_key.public_b64} (private key file"
            f" {self.probe_key.file})",
        ]
        if self.psk_file:
            lines.append(f"  probe preshared key file {self.psk_file}")
        return "\n".join(lines)

    # -- teardown --------------------------------------------------------------------------

    def _close_at_exit(self) -> None:
        # a forked child inherits atexit handlers: only the process that built the lab
        # tears it down at exit
        if os.getpid() == self._owner_pid:
            self.close()

    def close(self) -> None:
        """Kills every process, removes sockets, namespaces, the temp dir and the marker.

        Idempotent; never raises."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self._close_at_exit)
        wg_procs = [w.proc for w in self._wgs if w.proc is not None]
        pids = [p.pid for p in wg_procs if p.poll() is None] + self.started_pids()
        try:
            kill_pids(pids)
        except Exception as e:
            log.warning("lab %s close: %s", self.id, e)
        for proc in wg_procs:
            with contextlib.suppress(Exception):
                proc.wait(0.5)
        self.reap_started()
        leftovers.destroy(self.namespaces, self.ifnames, [self.dir])
        with contextlib.suppress(Exception):
            leftovers.marker_path(self.id).unlink(missing_ok=True)
