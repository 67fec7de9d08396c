"""`natfail demo`: the daemon failing a WireGuard service over, in a lab of
network namespaces with real wireguard-go.

It builds the lab, runs `natfail agent` on every backend (unless
``--no-agent``) and `natfail` in the gateway's namespace with a demo config,
shows `natfailctl status`, keeps the client pinging through the tunnel every
50 ms, kills the active backend and prints the timeline from the daemon's
own switch record (`natfailctl events`), its status and the client's pings:
killed, detected, swapped, cleaned, new backend activated, tunnel back.

``--pair`` shows the gateway pair instead (README "A gateway pair"): two
gateways under keepalived, natfail in pair mode on both, agents on the
backends; the client pings every 20 ms, the master gateway dies, and the
timeline shows the VIPs moving, the client's tunnel back on the same backend
and no new handshake."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from natfail import exitcodes
from natfail.lab import (
    PUBLIC_PORT,
    PUBLIC_V4,
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
from natfail.lab.pair import PairAgents, PairLab

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


def run(*, agents: bool = True, pair: bool = False) -> int:
    if os.geteuid() != 0:
        sys.stderr.write("natfail: demo: run as root (it builds network namespaces)\n")
        return exitcodes.FAILED
    out = _Out()
    if pair:
        return _run_pair(out)
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


# -- natfail demo --pair -------------------------------------------------------------------

PAIR_PROBE = probe_table(interval=0.3, timeout=0.2, rise=1, fall=2)
PAIR_PING = 0.02
PAIR_RECOVERY_LIMIT = 30.0


def _run_pair(out: _Out) -> int:
    out.title(
        "natfail demo --pair: a gateway pair under keepalived, in a lab of network namespaces"
    )
    try:
        with PairLab(backends=2) as lab:
            agents = lab.agents()
            runners = {
                g.name: DaemonRunner(
                    lab,
                    lab.write_config(gw=g, agents=True, pair=True, extra_service=PAIR_PROBE),
                    ns=g,
                )
                for g in lab.gateways
            }
            try:
                return _pair_story(lab, out, agents, runners)
            finally:
                for runner in runners.values():
                    try:
                        runner.stop()
                    except LabError as exc:
                        out.line(f"stopping a daemon: {exc}")
                agents.stop_all()
    except LabError as exc:
        sys.stderr.write(f"natfail: demo: {exc}\n")
        return exitcodes.FAILED


def _pair_failed(out: _Out, lab: PairLab, runners: dict[str, DaemonRunner], what: str) -> int:
    out.line(out.paint("31", what))
    for g in lab.gateways:
        out.line(f"--- natfail on {g.name}, its log:")
        out.line(runners[g.name].logs().rstrip()[-6000:])
        out.line(f"--- keepalived on {g.name}, its log (end):")
        out.line(lab.keepalived_log(g).rstrip()[-2000:])
    return exitcodes.FAILED


def _service(runner: DaemonRunner) -> dict[str, Any]:
    """The daemon's service, {} when it does not answer."""
    try:
        return runner.service()
    except LabError:
        return {}


