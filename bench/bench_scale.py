"""The daemon at scale: N services x 3 backends probed at 1 Hz, and 1 service x 2 at 20 Hz.

Not run in CI. For each N (default 10, 100, 300, 1000), with ``interval = 1.0``:

* CPU per probe, all-in: utime+stime of the daemon and of its descendants (the
  forked iptables helpers, anything it runs), plus the children it reaped, over a
  measurement window after a warm-up (``--window``, made longer for a small
  gateway so that at least MIN_WINDOW_PROBES are due: the CPU times come in
  ticks of 10 ms), divided by the probes due in the window
  (N x 3 x window / interval). The UDP datagrams the gateway namespace sent in
  the window (``Udp: OutDatagrams`` of /proc/<daemon>/net/snmp: the daemon is the
  namespace's only UDP sender) are the probes actually sent, a cross-check.
* RSS (VmRSS, and VmHWM at the end) of the daemon, and of its descendants.
* Conntrack entries in the gateway namespace (``conntrack -C``); target: one per
  probed backend.
* One switch's transaction: ``natfailctl switch`` on one service five times, the
  ``swap_ms`` of each switch record (``natfailctl events``), median.
* A whole reload: ``natfailctl reload`` after adding a service to the file, and
  after removing it again (the command's wall time, and the control socket's
  round trip without natfailctl's own start-up).
* ``natfailctl status --json``: wall time, median of 5, and the socket round trip.
* False downs: nothing is ever killed here, so any "backend X is down" in the
  daemon's log and any backend not up at the end is one.

Then one service of the lab's two backends at ``interval = 0.05``: the daemon's
CPU as a percentage of one core.

Topology (fits 24 GiB and 2 cores)::

    gateway nf<id>-gw (natfail, public 203.0.113.10:40000+i for service s<i>)
      br0 10.0.0.1/24 ─┬─ nf<id>-b0, -b1  10.0.0.2, .3:51820   the lab's two wireguard-go (20 Hz)
                       ├─ nf<id>-b100     10.0.0.11:20000+i   wireguard-go, backend a of s<i>
                       ├─ nf<id>-b101     10.0.0.12:20000+i   wireguard-go, backend b of s<i>
                       ├─ nf<id>-b102     10.0.0.13:20000+i   wireguard-go, backend c of s<i>
                       └─ nf<id>-b200     10.0.0.21, .22, .23:20000+i   the responder

A backend serves one service (the config refuses an address twice), so service
``s<i>`` has its own three endpoints, on port 20000+i of one address per slot
(a, b, c). The first ``--wg-max`` endpoints (default 300; in service order, so
the first services are all real) are each one wireguard-go: ~5 MiB and 11
threads each (1000 take 5 GiB and 11,000 of the kernel's default 32,768 pids;
the cap also shrinks to what free memory and pids hold). Memory would hold
3000, the two cores would not: a wireguard-go answering one handshake a second
costs ~0.07 % of a core (33 of them: 2.4 %), so 1000 would take 0.7 of a core
from the daemon's one. The other endpoints are served by one process in its
own namespace (its CPU is never counted as the daemon's): the in-repo
responder's Noise primitives (tests/unit/wg_responder.py) on one UDP socket
per endpoint, without scapy on the path, with libsodium's X25519, caching the
static-static DH and using one ephemeral key per endpoint, so an answer costs
two X25519 operations (~0.11 ms; the daemon cannot tell: its check of a
response does not depend on the responder's ephemeral key being new). At
1000 services: 300 wireguard-go and 2703 responder endpoints, about half a core
for the backends. The file records the backends' CPU and the whole machine's
beside the daemon's, to show whether the machine was saturated.

All backends share the lab's server key and have the lab's probe key as their
one peer. Each size gets a fresh daemon and state directory, after the
gateway's conntrack table is flushed; the backends stay up for all sizes.

Writes bench/results/scale.json (only the sizes that ran).
Usage (root): .venv/bin/python bench/bench_scale.py [--sizes 10,100,300,1000]
    [--window S] [--warmup S] [--firewall nftables|iptables] [--wg-max N] [--no-20hz]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import ENV, RESULTS_DIR, Daemon, machine, write_results  # noqa: E402

from natfail.cli import client  # noqa: E402
from natfail.core import noise, tai64n  # noqa: E402
from natfail.core.ruleset import backend_mark  # noqa: E402
from natfail.lab import PUBLIC_V4, WG_RUN_DIR, Lab, wait_until  # noqa: E402
from tests.unit.wg_responder import (  # noqa: E402
    AEAD,
    AEAD_OPEN,
    CONSTRUCTION,
    DH_PUB,
    HASH,
    IDENTIFIER,
    KDF,
    LABEL_MAC1,
    MAC,
    Rejected,
)

RESULTS = RESULTS_DIR / "scale.json"
SIZES = (10, 100, 300, 1000)
SLOTS = ("a", "b", "c")
INTERVAL = 1.0
FAST_INTERVAL = 0.05
BACKEND_PORT = 20000
PUBLIC_PORT = 40000
SWITCHES = 5
STATUS_CALLS = 5
TARGETS = {
    "cpu_per_probe_us": 330.0,
    "rss_mib_at_1000": 150.0,
    "conntrack_per_backend": 1.0,
    "switch_swap_ms_median": 1.0,
    "reload_ms_at_1000": 1000.0,
    "status_ms": 150.0,
    "hz20_core_percent": 10.0,
    "flat_within": 1.25,  # flat: the most per probe at most 1.25 x the least, over the sizes
}
WG_DEFAULT_MAX = 300
WG_MIB_EACH = 8  # budget per wireguard-go, above its ~4.5 MiB RSS
WG_THREADS_EACH = 12
CLK_TCK = os.sysconf("SC_CLK_TCK")
_DOWN = re.compile(r"backend \S+ is down")


def fail(message: str) -> SystemExit:
    return SystemExit(f"bench_scale: {message}")


# --- topology -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    service: int
    slot: int  # 0, 1, 2: backend a, b, c
    real: bool  # a wireguard-go of its own, else the responder

    @property
    def ip(self) -> str:
        return f"10.0.0.{(11 if self.real else 21) + self.slot}"

    @property
    def port(self) -> int:
        return BACKEND_PORT + self.service

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


def endpoints(services: int, real: int) -> list[Endpoint]:
    """Every backend of services 0..services-1, the first ``real`` of them wireguard-go."""
    out: list[Endpoint] = []
    for i in range(services):
        for k in range(len(SLOTS)):
            out.append(Endpoint(i, k, len(out) < real))
    return out


def backend_names(services: int) -> list[list[str]]:
    """a, b, c per service, renamed where two would share a conntrack mark (which the
    config refuses; 24 bits of hash, so it can happen among thousands)."""
    seen: set[int] = set()
    out = []
    for i in range(services):
        names = []
        for slot in SLOTS:
            name, n = slot, 1
            while backend_mark(f"s{i:04d}", name) in seen:
                n += 1
                name = f"{slot}{n}"
            seen.add(backend_mark(f"s{i:04d}", name))
            names.append(name)
        out.append(names)
    return out


def write_config(
    lab: Lab, path: Path, services: int, firewall: str, names: list[list[str]], eps: list[Endpoint]
) -> None:
    state = lab.dir / f"state-{path.stem}"
    state.mkdir(mode=0o700, exist_ok=True)
    lines = [
        "[daemon]",
        f'firewall = "{firewall}"',
        f'socket = "{lab.dir / "natfail.sock"}"',
        f'state_dir = "{state}"',
        "",
        "[probe]",
        f'private_key_file = "{lab.probe_key.file}"',
        f"interval = {INTERVAL}",
    ]
    for i in range(services):
        lines += [
            "",
            "[[service]]",
            f'name = "s{i:04d}"',
            f'public = "{PUBLIC_V4}:{PUBLIC_PORT + i}"',
            f'server_public_key = "{lab.server_key.public_b64}"',
        ]
        for k, name in enumerate(names[i]):
            ep = eps[3 * i + k]
            lines += [
                "[[service.backend]]",
                f'name = "{name}"',
                f'address = "{ep.address}"',
                f"priority = {100 - 10 * k}",
            ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def wg_capacity(wanted: int, cap: int) -> int:
    """How many wireguard-go this machine holds now: memory and pids, at most ``cap``."""
    avail_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail_kib = int(line.split()[1])
    by_memory = max(0, (avail_kib // 1024 - 4096) // WG_MIB_EACH)
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    by_pids = pid_max // 2 // WG_THREADS_EACH
    return max(0, min(wanted, cap, by_memory, by_pids))


# --- the fast responder (runs in its own namespace) ---------------------------------------


def _dh(private: bytes, public: bytes) -> bytes:
    # libsodium's X25519 through natfail's wrapper (the responder's DH is libsodium's
    # too); X25519 is most of an answer's cost
    shared = noise.dh(private, public)
    if shared is None:
        raise Rejected("low-order point")
    return shared


class FastResponder:
    """Answers initiations from one peer to one server key, on many endpoints, with the
    Noise primitives of tests/unit/wg_responder.py and fixed offsets instead of scapy."""

    def __init__(self, private_key: bytes, peer: bytes, preshared_key: bytes = bytes(32)) -> None:
        self.private_key = private_key
        self.peer = peer
        self.psk = preshared_key
        public = DH_PUB(private_key)
        self.c0 = HASH(CONSTRUCTION)
        self.h0 = HASH(HASH(self.c0 + IDENTIFIER) + public)
        self.mac1_in = HASH(LABEL_MAC1 + public)
        self.mac1_out = HASH(LABEL_MAC1 + peer)
        self.static_static = _dh(private_key, peer)
        self.ephemeral: dict[Any, tuple[bytes, bytes, bytes]] = {}
        self.last_stamp: dict[Any, bytes] = {}
        self.answered = 0
        self.rejected: dict[str, int] = {}

    def _ephemeral(self, where: Any) -> tuple[bytes, bytes, bytes]:
        e = self.ephemeral.get(where)
        if e is None:
            private = os.urandom(32)
            e = self.ephemeral[where] = (private, DH_PUB(private), _dh(private, self.peer))
        return e

    def answer(self, data: bytes, where: Any) -> bytes:
        """The response to an initiation received on ``where``; Rejected if a
        WireGuard server would drop it."""
        if len(data) != 148 or data[:4] != b"\x01\x00\x00\x00":
            raise Rejected("type")
        if MAC(self.mac1_in, data[:116]) != data[116:132]:
            raise Rejected("mac1")
        e_i, static, stamp = data[8:40], data[40:88], data[88:116]
        (c,) = KDF(1, self.c0, e_i)
        h = HASH(self.h0 + e_i)
        c, k = KDF(2, c, _dh(self.private_key, e_i))
        if AEAD_OPEN(k, 0, static, h) != self.peer:
            raise Rejected("unknown peer")
        h = HASH(h + static)
        c, k = KDF(2, c, self.static_static)
        timestamp = AEAD_OPEN(k, 0, stamp, h)
        if timestamp <= self.last_stamp.get(where, b""):
            raise Rejected("replay")
        self.last_stamp[where] = timestamp
        h = HASH(h + stamp)
        e_priv, e_pub, e_static = self._ephemeral(where)
        (c,) = KDF(1, c, e_pub)
        h = HASH(h + e_pub)
        (c,) = KDF(1, c, _dh(e_priv, e_i))
        (c,) = KDF(1, c, e_static)
        c, tau, k = KDF(3, c, self.psk)
        h = HASH(h + tau)
        body = b"\x02\x00\x00\x00\x44\x33\x22\x11" + data[4:8] + e_pub + AEAD(k, 0, b"", h)
        return body + MAC(self.mac1_out, body) + bytes(16)


def self_check() -> None:
    """The fast responder's answer is Accepted by the daemon's own probe code."""
    server = os.urandom(32)
    keys = noise.Keys(os.urandom(32), DH_PUB(server))
    responder = FastResponder(server, keys.public_key)
    stamp = tai64n.next_timestamp(time.time_ns(), None)
    for _ in range(2):
        stamp = tai64n.successor(stamp)
        message, handshake = noise.new_initiation(keys, timestamp=stamp)
        result = noise.consume_response(handshake, keys, responder.answer(message, "x"))
        if not isinstance(result, noise.Accepted):
            raise fail(f"the fast responder's answer is not accepted: {result!r}")


def serve(spec_path: Path) -> int:
    """The responder process: ``spec`` names the keys and endpoints; prints "ready"
    once every socket is bound, its counters as one JSON line on SIGTERM."""
    spec = json.loads(spec_path.read_text())
    responder = FastResponder(bytes.fromhex(spec["private_key"]), bytes.fromhex(spec["peer"]))
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()
    for ip, port in spec["endpoints"]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        sock.bind((ip, port))
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, (ip, port))
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    print("ready", flush=True)
    while not stopping:
        for key, _ in sel.select(0.5):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            while True:
                try:
                    data, peer = ready.recvfrom(2048)
                except (BlockingIOError, InterruptedError):
                    break
                try:
                    reply = responder.answer(data, key.data)
                except Rejected as e:
                    responder.rejected[e.args[0]] = responder.rejected.get(e.args[0], 0) + 1
                    continue
                with contextlib.suppress(OSError):
                    ready.sendto(reply, peer)
                responder.answered += 1
    print(json.dumps({"answered": responder.answered, "rejected": responder.rejected}), flush=True)
    return 0


# --- reading /proc --------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def cpu_ticks(pid: int, reaped: bool = True) -> int:
    """utime+stime of a process (all its threads), with ``reaped`` the children it
    waited for (cutime+cstime); 0 for a process that is gone."""
    f = _stat_fields(pid)
    if f is None:
        return 0
    ticks = int(f[11]) + int(f[12])
    return ticks + int(f[13]) + int(f[14]) if reaped else ticks


def descendants(root: int) -> list[int]:
    parent: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            f = _stat_fields(int(entry.name))
            if f is not None:
                parent.setdefault(int(f[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tree_ticks(root: int) -> int:
    """CPU of a process and all it ever started: a live child's own time, a reaped
    child's through its parent's cutime (counted once either way)."""
    return cpu_ticks(root) + sum(cpu_ticks(p) for p in descendants(root))


def status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def udp_counters(pid: int) -> dict[str, int]:
    """The Udp: line of the network namespace of ``pid``."""
    rows = [r.split() for r in Path(f"/proc/{pid}/net/snmp").read_text().splitlines()]
    head, values = [r for r in rows if r and r[0] == "Udp:"][:2]
    return {k: int(v) for k, v in zip(head[1:], values[1:], strict=True)}


def system_busy() -> tuple[int, int]:
    """(busy, total) ticks of all CPUs together, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass
