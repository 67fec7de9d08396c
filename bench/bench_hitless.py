"""The client's outage on a failover, with and without natfail's agents, and under NGINX.

Three setups, each in a lab of its own (two wireguard-go backends, the client's own
wireguard-go, ``ping -D`` through the tunnel every 20 ms for the whole setup):

* ``agents``: the daemon (probe every 0.5 s, timeout 0.3 s, rise 1, fall 2, failback
  sticky, the probe settings of bench_failover.py) with `natfail agent` on both
  backends: on a switch the gateway tells the new backend's agent to initiate the
  handshake with the recent clients;
* ``no-agent``: the same daemon, no agents: the client comes back on WireGuard's own
  timers (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT, about 15 s);
* ``nginx``: NGINX's stream module as the UDP proxy, configured as in bench_nginx.py
  (primary with max_fails=1 fail_timeout=10s, backup, proxy_timeout 10s).

Two kinds of event, alternating between the backends:

* crash: the active backend's wireguard-go is SIGKILLed (its UDP port closes; with
  agents, its agent is SIGKILLed in the same instant). The outage runs from the kill
  to the client's first ping reply after it (the dead backend cannot answer, so that
  reply came through the other one); the detection from the kill to the moment the
  daemon's swap began (``decided_at`` of its switch record).
* planned switch: ``natfailctl switch wg0 OTHER``. The old backend answers until the
  swap, so the outage runs from the moment the swap began to the first reply received
  after the switch record (written once the swap and the conntrack cleanup are done);
  from the command's start is recorded too. NGINX has no planned switch here
  (bench_nginx.py measures none; a reload keeps a UDP session on its upstream until
  proxy_timeout): crashes only.

Before every event the killed backend (and its agent) runs again and the daemon shows
both backends up (and both agents reachable), the client forgets its session
(``lab.client_rehandshake()``) and pings through the tunnel, with agents the active
backend's agent has reported the client, and at least 6 s passed since the previous
event (WireGuard sends at most one handshake per peer per 5 s: a backend that
answered the client's handshake moments before cannot initiate one). After the event:
the client's endpoint (still the public address?) and which backend carried its pings.

Writes bench/results/hitless.json; bench/plot.py draws docs/images/hitless.png.
Usage (root): .venv/bin/python bench/bench_hitless.py [-n N] [--slow-n N] [--only SETUPS]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_failover import EXTRA, PROBE  # noqa: E402
from bench_nginx import NGINX_SETTINGS, nginx_conf  # noqa: E402
from common import RESULTS_DIR, Daemon, Pinger, machine, stats, write_results  # noqa: E402

from natfail import exitcodes  # noqa: E402
from natfail.lab import (  # noqa: E402
    PUBLIC_PORT,
    PUBLIC_V4,
    Lab,
    LabAgents,
    LabBackend,
    decided_at,
    wait_until,
)

RESULTS = RESULTS_DIR / "hitless.json"
SETUPS = ("agents", "no-agent", "nginx")
PING_INTERVAL = 0.02
RECOVERY_LIMIT = 40.0
EVENT_SPACING = 6.0
"""Seconds at least between two events (see the docstring: WireGuard's 5 s)."""
STALE_REPLY = 0.01
"""A reply received within this long after a planned switch's record may still be the
old backend's answer to a ping sent before the conntrack cleanup: not counted."""
PUBLIC = f"{PUBLIC_V4}:{PUBLIC_PORT}"
TARGETS = {
    "crash_outage_minus_detection_median_s": 0.2,
    "switch_outage_median_s": 0.2,
}


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


@dataclass
class Bed:
    """One setup's lab and what runs in its gateway."""

    setup: str
    lab: Lab
    pinger: Pinger
    daemon: Daemon | None = None
    agents: LabAgents | None = None
    last_event: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(f"[{self.setup}] {text}", flush=True)


# -- between events -----------------------------------------------------------------------


def restore(bed: Bed) -> None:
    """Every backend (and agent) running, the daemon seeing them up (and reachable)."""
    lab, daemon, agents = bed.lab, bed.daemon, bed.agents
    for b in lab.backends:
        if not b.running:
            b.start()
        if agents is not None and b.name not in agents.procs:
            agents.start(b)
    if daemon is None:
        return

    def ready() -> bool:
        for entry in daemon.service().get("backends", []):
            if entry.get("state") != "up":
                return False
            agent = entry.get("agent")
            if agents is not None and not (isinstance(agent, dict) and agent.get("reachable")):
                return False
        return True

    if not wait_until(ready, 20.0, 0.1):
        raise RuntimeError(f"{bed.setup}: the backends are not all up: {daemon.service()}")


def agent_view(daemon: Daemon, backend: str) -> dict[str, Any]:
    for entry in daemon.service().get("backends", []):
        agent = entry.get("agent")
        if entry.get("name") == backend and isinstance(agent, dict):
            return agent
    return {}


def client_established(bed: Bed, active: str | None) -> None:
    """A fresh session from the client, through the active backend; with agents, that
    backend's agent has reported the client to the gateway."""
    lab = bed.lab
    for _ in range(3):
        lab.client_rehandshake()
        if lab.client_ping(count=2, interval=0.05, timeout=3):
            break
    else:
        raise RuntimeError(f"{bed.setup}: no pings through the tunnel before the event")
    if bed.daemon is not None and bed.agents is not None and active is not None:
        daemon = bed.daemon
        if not wait_until(lambda: int(agent_view(daemon, active).get("clients") or 0) > 0, 10, 0.1):
            raise RuntimeError(f"{bed.setup}: the agent of {active} did not report the client")


def steady(bed: Bed) -> None:
    """Waits out the spacing between events, then makes sure pings flow."""
    wait = bed.last_event + EVENT_SPACING - time.time()
    if wait > 0:
        time.sleep(wait)
    if bed.pinger.first_reply_after(time.time(), 5.0) is None:
        raise RuntimeError(f"{bed.setup}: no ping replies before the event")
    time.sleep(0.3)


def crash(victim: LabBackend) -> float:
    """SIGKILLs the backend's wireguard-go (its UDP port closes at once; a SIGTERM lets
    wireguard-go take its time to close the device) and returns when it is gone."""
    pid = victim.pid
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not victim.running, 5.0, 0.005)
    dead = time.time()
    victim.stop()  # removes its UAPI socket
    return dead


