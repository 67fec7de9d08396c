"""`natfail demo`: the daemon failing a WireGuard service over, in a lab of
network namespaces with real wireguard-go.

It builds the lab, runs `natfail agent` on every backend (unless
``--no-agent``) and `natfail` in the gateway's namespace with a demo config,
shows `natfailctl status`, keeps the client pinging through the tunnel every
50 ms, kills the active backend and prints the timeline from the daemon's
own switch record (`natfailctl events`), its status and the client's pings:
killed, detected, swapped, cleaned, new backend activated, tunnel back."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from natfail import exitcodes
from natfail.lab import (
    SERVER_TUNNEL_V4,
    DaemonRunner,
    Lab,
    LabAgents,
    LabError,
    Pinger,
    decided_at,
    probe_table,
    wait_until,
)

PROBE = probe_table(interval=0.5, timeout=0.3, rise=1, fall=2)
RECOVERY_LIMIT = 40.0


class _Out:
    def __init__(self) -> None:
        self.colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ

    def paint(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def title(self, text: str) -> None:
        print(self.paint("1", text), flush=True)

    def line(self, text: str = "") -> None:
        print(text, flush=True)


def run(*, agents: bool = True) -> int:
    if os.geteuid() != 0:
        sys.stderr.write("natfail: demo: run as root (it builds network namespaces)\n")
        return exitcodes.FAILED
    out = _Out()
    out.title("natfail demo: WireGuard failover in a lab of network namespaces")
    try:
        with Lab(backends=2) as lab:
            return _story(lab, out, agents)
    except LabError as exc:
        sys.stderr.write(f"natfail: demo: {exc}\n")
        return exitcodes.FAILED


def _activation(daemon: DaemonRunner, backend: str) -> dict[str, Any] | None:
    for entry in daemon.service().get("backends", []):
        agent = entry.get("agent") if entry.get("name") == backend else None
        if isinstance(agent, dict) and isinstance(agent.get("last_activation"), dict):
            return dict(agent["last_activation"])
    return None


def _clients(daemon: DaemonRunner, backend: str) -> int:
    for entry in daemon.service().get("backends", []):
        agent = entry.get("agent")
        if entry.get("name") == backend and isinstance(agent, dict):
            return int(agent.get("clients") or 0)
    return 0


def _story(lab: Lab, out: _Out, agents: bool) -> int:
    a, b = lab.backends[0], lab.backends[1]
    daemon = DaemonRunner(lab, lab.write_config(extra_service=PROBE, agents=agents))
    out.line(
        f"lab {lab.id}: client -> gateway {lab.public_v4}:{lab.public_port} -> "
        f"backend a {a.address} (priority 100), b {b.address} (priority 90)"
    )
    out.line("probe: every 0.5 s, timeout 0.3 s, up after 1 answer, down after 2 misses")
    if agents:
        LabAgents(lab).start_all()
        out.line("natfail agent runs on both backends (--no-agent: without them)")
    else:
        out.line("no agents on the backends: the client recovers on WireGuard's own timers")
    daemon.start()
    if not daemon.wait_active("a", 15):
        out.line(out.paint("31", "the daemon did not select backend a; its log:"))
        out.line(daemon.logs())
        return exitcodes.FAILED
    out.line()
    out.line(daemon.ctl("status").stdout.rstrip())
    out.line()
    if not lab.client_ping(count=3, interval=0.1, timeout=5):
        out.line(out.paint("31", "the client's tunnel does not carry pings"))
        return exitcodes.FAILED
    out.line(f"client pings {SERVER_TUNNEL_V4} through the tunnel every 50 ms")
    if agents and not wait_until(lambda: _clients(daemon, "a") > 0, 10, 0.2):
        out.line(out.paint("31", "backend a's agent did not report the client; the log:"))
        out.line(daemon.logs())
        return exitcodes.FAILED
    pinger = Pinger(lab, 0.05)
    time.sleep(1.0)
    killed = time.time()
    a.stop()
    out.line(out.paint("31", "killed backend a's wireguard-go"))
    swapped = daemon.wait_switch("a", "b", after=killed, timeout=10)
    recovered = pinger.first_reply_after(killed + 0.2, RECOVERY_LIMIT)
    pinger.stop()
    activation = _activation(daemon, "b") if agents else None
    daemon.stop()
    out.line()
    out.title("timeline (from the kill)")
    out.line(f"  {0:8.0f} ms  backend a killed")
    if swapped is None:
        out.line(out.paint("31", "the daemon did not fail over; its log:"))
        out.line(daemon.logs())
        return exitcodes.FAILED
    out.line(f"  {(decided_at(swapped) - killed) * 1000:8.0f} ms  failure detected by the probes")
    out.line(
        f"  {(swapped['unix_time'] - killed) * 1000:8.0f} ms  rules swapped to b "
        f"(one transaction: {swapped['swap_ms']:.1f} ms) and conntrack cleaned "
        f"({swapped['cleanup_ms']:.1f} ms)"
    )
    if activation is not None:
        told = "answered" if activation.get("answered") else "did not answer"
        out.line(
            f"  {(float(activation['at']) - killed) * 1000:8.0f} ms  b's agent told to bring "
            f"{activation.get('clients')} client(s) over; it {told} in "
            f"{float(activation.get('elapsed') or 0) * 1000:.1f} ms"
        )
    if recovered is None:
        out.line(out.paint("31", f"  the client's tunnel was not back within {RECOVERY_LIMIT:g} s"))
        return exitcodes.FAILED
    out.line(
        out.paint(
            "32", f"  {(recovered - killed) * 1000:8.0f} ms  client tunnel back, through backend b"
        )
    )
    out.line()
    detected = decided_at(swapped) - killed
    outage = recovered - killed
    out.line(
        f"detection {detected:.2f} s, client outage {outage:.2f} s "
        f"({outage - detected:.2f} s after the detection)"
    )
    if agents:
        out.line(
            "Backend b started the handshake with the client itself, told by its agent "
            "(compare:\nnatfail demo --no-agent)."
        )
    else:
        out.line(
            "The gap between the swap and the tunnel is WireGuard's own: backend b has no "
            "session\nwith the client until the client's WireGuard starts a new handshake "
            "(it does so\nafter about 5 to 15 s without answers). With agents: natfail demo."
        )
    out.line(f"client endpoint still {lab.client_endpoint()}; removing the lab")
    return exitcodes.OK