class Sample:
    at: float
    daemon: int
    backends: int
    busy: tuple[int, int]
    udp: dict[str, int]


def sample(pid: int, backend_pids: Sequence[int]) -> Sample:
    return Sample(
        time.monotonic(),
        tree_ticks(pid),
        sum(cpu_ticks(p, reaped=False) for p in backend_pids),
        system_busy(),
        udp_counters(pid),
    )


# --- the backends ---------------------------------------------------------------------------


MIN_WINDOW_PROBES = 2700
"""Probes due in the shortest measurement window (10 services: 90 s)."""

LINK_UP_BATCH = 8
"""Links set up per ``ip -batch`` in one backend namespace (see Farm._start_wireguard)."""


def ip_batch(ns: str, commands: Sequence[str]) -> None:
    subprocess.run(
        ["ip", "-n", ns, "-batch", "-"],
        input="\n".join(commands) + "\n",
        text=True,
        check=True,
        capture_output=True,
        timeout=120,
    )


def uapi_set(ifname: str, text: str) -> None:
    """One ``set=1`` through wireguard-go's control socket (what ``wg set`` does)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(WG_RUN_DIR / f"{ifname}.sock"))
        sock.sendall(f"set=1\n{text}\n".encode())
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    if b"errno=0" not in reply:
        raise fail(f"wireguard-go {ifname}: {reply.decode(errors='replace').strip()}")


class Farm:
    """The scale backends: three wireguard-go host namespaces and the responder's; they
    join the lab's namespaces and interface names, so the lab's close (or its stale
    cleanup, by name) removes them too."""

    def __init__(self, lab: Lab, eps: list[Endpoint]) -> None:
        self.lab = lab
        self.eps = eps
        base = f"{lab.prefix}{lab.id}"
        self.hosts = [f"{base}-b{100 + k}" for k in range(len(SLOTS))]
        self.responder_ns = f"{base}-b200"
        self.wg: list[subprocess.Popen[bytes]] = []
        self.responder: subprocess.Popen[str] | None = None
        self.responder_log = lab.dir / "responder.log"

    def ifname(self, ep: Endpoint) -> str:
        return f"wb{self.lab.id}{1000 + 3 * ep.service + ep.slot}"

    def build(self) -> None:
        real = [e for e in self.eps if e.real]
        spread = [e for e in self.eps if not e.real]
        namespaces = [*self.hosts, self.responder_ns]
        self.lab.namespaces.extend(namespaces)
        self.lab.ifnames.update(self.ifname(e) for e in real)
        gw_cmds = []
        for n, ns in enumerate(namespaces):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            gw_cmds += [
                f"link add vs{n} type veth peer name eth0 netns {ns}",
                f"link set vs{n} master {self.lab.gateway.lan_if}",
                f"link set vs{n} up",
            ]
        ip_batch(self.lab.gateway.ns, gw_cmds)
        for k, ns in enumerate(self.hosts):
            self._node(ns, [f"10.0.0.{11 + k}"])
        self._node(self.responder_ns, [f"10.0.0.{21 + k}" for k in range(len(SLOTS))])
        started = time.monotonic()
        self._start_wireguard(real)
        print(f"  {len(real)} wireguard-go up in {time.monotonic() - started:.0f} s", flush=True)
        if spread:
            self._start_responder(spread)

    def _node(self, ns: str, addresses: list[str]) -> None:
        cmds = ["link set lo up", "link set eth0 up", "route add default via 10.0.0.1"]
        cmds[1:1] = [f"addr add {a}/24 dev eth0" for a in addresses]
        ip_batch(ns, cmds)

    def _start_wireguard(self, real: list[Endpoint], batch: int = 50) -> None:
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL="error")
        server = self.lab.server_key.private.hex()
        peer = self.lab.probe_key.public.hex()
        with open(self.lab.dir / "wireguard-go.log", "ab") as log:
            for start in range(0, len(real), batch):
                chunk = real[start : start + batch]
                for e in chunk:
                    argv = ["ip", "netns", "exec", self.hosts[e.slot]]
                    argv += ["wireguard-go", "-f", self.ifname(e)]
                    self.wg.append(
                        subprocess.Popen(
                            argv,
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=env,
                            start_new_session=True,
                        )
                    )
                for e in chunk:
                    sock = WG_RUN_DIR / f"{self.ifname(e)}.sock"
                    if not wait_until(sock.exists, 20, 0.02):
                        raise fail(f"wireguard-go {self.ifname(e)} did not start")
                    uapi_set(
                        self.ifname(e),
                        f"private_key={server}\nlisten_port={e.port}\npublic_key={peer}\n",
                    )
        # Every wireguard-go of a namespace hears every link event of it on a
        # netlink socket and exits when that socket overflows (ENOBUFS: "Failed
        # to read packet from TUN device"): a hundred links set up at once kill
        # some. So a few at a time, and a check that none died.
        for k, ns in enumerate(self.hosts):
            ups = [f"link set {self.ifname(e)} up" for e in real if e.slot == k]
            for start in range(0, len(ups), LINK_UP_BATCH):
                ip_batch(ns, ups[start : start + LINK_UP_BATCH])
                time.sleep(0.05)
        time.sleep(1.0)
        self.check_alive()

    def check_alive(self) -> None:
        """Fail when a wireguard-go backend has exited: its probes would fail."""
        dead = [p for p in self.wg if p.poll() is not None]
        if dead:
            log = (self.lab.dir / "wireguard-go.log").read_text(errors="replace")
            raise fail(f"{len(dead)} wireguard-go backends exited: {log[-600:]}")

    def _start_responder(self, spread: list[Endpoint]) -> None:
        spec = self.lab.dir / "responder.json"
        spec.write_text(
            json.dumps(
                {
                    "private_key": self.lab.server_key.private.hex(),
                    "peer": self.lab.probe_key.public.hex(),
                    "endpoints": [[e.ip, e.port] for e in spread],
                }
            )
        )
        log = open(self.responder_log, "w")  # noqa: SIM115 - the child keeps it
        self.responder = self.lab.popen(
            self.responder_ns,
            [sys.executable, str(Path(__file__).resolve()), "--serve-responder", str(spec)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV,
        )
        log.close()
        if not wait_until(lambda: "ready" in self.responder_log.read_text(), 60, 0.1):
            raise fail(f"the responder did not start: {self.responder_log.read_text()[-300:]}")
        print(f"  responder serves {len(spread)} backends", flush=True)

    @property
    def pids(self) -> list[int]:
        out = [p.pid for p in self.wg if p.poll() is None]
        if self.responder is not None and self.responder.poll() is None:
            out.append(self.responder.pid)
        return out

    def responder_counters(self) -> dict[str, Any] | None:
        if self.responder is None:
            return None
        if self.responder.poll() is None:
            self.responder.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.responder.wait(5)
        lines = self.responder_log.read_text().strip().splitlines()
        with contextlib.suppress(ValueError, IndexError):
            data: dict[str, Any] = json.loads(lines[-1])
            return data
        return None

    def stop(self) -> None:
        for p in self.wg:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in self.wg:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
            if p.poll() is None:
                p.kill()
                p.wait(2)


# --- talking to the daemon ------------------------------------------------------------------


def ctl(config: Path, *args: str, timeout: float = 60) -> tuple[float, int, str]:
    """natfailctl as an operator runs it: (wall ms, exit status, stdout or stderr)."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "natfail.cli.ctl", "-c", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **ENV},
    )
    wall = (time.perf_counter() - started) * 1000
    return wall, proc.returncode, proc.stdout if proc.returncode == 0 else proc.stderr.strip()