def carried_by(lab: Lab) -> list[str]:
    before = lab.transfers()
    lab.client_ping(count=2, interval=0.05, timeout=3)
    return lab.carrying_backends(before)


def after_event(bed: Bed, row: dict[str, Any], recovered: float | None) -> None:
    """What every row records after its event: the gap in the client's replies, its
    endpoint and which backend carried its pings."""
    lab = bed.lab
    if recovered is not None:
        before = bed.pinger.last_reply_before(recovered - 1e-6)
        row["reply_gap_ms"] = ms(recovered - before) if before is not None else None
    endpoint = lab.client_endpoint()
    row["client_endpoint"] = endpoint
    row["endpoint_public"] = endpoint == PUBLIC
    row["carried_by"] = carried_by(lab) if recovered is not None else []
    bed.rows.append(row)


# -- natfail --------------------------------------------------------------------------------


def natfail_event(bed: Bed, kind: str, index: int) -> None:
    lab, daemon, agents = bed.lab, bed.daemon, bed.agents
    assert daemon is not None
    restore(bed)
    active = daemon.active()
    if active is None:
        raise RuntimeError(f"{bed.setup}: no active backend")
    victim = lab.backend(active)
    other = next(b for b in lab.backends if b.name != active)
    client_established(bed, active)
    steady(bed)
    row: dict[str, Any] = {"setup": bed.setup, "kind": kind, "n": index, "from": active}
    row["to"] = other.name
    row["since_previous_event_s"] = (
        round(time.time() - bed.last_event, 1) if bed.last_event else None
    )
    row["last_reply_before_ms"] = None
    if kind == "crash":
        agent = agents.procs.get(victim.name) if agents is not None else None
        t0 = time.time()
        if agent is not None:
            agent.kill()
        dead = crash(victim)
        bed.last_event = t0
        if agents is not None:
            agents.stop(victim)  # reaps the agent killed above
        row["kill_call_ms"] = ms(dead - t0)
    else:
        t0 = time.time()
        bed.last_event = t0
        proc = daemon.ctl("switch", "wg0", other.name)
        dead = time.time()
        if proc.returncode != 0:
            raise RuntimeError(f"{bed.setup}: natfailctl switch: {proc.stderr.strip()}")
        row["command_ms"] = ms(dead - t0)
    before = bed.pinger.last_reply_before(t0)
    row["last_reply_before_ms"] = ms(before - t0) if before is not None else None
    record = daemon.wait_switch(active, other.name, after=t0, timeout=10.0)
    if record is None:
        raise RuntimeError(f"{bed.setup}: no switch {active} -> {other.name}: {daemon.logs()}")
    swap = decided_at(record)
    row["detected_ms"] = ms(swap - t0)
    row["swapped_ms"] = ms(float(record["unix_time"]) - t0)
    row["swap_ms"] = record["swap_ms"]
    row["conntrack_cleanup_ms"] = record["cleanup_ms"]
    row["reason"] = record.get("reason")
    if kind == "crash":
        recovered = bed.pinger.first_reply_after(dead, RECOVERY_LIMIT)
        row["outage_ms"] = ms(recovered - t0) if recovered is not None else None
        row["after_detection_ms"] = ms(recovered - swap) if recovered is not None else None
    else:
        after = max(float(record["unix_time"]), dead - 1.0) + STALE_REPLY
        recovered = bed.pinger.first_reply_after(after, RECOVERY_LIMIT)
        row["outage_ms"] = ms(recovered - swap) if recovered is not None else None
        row["from_command_ms"] = ms(recovered - t0) if recovered is not None else None
    if agents is not None:
        activation = agent_view(daemon, other.name).get("last_activation")
        if isinstance(activation, dict) and float(activation.get("at") or 0) >= t0:
            row["activation"] = {
                "sent_ms": ms(float(activation["at"]) - t0),
                "answered": activation.get("answered"),
                "clients": activation.get("clients"),
                "initiated": activation.get("initiated"),
                "elapsed_ms": ms(float(activation.get("elapsed") or 0)),
            }
        else:
            row["activation"] = None
    after_event(bed, row, recovered)
    detail = f", detected {row['detected_ms']} ms, swapped {row['swapped_ms']} ms"
    bed.say(
        f"{kind} {index:2d}: {active} -> {other.name}{detail}, outage "
        f"{row['outage_ms']} ms, endpoint {row['client_endpoint']}, carried by "
        f"{','.join(row['carried_by']) or '-'}"
    )


