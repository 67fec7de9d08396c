"""Failover timeline over N kills of the active backend, with the daemon and real WireGuard.

A lab with two wireguard-go backends, the daemon in the gateway namespace with short
probe settings (every 0.5 s, timeout 0.3 s, up after 1 answer, down after 2 misses,
failback sticky), and the wireguard-go client pinging 10.99.0.1 through the tunnel
every 50 ms for the whole run. Each round kills the active backend's wireguard-go
(SIGTERM; its UDP port closes), and takes from the daemon's switch record
(`natfailctl events`) when it saw the backend fail (the swap began) and when the
swap and the conntrack cleanup were done, and from the pings the client's outage:
the time from the kill to the first reply after the backend was dead. Then the
killed backend is started again and the round waits until the daemon's status
shows it up; the next kill hits the other backend, so kills alternate.

The outage is dominated by WireGuard itself: the backend that takes over has no
session with the client, and the client only starts a new handshake about 15 s after
its packets stop getting answers (Keepalive-Timeout + Rekey-Timeout).

Writes bench/results/failover.json.
Usage (root): .venv/bin/python bench/bench_failover.py [-n KILLS]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import RESULTS_DIR, Daemon, Pinger, machine, stats, write_results  # noqa: E402

from natfail import exitcodes  # noqa: E402
from natfail.lab import Lab, LabBackend, decided_at, probe_table  # noqa: E402

RESULTS = RESULTS_DIR / "failover.json"
INTERVAL, TIMEOUT, RISE, FALL = 0.5, 0.3, 1, 2
PROBE = {"interval": INTERVAL, "timeout": TIMEOUT, "rise": RISE, "fall": FALL}
EXTRA = 'failback = "sticky"\n' + probe_table(INTERVAL, TIMEOUT, RISE, FALL)
PING_INTERVAL = 0.05
RECOVERY_LIMIT = 40.0


def one_kill(
    lab: Lab, daemon: Daemon, pinger: Pinger, victim: LabBackend, other: LabBackend
) -> dict[str, Any]:
    before = pinger.last_reply_before(time.time())
    killed = time.time()
    victim.stop()
    dead = time.time()
    swapped = daemon.wait_switch(victim.name, other.name, after=killed, timeout=10.0)
    back = pinger.first_reply_after(dead, RECOVERY_LIMIT)
    row: dict[str, Any] = {
        "killed": victim.name,
        "to": other.name,
        "kill_call_ms": round((dead - killed) * 1000, 1),
        "last_reply_before_kill_ms": round((before - killed) * 1000, 1) if before else None,
        "detected_ms": round((decided_at(swapped) - killed) * 1000, 1) if swapped else None,
        "swapped_ms": round((swapped["unix_time"] - killed) * 1000, 1) if swapped else None,
        "swap_ms": swapped["swap_ms"] if swapped else None,
        "conntrack_cleanup_ms": swapped["cleanup_ms"] if swapped else None,
        "outage_ms": round((back - killed) * 1000, 1) if back else None,
    }
    # bring the victim back and wait until the daemon sees it up again
    restarted = time.time()
    victim.start()
    up = daemon.wait_backend_state(victim.name, "up", timeout=15.0)
    row["back_up_seen_ms"] = round((up - restarted) * 1000, 1) if up else None
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--kills", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_failover: run as root", file=sys.stderr)
        return exitcodes.USAGE
    rows: list[dict[str, Any]] = []
    started = time.time()
    with Lab(backends=2) as lab:
        config = lab.write_config(extra_service=EXTRA)
        daemon = Daemon(lab, config, lab.dir / "natfail.log")
        pinger: Pinger | None = None
        try:
            if not daemon.wait_active("a", 20):
                print(daemon.logs(), file=sys.stderr)
                raise SystemExit("bench_failover: the daemon did not select backend a")
            if not lab.client_ping(count=3, interval=0.1, timeout=5):
                raise SystemExit("bench_failover: no pings through the tunnel")
            pinger = Pinger(lab, PING_INTERVAL)
            time.sleep(1.0)
            active, standby = lab.backends[0], lab.backends[1]
            for i in range(args.kills):
                # steady traffic before each kill
                if pinger.first_reply_after(time.time(), 20.0) is None:
                    raise SystemExit("bench_failover: the tunnel did not come back")
                time.sleep(0.5)
                row = one_kill(lab, daemon, pinger, active, standby)
                row["kill"] = i + 1
                rows.append(row)
                print(
                    f"kill {i + 1:2d}: {row['killed']} -> {row['to']}: detected "
                    f"{row['detected_ms']} ms, swapped {row['swapped_ms']} ms (swap "
                    f"{row['swap_ms']} ms, cleanup {row['conntrack_cleanup_ms']} ms), client "
                    f"back {row['outage_ms']} ms",
                    flush=True,
                )
                active, standby = standby, active
        finally:
            if pinger is not None:
                pinger.stop()
            daemon.stop()

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in rows if r.get(key) is not None]

    result = {
        "what": "kill the active backend's wireguard-go; daemon detection, swap, conntrack "
        "cleanup, and the client's outage (ping every 50 ms through the tunnel)",
        "machine": machine(),
        "probe": PROBE,
        "failback": "sticky",
        "ping_interval_s": PING_INTERVAL,
        "kills": len(rows),
        "recovered": sum(1 for r in rows if r["outage_ms"] is not None),
        "seconds": round(time.time() - started, 1),
        "summary_ms": {
            "detected": stats(col("detected_ms")),
            "swapped": stats(col("swapped_ms")),
            "swap": stats(col("swap_ms")),
            "conntrack_cleanup": stats(col("conntrack_cleanup_ms")),
            "outage": stats(col("outage_ms")),
        },
        "note": "outage is mostly WireGuard's: the new backend has no session until the "
        "client re-handshakes, about 15 s after its packets stop getting answers",
        "rows": rows,
    }
    write_results(RESULTS, result)
    print(json.dumps(result["summary_ms"], indent=2))
    return exitcodes.OK if result["recovered"] == len(rows) == args.kills else exitcodes.FAILED


if __name__ == "__main__":
    raise SystemExit(main())
