"""Activation time against the number of peers: how long the agent's
``Uapi.activate`` takes to make a wireguard-go backend start a handshake with
10, 100 and 1000 clients.

In a fresh namespace, one wireguard-go interface gets N peers (real public keys,
one /32 each, keepalive 0, no endpoint), as a standby that never met its
clients: the failover case, which the target is about. Every round gives the
interface N new peers (setup, not timed) and activates all N at distinct
endpoints in 198.18.0.0/15, routed through a veth to a next hop that does not
exist (the other end drops what it gets): the clients need not exist, the
initiations are really built and sent. Each peer is kicked in place
(``cleared`` 0; the bench fails otherwise). A round counts only if the veth
sent at least N packets by the time ``activate`` returned (wireguard-go sends
an initiation synchronously within the ``set=1``). Target: 1000 peers within
100 ms.

Right after, each round activates the same peers AGAIN: wireguard-go swallows
every kick in place (an initiation went out less than 5 s before), the
agent's second reading shows it and every peer is removed and re-added
(``cleared`` N): the dearest path, a bound on a switch back to a backend
that was active less than 180 s ago (whose peers are re-added at once,
without the swallowed kick and the second reading). Those clients would
need real handshakes to show a recent one, which a bench of 1000 cannot
have.

For scale the file also records wireguard-go's own floor (a keepalive kick of
every fresh peer in one transaction: the initiations alone, which
wireguard-go builds and sends one after the other under its UAPI lock), one
X25519 on this machine, and per round the CPU time wireguard-go spent (all
its threads, from /proc/PID/task/*/schedstat) and the agent's own thread
spent: wall time on a busy machine is wait; the CPU times show where an
activation's work is. The load average at the start is recorded too: other
jobs on the machine slow every figure but the CPU times.

Writes bench/results/activation.json. Usage (root):
    .venv/bin/python bench/bench_activation.py [-r ROUNDS] [--sizes 10,100,1000]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import machine, write_results  # noqa: E402
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base  # noqa: E402

from natfail.agent import wireguard as wgmod  # noqa: E402
from natfail.core.model import Endpoint  # noqa: E402
from natfail.lab.processes import ip_batch, run  # noqa: E402
from natfail.lab.wireguard import WgProcess, remove_sockets  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "activation.json"
TARGET_MS = {1000: 100.0}


def new_public_key() -> bytes:
    return bytes(crypto_scalarmult_base(secrets.token_bytes(32)))


def uapi_set(path: Path, text: str) -> None:
    """The bench's own setup transaction (not the code under test)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(text.encode())
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("wireguard-go closed the UAPI connection")
            answer += chunk
    if answer != b"errno=0\n\n":
        raise RuntimeError(f"setup refused: {answer!r}")


def cpu_ms(pid: int) -> float:
    """The CPU time all threads of process ``pid`` have had, in ms."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that just ended
            continue
    return total / 1e6


def tx_packets(ns: str, ifname: str) -> int:
    out = run(["ip", "-n", ns, "-s", "-j", "link", "show", ifname]).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["packets"])


def new_peers(socket_path: Path, size: int) -> list[tuple[bytes, Endpoint]]:
    """Replaces every peer of the interface by ``size`` new ones; their targets."""
    keys = [new_public_key() for _ in range(size)]
    lines = ["set=1", "replace_peers=true"]
    for i, key in enumerate(keys):
        lines += [
            f"public_key={key.hex()}",
            f"allowed_ip=10.{128 + (i >> 16)}.{i >> 8 & 255}.{i & 255}/32",
        ]
    uapi_set(socket_path, "\n".join(lines) + "\n\n")
    return [
        (key, Endpoint.parse(f"198.18.{1 + (i >> 8)}.{i & 255 or 1}:51820"))
        for i, key in enumerate(keys)
    ]


class Timed:
    """One kind of activation's figures over the rounds."""

    def __init__(self) -> None:
        self.elapsed: list[float] = []
        self.wg_cpu: list[float] = []
        self.agent_cpu: list[float] = []

    def run(
        self, ns: str, pid: int, iface: wgmod.Uapi, targets: list[tuple[bytes, Endpoint]]
    ) -> wgmod.Activation:
        size = len(targets)
        before = tx_packets(ns, "d0")
        wg_before, agent_before = cpu_ms(pid), time.thread_time()
        result = iface.activate(targets)
        self.agent_cpu.append((time.thread_time() - agent_before) * 1000)
        self.wg_cpu.append(cpu_ms(pid) - wg_before)
        sent = tx_packets(ns, "d0") - before
        if result.known != size or result.initiated != size or sent < size:
            raise RuntimeError(f"{size} peers: {result} but {sent} packets sent")
        self.elapsed.append(result.elapsed)
        return result

    def figures(self, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}median_ms": round(statistics.median(self.elapsed) * 1000, 1),
            f"{prefix}min_ms": round(min(self.elapsed) * 1000, 1),
            f"{prefix}max_ms": round(max(self.elapsed) * 1000, 1),
            f"{prefix}wireguard_go_cpu_median_ms": round(statistics.median(self.wg_cpu), 1),
            f"{prefix}agent_cpu_median_ms": round(statistics.median(self.agent_cpu), 1),
        }