def keep_logs(lab: Lab, setup: str) -> None:
    """Copies the lab's logs (the daemon's, the agents', wireguard-go's) out of the lab's
    directory before it goes."""
    keep = Path(tempfile.mkdtemp(prefix=f"natfail-bench-hitless-{setup}-"))
    for path in lab.dir.glob("*.log"):
        shutil.copy(path, keep / path.name)
    print(f"[{setup}] failed: its logs are in {keep}", file=sys.stderr)


@contextmanager
def natfail_bed(setup: str) -> Iterator[Bed]:
    with Lab(backends=2, ipv6=False) as lab:
        agents = LabAgents(lab) if setup == "agents" else None
        if agents is not None:
            agents.start_all()
        config = lab.write_config(extra_service=EXTRA, agents=agents is not None)
        daemon = Daemon(lab, config, lab.dir / "natfail.log")
        pinger: Pinger | None = None
        try:
            if not daemon.wait_active("a", 20):
                raise RuntimeError(f"{setup}: the daemon did not select a: {daemon.logs()}")
            pinger = Pinger(lab, PING_INTERVAL)
            yield Bed(setup, lab, pinger, daemon=daemon, agents=agents)
        except BaseException:
            keep_logs(lab, setup)
            raise
        finally:
            if pinger is not None:
                pinger.stop()
            daemon.stop()
            if agents is not None:
                agents.stop_all()
            if "Traceback" in daemon.logs():
                print(f"[{setup}] the daemon's log has a traceback", file=sys.stderr)


# -- NGINX ----------------------------------------------------------------------------------


def carrier(lab: Lab) -> LabBackend:
    names = carried_by(lab)
    if len(names) != 1:
        raise RuntimeError(f"nginx: the tunnel is carried by {names}, not by one backend")
    return lab.backend(names[0])