def _pair_story(
    lab: PairLab, out: _Out, agents: PairAgents, runners: dict[str, DaemonRunner]
) -> int:
    a, b = lab.backends[0], lab.backends[1]
    gw1, gw2 = lab.gateways
    out.line(
        f"lab {lab.id}: client -> {PUBLIC_V4}:{PUBLIC_PORT} (the VIP) on gateway {gw1.name} "
        f"({gw1.wan_v4}, VRRP priority {gw1.priority}) or {gw2.name} ({gw2.wan_v4}, "
        f"{gw2.priority})\n  -> backend a {a.address} (priority 100), b {b.address} (priority 90)"
    )
    out.line(
        f"keepalived on both gateways: VRRPv3, advert every {lab.advert_int:g} s, so the "
        f"backup takes over\n  {3 * lab.advert_int:.2f} s (3 adverts) + skew after the "
        "master's last advert"
    )
    out.line("probe: every 0.3 s, timeout 0.2 s, up after 1 answer, down after 2 misses")
    agents.start_all()
    out.line(
        "natfail agent runs on both backends; natfail runs with `[daemon] pair = true` on both "
        "gateways:\n  the gateway holding the VIP decides, the other follows what the agents "
        "recorded"
    )
    for runner in runners.values():
        runner.start()
    for g in lab.gateways:
        if not runners[g.name].wait_ready(15):
            return _pair_failed(out, lab, runners, f"natfail on {g.name} did not start")
    master = lab.wait_master(15.0)
    if master is None:
        return _pair_failed(out, lab, runners, "keepalived elected no master")
    backup = lab.other(master)
    m_run, b_run = runners[master.name], runners[backup.name]

    def agreed() -> bool:
        m, f = _service(m_run), _service(b_run)
        return (
            m.get("role") == "decide"
            and f.get("role") == "follow"
            and m.get("active") is not None
            and m.get("active") == f.get("active")
        )

    if not wait_until(agreed, 20.0, 0.1):
        return _pair_failed(
            out, lab, runners, "the gateways did not agree on one backend (decide/follow)"
        )
    for g, role in ((master, "master, holds the VIPs"), (backup, "backup")):
        out.line()
        out.title(f"{g.name} ({role}): natfailctl status")
        out.line(runners[g.name].ctl("status").stdout.rstrip())
    out.line()
    before = str(_service(m_run).get("active"))
    carrier = lab.backend(before)
    if not lab.client_ping(count=3, interval=0.1, timeout=5):
        return _pair_failed(out, lab, runners, "the client's tunnel does not carry pings")
    handshake = lab.latest_handshake(carrier)
    endpoint = lab.client_endpoint()
    out.line(
        f"client pings {SERVER_TUNNEL_V4} through the tunnel every {PAIR_PING * 1000:.0f} ms, "
        f"through {master.name} to backend {before}"
    )
    pinger = Pinger(lab, PAIR_PING)
    try:
        if pinger.first_reply_after(time.time(), 5.0) is None:
            return _pair_failed(out, lab, runners, "no ping replies before the kill")
        time.sleep(1.0)
        killed = lab.kill_gateway(master)
        out.line(out.paint("31", f"killed gateway {master.name}: every process, links down"))
        moved_gw = lab.wait_master(10.0, gw=backup, interval=0.01)
        moved = time.time()
        decided = (
            time.time()
            if wait_until(lambda: _service(b_run).get("role") == "decide", 10.0, 0.02)
            else None
        )
        recovered = pinger.first_reply_after(killed + 0.1, PAIR_RECOVERY_LIMIT)
        last = pinger.last_reply_before(killed + 0.1)
        time.sleep(0.5)
    finally:
        pinger.stop()
    after_service = _service(b_run)
    after = after_service.get("active")
    new_handshake = lab.latest_handshake(carrier)
    new_endpoint = lab.client_endpoint()
    out.line()
    out.title("timeline (from the kill)")
    if moved_gw is None:
        return _pair_failed(out, lab, runners, f"{backup.name} did not take the VIPs over")
    if recovered is None or last is None:
        return _pair_failed(
            out, lab, runners, f"the client's tunnel was not back within {PAIR_RECOVERY_LIMIT:g} s"
        )
    events = [
        (killed, f"master {master.name} killed", ""),
        (moved, f"VIPs moved: {backup.name} is the master (seen by polling every 10 ms)", ""),
        (recovered, f"client tunnel back, through {backup.name} to backend {after}", "32"),
    ]
    if decided is not None:
        events.append(
            (decided, f"natfail on {backup.name} saw the address: role decide, keeping {after}", "")
        )
    for at, text, colour in sorted(events, key=lambda e: e[0]):
        line = f"  {(at - killed) * 1000:8.0f} ms  {text}"
        out.line(out.paint(colour, line) if colour else line)
    out.line()
    outage = recovered - last
    skew = (256 - backup.priority) * lab.advert_int / 256
    out.line(
        f"client outage {outage:.2f} s (the longest silence of its pings); VRRP's master-down "
        f"interval\n  on {backup.name}: 3 x {lab.advert_int:g} s + skew {skew:.2f} s = "
        f"{3 * lab.advert_int + skew:.2f} s"
    )
    same = after == before
    rehandshake = new_handshake != handshake
    out.line(
        f"backend before {before}, after {after}: "
        + ("same backend" if same else out.paint("31", "a different backend"))
    )
    out.line(
        "client re-handshake: "
        + (
            out.paint("31", "yes (its latest handshake changed)")
            if rehandshake
            else "none (its latest handshake with the backend is unchanged)"
        )
        + f"; client endpoint {new_endpoint}"
    )
    if decided is None or not same or rehandshake or new_endpoint != endpoint:
        return _pair_failed(
            out, lab, runners, "the takeover did not keep the client's session; the logs:"
        )
    out.line(
        f"{backup.name} installed the DNAT to {after} while it followed, so the takeover "
        "changed no rule\nand WireGuard's session went on as if nothing happened. Removing "
        "the lab."
    )
    return exitcodes.OK