def measure(ns: str, tag: str, size: int, rounds: int, workdir: Path) -> dict[str, object]:
    ifname = f"agwb{tag}{size % 10000}"
    proc = WgProcess(ns, ifname, workdir / f"{ifname}.log", "error")
    proc.spawn()
    try:
        proc.wait_ready()
        uapi_set(proc.socket, f"set=1\nprivate_key={secrets.token_bytes(32).hex()}\n"
                 "listen_port=51820\n\n")  # fmt: skip
        ip_batch(ns, [f"link set {ifname} up"])
        # wireguard-go's own floor: a keepalive kick (0 -> 25) of every peer while
        # it is fresh, in one transaction: the serial initiation cost alone.
        targets = new_peers(proc.socket, size)
        kick = ["set=1"]
        for key, endpoint in targets:
            kick += [f"public_key={key.hex()}", f"endpoint={endpoint}"]
            kick.append("persistent_keepalive_interval=25")
        before = tx_packets(ns, "d0")
        start = time.monotonic()
        uapi_set(proc.socket, "\n".join(kick) + "\n\n")
        floor = time.monotonic() - start
        if tx_packets(ns, "d0") - before < size:
            raise RuntimeError(f"{size} peers: the floor kick sent too few packets")
        iface = wgmod.Uapi(ifname)
        if proc.proc is None:
            raise RuntimeError("wireguard-go did not start")
        pid = proc.proc.pid  # ip netns exec execs wireguard-go: its own pid
        reads: list[float] = []
        standby, again = Timed(), Timed()
        for _ in range(rounds):
            targets = new_peers(proc.socket, size)
            time.sleep(0.3)
            start = time.monotonic()
            iface.read()
            reads.append(time.monotonic() - start)
            first = standby.run(ns, pid, iface, targets)
            if first.cleared != 0:
                raise RuntimeError(f"{size} fresh peers: {first.cleared} re-added")
            time.sleep(0.3)
            second = again.run(ns, pid, iface, targets)
            if second.cleared != size:
                raise RuntimeError(f"{size} peers again: only {second.cleared} re-added")
        return {
            "peers": size,
            "rounds": rounds,
            **standby.figures(),
            "read_median_ms": round(statistics.median(reads) * 1000, 1),
            "wireguard_go_kick_only_ms": round(floor * 1000, 1),
            **again.figures("again_"),
            "target_ms": TARGET_MS.get(size),
        }
    finally:
        proc.stop()
        remove_sockets({ifname})


def x25519_us() -> float:
    """One X25519 in libsodium on this machine, for scale: an initiation costs two."""
    private, public = secrets.token_bytes(32), new_public_key()
    start = time.perf_counter()
    for _ in range(1000):
        crypto_scalarmult(private, public)
    return round((time.perf_counter() - start) * 1000, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-r", "--rounds", type=int, default=7)
    parser.add_argument("--sizes", default="10,100,1000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    tag = secrets.token_hex(3)
    ns = f"agwbench{tag}"
    load = os.getloadavg()[0]
    run(["ip", "netns", "add", ns])
    try:
        ip_batch(
            ns,
            [
                "link set lo up",
                "link add d0 type veth peer name d1",
                "addr add 192.0.2.1/24 dev d0",
                "link set d0 up",
                "link set d1 up",
                # one fixed next hop: no neighbour resolution per client address
                "neigh add 192.0.2.2 lladdr 02:00:00:00:00:02 dev d0 nud permanent",
                "route add 198.18.0.0/15 via 192.0.2.2 dev d0",
            ],
        )
        with tempfile.TemporaryDirectory(prefix="agwbench") as tmp:
            figures = [measure(ns, tag, size, args.rounds, Path(tmp)) for size in sizes]
    finally:
        run(["ip", "netns", "del", ns], check=False)
    wg_version = run(["wireguard-go", "--version"], check=False).stdout.split("\n")[0]
    result = {
        "benchmark": "activation",
        "what": (
            "Uapi.activate of N fresh standby peers on wireguard-go, call to last answer;"
            " again_*: the same peers right after, every one re-added"
        ),
        "batch_size": wgmod.BATCH_SIZE,
        "first_batch": wgmod.FIRST_BATCH,
        "batch_pause_ms": wgmod.UAPI_BATCH_PAUSE * 1000,
        "wireguard_go": wg_version,
        "machine": machine(),
        "load_average_1min": round(load, 2),
        "x25519_us": x25519_us(),
        "sizes": figures,
    }
    write_results(RESULTS, result)
    for f in figures:
        print(
            f"{f['peers']:>5} peers: median {f['median_ms']} ms (read {f['read_median_ms']} ms, "
            f"wireguard-go kick alone {f['wireguard_go_kick_only_ms']} ms; CPU: wireguard-go "
            f"{f['wireguard_go_cpu_median_ms']} ms, agent {f['agent_cpu_median_ms']} ms); "
            f"again, every peer re-added: median {f['again_median_ms']} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