def call(sock: Path, request: dict[str, Any], timeout: float = 60) -> tuple[float, dict[str, Any]]:
    """One request on the control socket: (round trip ms, reply)."""
    started = time.perf_counter()
    reply = client.call(sock, request, timeout=timeout)
    return (time.perf_counter() - started) * 1000, reply


def backend_states(sock: Path) -> list[tuple[str, str, str]]:
    """(service, backend, state) of every backend; [] when the daemon does not answer."""
    try:
        _, reply = call(sock, {"command": "status"}, timeout=30)
    except Exception:
        return []
    return [
        (s["name"], b["name"], b["state"])
        for s in reply.get("services", [])
        for b in s.get("backends", [])
    ]


def median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def timed(label: str) -> Callable[[], None]:
    started = time.monotonic()
    return lambda: print(f"  {label}: {time.monotonic() - started:.1f} s", flush=True)


@contextlib.contextmanager
def daemon_running(lab: Lab, config: Path, log: Path) -> Iterator[Daemon]:
    lab.flush_conntrack()
    daemon = Daemon(lab, config, log)
    try:
        yield daemon
    finally:
        daemon.stop()


# --- one size -------------------------------------------------------------------------------


@dataclass
class SizeRun:
    lab: Lab
    farm: Farm
    services: int
    window: float
    warmup: float
    firewall: str
    names: list[list[str]]
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def sock(self) -> Path:
        return self.lab.dir / "natfail.sock"

    def run(self) -> dict[str, Any]:
        n = self.services
        config = self.lab.dir / f"scale-{n}.toml"
        write_config(self.lab, config, n, self.firewall, self.names, self.farm.eps)
        log = self.lab.dir / f"natfail-{n}.log"
        self.row = {"services": n, "backends": 3 * n, "interval_s": INTERVAL}
        with daemon_running(self.lab, config, log) as daemon:
            pid = daemon.proc.pid
            started = time.monotonic()
            wait_until(lambda: daemon.proc.poll() is not None or self._all_up(n), 60 + n / 10, 1.0)
            self.row["all_up"] = daemon.proc.poll() is None and self._all_up(n)
            self.row["startup_s"] = round(time.monotonic() - started, 1)
            self.row["startup_cpu_s"] = round(tree_ticks(pid) / CLK_TCK, 2)
            if daemon.proc.poll() is not None:
                self.row["error"] = f"the daemon exited ({daemon.proc.returncode})"
                self.row["log_tail"] = log.read_text()[-2000:]
                return self.row
            time.sleep(self.warmup)
            self._window(pid)
            self._memory(pid, "after_window")
            self._conntrack()
            self._status(config)
            self._switches(config)
            self._reloads(config, n)
            time.sleep(3)
            self._false_downs(log)
            self.row["backends_exited"] = sum(p.poll() is not None for p in self.farm.wg)
            self._memory(pid, "at_end")
        return self.row

    def _all_up(self, n: int) -> bool:
        states = backend_states(self.sock)
        return len(states) == 3 * n and all(s == "up" for _, _, s in states)

    def _window(self, pid: int) -> None:
        # CPU times come in ticks of 10 ms: a small gateway's window is made
        # long enough for MIN_WINDOW_PROBES probes, so that a tick is < 2 %.
        window = max(self.window, MIN_WINDOW_PROBES * INTERVAL / (3 * self.services))
        done = timed(f"window of {window:g} s")
        before = sample(pid, self.farm.pids)
        time.sleep(window)
        after = sample(pid, self.farm.pids)
        done()
        seconds = after.at - before.at
        cpu_s = (after.daemon - before.daemon) / CLK_TCK
        due = 3 * self.services * seconds / INTERVAL
        sent = after.udp["OutDatagrams"] - before.udp["OutDatagrams"]
        received = after.udp["InDatagrams"] - before.udp["InDatagrams"]
        busy = (after.busy[0] - before.busy[0]) / CLK_TCK / seconds  # in cores
        self.row.update(
            {
                "window_s": round(seconds, 2),
                "daemon_cpu_s": round(cpu_s, 3),
                "daemon_core_percent": round(100 * cpu_s / seconds, 2),
                "probes_due": round(due),
                "probes_sent": sent,
                "responses_received": received,
                "udp_errors": {
                    k: after.udp[k] - before.udp[k]
                    for k in ("NoPorts", "InErrors", "RcvbufErrors", "SndbufErrors")
                    if k in after.udp
                },
                "cpu_per_probe_us": round(cpu_s / due * 1e6, 1) if due else None,
                "cpu_per_probe_sent_us": round(cpu_s / sent * 1e6, 1) if sent else None,
                "backends_core_percent": round(
                    100 * (after.backends - before.backends) / CLK_TCK / seconds, 2
                ),
                "machine_core_percent": round(100 * busy, 1),
            }
        )

    def _memory(self, pid: int, when: str) -> None:
        children = descendants(pid)
        self.row[f"rss_mib_{when}"] = round(status_kib(pid, "VmRSS") / 1024, 1)
        self.row[f"hwm_mib_{when}"] = round(status_kib(pid, "VmHWM") / 1024, 1)
        self.row[f"children_rss_mib_{when}"] = round(
            sum(status_kib(p, "VmRSS") for p in children) / 1024, 1
        )

    def _conntrack(self) -> None:
        cp = self.lab.exec(self.lab.gateway, ["conntrack", "-C"], check=False, timeout=30)
        count = int(cp.stdout.strip()) if cp.stdout.strip().isdigit() else None
        self.row["conntrack_entries"] = count
        self.row["conntrack_per_backend"] = (
            round(count / (3 * self.services), 2) if count is not None else None
        )

    def _status(self, config: Path) -> None:
        cli, sock_ms, errors = [], [], []
        for _ in range(STATUS_CALLS):
            wall, rc, out = ctl(config, "status", "--json")
            if rc == 0:
                cli.append(wall)
            else:
                errors.append(out)
            with contextlib.suppress(Exception):
                sock_ms.append(call(self.sock, {"command": "status"})[0])
        self.row["status_cli_ms"] = [round(v, 1) for v in cli]
        self.row["status_cli_ms_median"] = median(cli)
        self.row["status_socket_ms_median"] = median(sock_ms)
        if errors:
            self.row["status_errors"] = errors[:3]

    def _switches(self, config: Path) -> None:
        service = "s0000"
        names = self.names[0]
        targets = [names[(k + 1) % 3] for k in range(SWITCHES)]  # b, c, a, b, c
        swaps, cleanups, cli, problems = [], [], [], []
        for target in targets:
            t0 = time.time()
            wall, rc, out = ctl(config, "switch", service, target)
            if rc != 0:
                problems.append(f"switch {target}: {out}")
                continue
            cli.append(wall)
            record = self._record(service, target, t0)
            if record is None:
                problems.append(f"switch {target}: no switch record within 10 s")
                continue
            swaps.append(float(record["swap_ms"]))
            cleanups.append(float(record["cleanup_ms"]))
        ctl(config, "release", service)
        self.row.update(
            {
                "switch_swap_ms": swaps,
                "switch_swap_ms_median": median(swaps),
                "switch_cleanup_ms_median": median(cleanups),
                "switch_cli_ms_median": median(cli),
            }
        )
        if problems:
            self.row["switch_problems"] = problems

    def _record(self, service: str, target: str, after: float) -> dict[str, Any] | None:
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            with contextlib.suppress(Exception):
                _, reply = call(self.sock, {"command": "events", "count": 20})
                for e in reply.get("events", []):
                    at = float(e.get("unix_time", 0))
                    if e.get("service") == service and e.get("to") == target and at >= after - 0.01:
                        found.append(e)
            return bool(found)

        wait_until(seen, 10, 0.05)
        return found[-1] if found else None

    def _reloads(self, config: Path, n: int) -> None:
        """Add service s<n>, remove it, by natfailctl and by the bare socket."""
        cli: list[float] = []
        sock_ms: list[float] = []
        problems: list[str] = []
        for how in ("cli", "socket"):
            for count in (n + 1, n):
                write_config(self.lab, config, count, self.firewall, self.names, self.farm.eps)
                if how == "cli":
                    wall, rc, out = ctl(config, "reload")
                    if rc == 0:
                        cli.append(wall)
                    else:
                        problems.append(out)
                else:
                    try:
                        sock_ms.append(call(self.sock, {"command": "reload"})[0])
                    except Exception as e:
                        problems.append(str(e))
                time.sleep(1.0)
        self.row["reload_cli_ms"] = [round(v, 1) for v in cli]
        self.row["reload_cli_ms_median"] = median(cli)
        self.row["reload_socket_ms"] = [round(v, 1) for v in sock_ms]
        if problems:
            self.row["reload_problems"] = problems[:4]

    def _false_downs(self, log: Path) -> None:
        downs = [line for line in log.read_text().splitlines() if _DOWN.search(line)]
        not_up = [f"{s}/{b}={st}" for s, b, st in backend_states(self.sock) if st != "up"]
        self.row["false_downs_logged"] = len(downs)
        self.row["not_up_at_end"] = len(not_up)
        if downs or not_up:
            self.row["false_down_examples"] = (downs[:3] + not_up[:5])[:8]