def nginx_event(bed: Bed, kind: str, index: int) -> None:
    assert kind == "crash"
    lab = bed.lab
    restore(bed)
    client_established(bed, None)
    victim = carrier(lab)
    other = next(b for b in lab.backends if b is not victim)
    steady(bed)
    row: dict[str, Any] = {"setup": bed.setup, "kind": kind, "n": index, "from": victim.name}
    row["to"] = other.name
    row["since_previous_event_s"] = (
        round(time.time() - bed.last_event, 1) if bed.last_event else None
    )
    t0 = time.time()
    dead = crash(victim)
    bed.last_event = t0
    before = bed.pinger.last_reply_before(t0)
    row["last_reply_before_ms"] = ms(before - t0) if before is not None else None
    row["kill_call_ms"] = ms(dead - t0)
    row["detected_ms"] = None  # NGINX says nothing that could be timed
    recovered = bed.pinger.first_reply_after(dead, RECOVERY_LIMIT)
    row["outage_ms"] = ms(recovered - t0) if recovered is not None else None
    after_event(bed, row, recovered)
    bed.say(
        f"{kind} {index:2d}: {victim.name} killed, outage {row['outage_ms']} ms, endpoint "
        f"{row['client_endpoint']}, carried by {','.join(row['carried_by']) or '-'}"
    )


