"""`natfail demo`: a lab of namespaces with real WireGuard, shown working.

The daemon loop is not built yet, so this demo does by hand what the daemon
will do by itself: it probes the backends with real handshakes, points the
public port at the active one, kills it, sees the probe fail, moves the rule
to the standby and shows the client's tunnel working again. Every step is
timed from the moment the backend was killed."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from natfail import exitcodes
from natfail.lab import Lab, LabBackend, LabError

REPO = Path(__file__).resolve().parents[1]


class _Out:
    def __init__(self) -> None:
        self.colour = sys.stdout.isatty() and os.environ.get("NO_COLOR") is None
        self.start = time.monotonic()

    def _paint(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def step(self, text: str) -> None:
        print(f"{self._paint('2', f'[{time.monotonic() - self.start:6.2f}s]')} {text}", flush=True)

    def good(self, text: str) -> None:
        self.step(self._paint("32", text))

    def bad(self, text: str) -> None:
        self.step(self._paint("31", text))

    def title(self, text: str) -> None:
        print(self._paint("1", text), flush=True)


def _probe(lab: Lab, backend: LabBackend) -> tuple[bool, str]:
    argv = [
        sys.executable, "-m", "natfail.cli.ctl", "--config", str(lab.write_config()),
        "probe", backend.address, "--server-key", lab.server_key.public_b64, "--timeout", "0.5",
    ]
    proc = lab.exec(lab.gateway, argv, check=False, timeout=30,
                    env={"PYTHONPATH": str(REPO)})
    line = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return proc.returncode == 0, line[-1] if line else "no output"


def _tunnel_works(lab: Lab) -> bool:
    return lab.client_ping(count=3, interval=0.1, timeout=5.0)


def run() -> int:
    if os.geteuid() != 0:
        sys.stderr.write("natfail: demo: run as root (it builds network namespaces)\n")
        return exitcodes.FAILED
    out = _Out()
    out.title("natfail demo: WireGuard failover in a lab of network namespaces")
    try:
        with Lab(backends=2) as lab:
            return _story(lab, out)
    except LabError as exc:
        sys.stderr.write(f"natfail: demo: {exc}\n")
        return exitcodes.FAILED


def _story(lab: Lab, out: _Out) -> int:
    a, b = lab.backends[0], lab.backends[1]
    out.step(f"lab {lab.id} up: client -> gateway {lab.public_v4}:{lab.public_port} -> "
             f"backends a {a.address}, b {b.address} (wireguard-go, one server key)")
    for backend in (a, b):
        ok, line = _probe(lab, backend)
        (out.good if ok else out.bad)(f"handshake probe of {backend.name}: {line}")
        if not ok:
            return exitcodes.FAILED
    lab.set_static_dnat(a)
    out.step(f"DNAT {lab.public_v4}:{lab.public_port} -> a {a.address}")
    before = lab.transfers()
    if not _tunnel_works(lab):
        out.bad("the client's tunnel does not carry pings")
        return exitcodes.FAILED
    out.good(f"client pings 10.99.0.1 through the tunnel, carried by "
             f"{', '.join(lab.carrying_backends(before))}")

    out.title("failover (by hand until the daemon exists)")
    a.stop()
    killed = time.monotonic()

    def since() -> str:
        return f"+{(time.monotonic() - killed) * 1000:.0f} ms after the kill"

    out.bad(f"backend a killed ({since()})")
    ok, line = _probe(lab, a)
    out.step(f"probe of a: {line} ({since()})")
    if ok:
        return exitcodes.FAILED
    lab.set_static_dnat(b)
    out.step(f"DNAT swapped to b {b.address} in one nft transaction ({since()})")
    lab.flush_conntrack()
    out.step(f"conntrack entries of the old flow removed ({since()})")
    lab.client_rehandshake()
    before = lab.transfers()
    if not _tunnel_works(lab):
        out.bad("the client's tunnel did not come back")
        return exitcodes.FAILED
    out.good(f"client tunnel back, carried by {', '.join(lab.carrying_backends(before))} "
             f"({since()})")
    out.step(f"client endpoint still {lab.client_endpoint()}")
    out.step("removing the lab")
    return exitcodes.OK