def hz20(lab: Lab, window: float, warmup: float, firewall: str) -> dict[str, Any]:
    """One service of the lab's two wireguard-go backends, probed every 50 ms."""
    config = lab.write_config(
        lab.dir / "hz20.toml",
        firewall=firewall,
        extra_service=f"[service.probe]\ninterval = {FAST_INTERVAL}",
    )
    log = lab.dir / "natfail-hz20.log"
    sock = lab.dir / "natfail.sock"
    row: dict[str, Any] = {"services": 1, "backends": 2, "interval_s": FAST_INTERVAL}
    with daemon_running(lab, config, log) as daemon:
        pid = daemon.proc.pid
        up = wait_until(lambda: [s for _, _, s in backend_states(sock)] == ["up", "up"], 30, 0.2)
        row["all_up"] = up
        time.sleep(warmup)
        before = sample(pid, [])
        time.sleep(window)
        after = sample(pid, [])
        seconds = after.at - before.at
        cpu_s = (after.daemon - before.daemon) / CLK_TCK
        due = 2 * seconds / FAST_INTERVAL
        sent = after.udp["OutDatagrams"] - before.udp["OutDatagrams"]
        row.update(
            {
                "window_s": round(seconds, 2),
                "daemon_cpu_s": round(cpu_s, 3),
                "core_percent": round(100 * cpu_s / seconds, 2),
                "probes_due": round(due),
                "probes_sent": sent,
                "cpu_per_probe_us": round(cpu_s / due * 1e6, 1),
                "rss_mib": round(status_kib(pid, "VmRSS") / 1024, 1),
            }
        )
        downs = [line for line in log.read_text().splitlines() if _DOWN.search(line)]
        row["false_downs_logged"] = len(downs)
    return row