@contextmanager
def nginx_bed() -> Iterator[Bed]:
    if shutil.which("nginx") is None:
        raise RuntimeError("nginx: not installed (scripts/bench --install-only installs it)")
    directory = Path(tempfile.mkdtemp(prefix="natfail-bench-hitless-nginx-"))
    nginx: subprocess.Popen[str] | None = None
    pinger: Pinger | None = None
    try:
        with Lab(backends=2, ipv6=False) as lab:
            a, b = lab.backends[0], lab.backends[1]
            conf = directory / "nginx.conf"
            conf.write_text(nginx_conf(directory, a, b))
            argv = ["nginx", "-p", str(directory), "-e", str(directory / "error.log")]
            lab.exec(lab.gateway, [*argv, "-t", "-c", str(conf)])
            nginx = lab.popen(
                lab.gateway,
                [*argv, "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if not wait_until(lambda: (directory / "nginx.pid").exists(), 5):
                raise RuntimeError("nginx did not start")
            time.sleep(0.3)
            try:
                pinger = Pinger(lab, PING_INTERVAL)
                yield Bed("nginx", lab, pinger)
            finally:
                if pinger is not None:
                    pinger.stop()
                if nginx.poll() is None:
                    nginx.terminate()
                    try:
                        nginx.wait(5)
                    except subprocess.TimeoutExpired:
                        nginx.kill()
                        nginx.wait(5)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- the run --------------------------------------------------------------------------------


def run_setup(setup: str, counts: dict[str, int]) -> list[dict[str, Any]]:
    kinds = [k for k in ("crash", "switch") if counts[k] > 0]
    event: Callable[[Bed, str, int], None] = natfail_event
    if setup == "nginx":
        kinds = [k for k in kinds if k == "crash"]
        event = nginx_event
    bed_of = nginx_bed() if setup == "nginx" else natfail_bed(setup)
    started = time.time()
    with bed_of as bed:
        for kind in kinds:
            for i in range(counts[kind]):
                event(bed, kind, i + 1)
        bed.say(f"done in {time.time() - started:.0f} s")
        return bed.rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def col(key: str) -> list[float]:
        return [float(r[key]) for r in rows if r.get(key) is not None]

    out: dict[str, Any] = {
        "events": len(rows),
        "recovered": sum(1 for r in rows if r.get("outage_ms") is not None),
        "endpoint_public": sum(1 for r in rows if r.get("endpoint_public")),
        "carried_by_new_backend": sum(1 for r in rows if r.get("carried_by") == [r["to"]]),
        "outage_ms": stats(col("outage_ms")),
        "outage_samples_ms": col("outage_ms"),
    }
    for key in ("detected_ms", "after_detection_ms", "from_command_ms", "reply_gap_ms"):
        if col(key):
            out[key.removesuffix("_ms") + "_ms"] = stats(col(key))
            out[key.removesuffix("_ms") + "_samples_ms"] = col(key)
    activations = [r["activation"] for r in rows if "activation" in r]
    if activations:
        out["activations_answered"] = sum(1 for a in activations if a and a.get("answered"))
        out["activations_initiated"] = sum(
            1 for a in activations if a and int(a.get("initiated") or 0) > 0
        )
    return out


def targets(setups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    agents = setups.get("agents")
    if not agents:
        return {}
    out: dict[str, Any] = dict(TARGETS)
    crash, switch = agents.get("crash"), agents.get("switch")
    if crash and crash.get("after_detection_ms"):
        median = crash["after_detection_ms"]["median"] / 1000
        out["crash_outage_minus_detection_median_measured_s"] = round(median, 3)
        out["crash_met"] = median <= TARGETS["crash_outage_minus_detection_median_s"]
        # the same target read on the medians themselves
        outage, detected = crash["outage_ms"]["median"], crash["detected_ms"]["median"]
        out["crash_outage_median_s"] = round(outage / 1000, 3)
        out["crash_detected_median_s"] = round(detected / 1000, 3)
        out["crash_met_on_medians"] = outage - detected <= 200
    if switch and switch.get("outage_ms"):
        median = switch["outage_ms"]["median"] / 1000
        out["switch_outage_median_measured_s"] = round(median, 3)
        out["switch_met"] = median <= TARGETS["switch_outage_median_s"]
    return out


def source_commit() -> str:
    """The commit the daemon and the agents ran from, "+dirty" if natfail/ had changes."""

    def git(*argv: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *argv], capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--", "natfail") else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="crashes and switches with agents")
    parser.add_argument(
        "--slow-n",
        type=int,
        default=20,
        help="crashes and switches without agents, and crashes under NGINX (~15 s each)",
    )
    parser.add_argument("--only", default=",".join(SETUPS), help="comma-separated setups")
    parser.add_argument("-o", "--output", type=Path, default=RESULTS, help="the results file")
    args = parser.parse_args()
    chosen = [s for s in SETUPS if s in args.only.split(",")]
    if os.geteuid() != 0:
        print("bench_hitless: run as root", file=sys.stderr)
        return exitcodes.USAGE
    started = time.time()
    commit = source_commit()
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    for setup in chosen:
        n = args.n if setup == "agents" else args.slow_n
        try:
            rows += run_setup(setup, {"crash": n, "switch": n})
        except Exception as exc:  # one setup's failure still leaves the others' figures
            print(f"[{setup}] failed: {exc}", file=sys.stderr)
            failed[setup] = str(exc)[-2000:]
    setups: dict[str, dict[str, Any]] = {}
    for setup in chosen:
        of_setup = [r for r in rows if r["setup"] == setup]
        setups[setup] = {
            kind: summary([r for r in of_setup if r["kind"] == kind])
            for kind in ("crash", "switch")
            if any(r["kind"] == kind for r in of_setup)
        }
    if "nginx" in setups:
        setups["nginx"]["switch"] = None
    result = {
        "what": "the client's outage on a crash of the active backend and on a planned "
        "switch: natfail with agents, natfail without agents, NGINX stream",
        "machine": machine(),
        "commit": commit,
        "probe": PROBE,
        "failback": "sticky",
        "nginx": NGINX_SETTINGS,
        "ping_interval_s": PING_INTERVAL,
        "event_spacing_s": EVENT_SPACING,
        "seconds": round(time.time() - started, 1),
        "outage_means": {
            "crash": "from the kill (wireguard-go, and the agent with agents) to the client's "
            "first ping reply after it",
            "switch": "from the moment the daemon's swap began to the client's first ping "
            "reply after the switch record; from_command: from the start of natfailctl switch",
            "detected": "crash: kill -> the swap began (the probes saw the failure); switch: "
            "natfailctl switch started -> the swap began",
        },
        "nginx_switch": "not measured: bench_nginx.py has no planned switch for NGINX (an "
        "upstream change needs a reload, and a UDP session stays on its upstream until "
        "proxy_timeout)",
        "setups": setups,
        "targets": targets(setups),
        "failed": failed,
        "rows": rows,
    }
    write_results(args.output, result)
    brief = {
        s: {k: v and {"outage_ms": v["outage_ms"]} for k, v in kinds.items()}
        for s, kinds in setups.items()
    }
    print(json.dumps({"summary": brief, "targets": result["targets"]}, indent=2))
    print(f"bench_hitless: {time.time() - started:.0f} s, wrote {args.output}")
    return exitcodes.FAILED if failed else exitcodes.OK


if __name__ == "__main__":
    raise SystemExit(main())
