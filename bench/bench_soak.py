"""Soak: random backend kills and restarts with traffic, for a long time.

A lab with three wireguard-go backends, the daemon in the gateway namespace
(probe every 0.5 s, timeout 0.3 s, rise 1, fall 2), and the client pinging
through the tunnel every 50 ms. Every few seconds a random backend is killed
or restarted (never all three dead at once). Every sample records:

* stale conntrack entries: UDP flows of the public port whose backend is not
  the active one (after the cleanup they must be 0);
* missed failovers: the active backend has been dead for longer than the
  detection bound (fall x interval + timeout + 0.3 s) plus one probe round;
* the daemon's resident memory.

Not part of CI. Writes bench/results/soak.json.
Usage (root): .venv/bin/python bench/bench_soak.py [--minutes 30] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import Daemon, Pinger, machine, write_results  # noqa: E402

from natfail.lab import Lab, probe_table  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "soak.json"
INTERVAL, TIMEOUT, RISE, FALL = 0.5, 0.3, 1, 2
PROBE = probe_table(INTERVAL, TIMEOUT, RISE, FALL)
BOUND = FALL * INTERVAL + TIMEOUT + 0.3 + INTERVAL


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _stale_entries(lab: Lab, active_address: str) -> int:
    listing = lab.exec(lab.gateway, ["conntrack", "-L", "-p", "udp"], check=False).stdout
    stale = 0
    for line in listing.splitlines():
        if f"dport={lab.public_port}" not in line or f"dst={lab.public_v4}" not in line:
            continue
        backends = [b.v4 for b in lab.backends if f"src={b.v4} " in line]
        if backends and backends[0] != active_address:
            stale += 1
    return stale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    samples: list[dict[str, float]] = []
    events: list[dict[str, object]] = []
    missed = 0
    with Lab(backends=3) as lab:
        config = lab.write_config(extra_service=PROBE)
        daemon = Daemon(lab, config, lab.dir / "natfail.log")
        pinger = Pinger(lab)
        try:
            if not daemon.wait_active("a"):
                raise SystemExit("the daemon did not select a: " + daemon.logs())
            started = time.monotonic()
            dead_since: dict[str, float] = {}
            next_event = started + 3.0
            while time.monotonic() - started < args.minutes * 60:
                now = time.monotonic()
                if now >= next_event:
                    alive = [b for b in lab.backends if b.running]
                    dead = [b for b in lab.backends if not b.running]
                    if dead and (len(alive) == 1 or rng.random() < 0.5):
                        backend = rng.choice(dead)
                        backend.start()
                        dead_since.pop(backend.name, None)
                        events.append({"t": round(now - started, 2), "start": backend.name})
                    else:
                        backend = rng.choice(alive)
                        backend.stop()
                        dead_since[backend.name] = now
                        events.append({"t": round(now - started, 2), "kill": backend.name})
                    next_event = now + rng.uniform(2.0, 8.0)
                active = daemon.status_active()
                active_backend = next((b for b in lab.backends if b.name == active), None)
                stale = _stale_entries(lab, active_backend.v4) if active_backend else 0
                alive_names = {b.name for b in lab.backends if b.running}
                if (
                    active in dead_since
                    and alive_names
                    and time.monotonic() - dead_since[active] > BOUND
                ):
                    missed += 1
                    events.append(
                        {"t": round(time.monotonic() - started, 2), "missed_failover": active}
                    )
                    dead_since[active] = time.monotonic()  # count each miss once
                samples.append(
                    {
                        "t": round(time.monotonic() - started, 2),
                        "rss_kib": _rss_kib(daemon.proc.pid),
                        "stale_entries": stale,
                        "active": 0 if active is None else "abc".index(active[0]) + 1,
                    }
                )
                time.sleep(1.0)
        finally:
            pinger.stop()
            daemon.stop()
    rss = [s["rss_kib"] for s in samples]
    result = {
        "what": "random kills and restarts of 3 backends with traffic",
        "machine": machine(),
        "minutes": args.minutes,
        "seed": args.seed,
        "probe": {"interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE, "fall": FALL},
        "kills": sum(1 for e in events if "kill" in e),
        "restarts": sum(1 for e in events if "start" in e),
        "missed_failovers": missed,
        "samples_with_stale_entries": sum(1 for s in samples if s["stale_entries"]),
        "max_stale_entries": max((s["stale_entries"] for s in samples), default=0),
        "rss_kib_first": rss[0] if rss else 0,
        "rss_kib_last": rss[-1] if rss else 0,
        "rss_kib_max": max(rss, default=0),
        "samples": samples,
        "events": events,
    }
    write_results(RESULTS, result, indent=1)
    summary = {k: v for k, v in result.items() if k not in ("samples", "events", "machine")}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