# --- the verdicts and main ------------------------------------------------------------------


def verdicts(rows: list[dict[str, Any]], fast: dict[str, Any] | None) -> dict[str, Any]:
    """Each target against the figures that ran (None: not measured)."""
    t = TARGETS
    per_probe = [r["cpu_per_probe_us"] for r in rows if r.get("cpu_per_probe_us") is not None]
    at_1000 = next((r for r in rows if r["services"] == 1000), None)
    out: dict[str, Any] = {
        "cpu_per_probe": bool(per_probe) and max(per_probe) <= t["cpu_per_probe_us"],
        "cpu_per_probe_flat": max(per_probe) <= t["flat_within"] * min(per_probe)
        if len(per_probe) > 1
        else None,
        "rss_at_1000": at_1000["hwm_mib_at_end"] <= t["rss_mib_at_1000"]
        if at_1000 and "hwm_mib_at_end" in at_1000
        else None,
        "conntrack": all(
            r.get("conntrack_per_backend") is not None
            and r["conntrack_per_backend"] <= t["conntrack_per_backend"] + 0.05
            for r in rows
        )
        if rows
        else None,
        "switch": all(
            (r.get("switch_swap_ms_median") or 1e9) <= t["switch_swap_ms_median"] for r in rows
        )
        if rows
        else None,
        "reload_at_1000": max(at_1000.get("reload_cli_ms") or [1e9]) <= t["reload_ms_at_1000"]
        if at_1000
        else None,
        "status": all((r.get("status_cli_ms_median") or 1e9) <= t["status_ms"] for r in rows)
        if rows
        else None,
        "no_false_down": all(
            r.get("false_downs_logged") == 0 and r.get("not_up_at_end") == 0 for r in rows
        )
        and (fast is None or fast.get("false_downs_logged") == 0),
        "hz20": fast["core_percent"] <= t["hz20_core_percent"] if fast else None,
    }
    return out


def report(row: dict[str, Any]) -> None:
    t = TARGETS
    print(
        f"N={row['services']}: {row.get('cpu_per_probe_us')} us CPU/probe all-in (target "
        f"<= {t['cpu_per_probe_us']:g}; {row.get('cpu_per_probe_sent_us')} per probe sent, "
        f"{row.get('probes_sent')} sent of {row.get('probes_due')} due), daemon "
        f"{row.get('daemon_core_percent')} % of a core, backends "
        f"{row.get('backends_core_percent')} %, whole machine "
        f"{row.get('machine_core_percent')} % of a core ({os.cpu_count()} cores)",
        flush=True,
    )
    print(
        f"  RSS {row.get('rss_mib_after_window')} MiB, peak {row.get('hwm_mib_at_end')} MiB "
        f"(target <= {t['rss_mib_at_1000']:g} at 1000); conntrack {row.get('conntrack_entries')}"
        f" = {row.get('conntrack_per_backend')} per backend (target 1)",
        flush=True,
    )
    print(
        f"  switch swap {row.get('switch_swap_ms_median')} ms median (target <= "
        f"{t['switch_swap_ms_median']:g}); reload {row.get('reload_cli_ms')} ms by natfailctl, "
        f"{row.get('reload_socket_ms')} ms on the socket (target <= "
        f"{t['reload_ms_at_1000']:g} at 1000); status {row.get('status_cli_ms_median')} ms "
        f"(socket {row.get('status_socket_ms_median')}; target <= {t['status_ms']:g}); "
        f"false downs {row.get('false_downs_logged')} logged, {row.get('not_up_at_end')} not up "
        f"at the end (target 0)",
        flush=True,
    )


@contextlib.contextmanager
def inotify_instances(needed: int) -> Iterator[None]:
    """Each wireguard-go takes an inotify instance; the default allows 128 per user."""
    path = Path("/proc/sys/fs/inotify/max_user_instances")
    old = int(path.read_text())
    if old < needed:
        path.write_text(str(needed))
    try:
        yield
    finally:
        if old < needed:
            path.write_text(str(old))


def revision() -> str:
    """The commit measured, with "+dirty" for uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise fail(f"--sizes: {text!r} is not a comma-separated list of numbers") from None
    if any(s < 1 or s > 9999 for s in sizes):
        raise fail("--sizes: each size is 1..9999")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--window", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds after all are up")
    parser.add_argument("--firewall", choices=("nftables", "iptables"), default="nftables")
    parser.add_argument(
        "--wg-max", type=int, default=WG_DEFAULT_MAX, help="most backends as wireguard-go"
    )
    parser.add_argument("--no-20hz", dest="hz20", action="store_false")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--serve-responder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_responder is not None:
        return serve(args.serve_responder)
    if os.geteuid() != 0:
        print("bench_scale: run as root", file=sys.stderr)
        return 2
    sizes = parse_sizes(args.sizes)
    if args.window <= 0 or args.warmup < 0:
        raise fail("--window must be > 0 and --warmup >= 0")
    self_check()
    started = time.monotonic()
    largest = max(sizes) + 1 if sizes else 0  # one more: the service a reload adds
    real = wg_capacity(3 * largest, args.wg_max)
    eps = endpoints(largest, real)
    names = backend_names(largest)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows: list[dict[str, Any]] = []
    fast: dict[str, Any] | None = None
    with inotify_instances(real + 1024), Lab(backends=2, ipv6=False) as lab:
        farm = Farm(lab, eps)
        try:
            print(f"lab {lab.id}: {real} wireguard-go, {len(eps) - real} on the responder")
            farm.build()
            for n in sizes:
                done = timed(f"N={n}")
                row = SizeRun(lab, farm, n, args.window, args.warmup, args.firewall, names).run()
                rows.append(row)
                report(row)
                done()
            if args.hz20:
                fast = hz20(lab, args.window, args.warmup, args.firewall)
                print(
                    f"20 Hz, 1 service x 2: {fast['core_percent']} % of a core (target <= "
                    f"{TARGETS['hz20_core_percent']:g}), {fast['cpu_per_probe_us']} us/probe, "
                    f"{fast['false_downs_logged']} false downs",
                    flush=True,
                )
            responder = farm.responder_counters()
        finally:
            farm.stop()
    result = {
        "what": "natfail at scale: N services x 3 backends probed at 1 Hz (all-in CPU per "
        "probe of the daemon and its children, RSS, conntrack, switch, reload, status, "
        "false downs), and 1 service x 2 backends at 20 Hz",
        "machine": machine(),
        "revision": revision(),
        "firewall": args.firewall,
        "window_s": args.window,
        "warmup_s": args.warmup,
        "wireguard_go_backends": real,
        "responder_backends": len(eps) - real,
        "responder": responder,
        "targets": TARGETS,
        "meets": verdicts(rows, fast),
        "seconds": round(time.monotonic() - started, 1),
        "rows": rows,
        "hz20": fast,
    }
    write_results(args.output, result)
    print(json.dumps(result["meets"], indent=2))
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
