"""Failover timeline over N kills of the active backend, with the daemon and real WireGuard.

A lab with two wireguard-go backends, the daemon in the gateway namespace with short
probe settings (every 0.5 s, timeout 0.3 s, up after 1 answer, down after 2 misses,
failback sticky), and the wireguard-go client pinging 10.99.0.1 through the tunnel
every 50 ms for the whole run. Each round kills the active backend's wireguard-go
(SIGTERM; its UDP port closes), and takes from the daemon's log when it saw the
backend down ("backend X is down") and when it swapped (its switch record, "switch
service=wg0 from=X to=Y ... swap_ms=N cleanup_ms=N"), and from the pings the client's
outage: the time from the kill to the first reply after the backend was dead. Then
the killed backend is started again and the round waits until the daemon sees it up;
the next kill hits the other backend, so kills alternate.

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
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import RESULTS_DIR, Daemon, Pinger, machine, stats, write_results  # noqa: E402

from natfail.lab import Lab, LabBackend  # noqa: E402

RESULTS = RESULTS_DIR / "failover.json"
PROBE = {"interval": 0.5, "timeout": 0.3, "rise": 1, "fall": 2}
EXTRA = 'failback = "sticky"\n[service.probe]\n' + "\n".join(f"{k} = {v}" for k, v in PROBE.items())
PING_INTERVAL = 0.05
RECOVERY_LIMIT = 40.0


def one_kill(
    lab: Lab, daemon: Daemon, pinger: Pinger, victim: LabBackend, other: LabBackend
) -> dict[str, Any]:
    before = pinger.last_reply_before(time.time())
    killed = time.time()
    victim.stop()
    dead = time.time()
    detected = daemon.wait_log(f"backend {victim.name} is down", killed, 10.0)
    swapped = daemon.wait_log(f"from={victim.name} to={other.name}", killed, 10.0)
    back = pinger.first_reply_after(dead, RECOVERY_LIMIT)
    row: dict[str, Any] = {
        "killed": victim.name,
        "to": other.name,
        "kill_call_ms": round((dead - killed) * 1000, 1),
        "last_reply_before_kill_ms": round((before - killed) * 1000, 1) if before else None,
        "detected_ms": round((detected[0] - killed) * 1000, 1) if detected else None,
        "swapped_ms": round((swapped[0] - killed) * 1000, 1) if swapped else None,
        "swap_ms": None,
        "conntrack_cleanup_ms": None,
        "outage_ms": round((back - killed) * 1000, 1) if back else None,
    }
    if swapped:
        m = re.search(r"swap_ms=([\d.]+) cleanup_ms=([\d.]+)", swapped[1])
        if m:
            row["swap_ms"] = float(m.group(1))
            row["conntrack_cleanup_ms"] = float(m.group(2))
    # bring the victim back and wait until the daemon sees it up again
    restarted = time.time()
    victim.start()
    up = daemon.wait_log(f"backend {victim.name} is up", restarted, 15.0)
    row["back_up_seen_ms"] = round((up[0] - restarted) * 1000, 1) if up else None
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--kills", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_failover: run as root", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    started = time.time()
    with Lab(backends=2) as lab:
        config = lab.write_config(extra_service=EXTRA)
        daemon = Daemon(lab, config, lab.dir / "natfail.log")
        pinger: Pinger | None = None
        try:
            if not daemon.wait_active("a", 20):
                print(daemon.log.read_text(), file=sys.stderr)
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
    return 0 if result["recovered"] == len(rows) == args.kills else 1


if __name__ == "__main__":
    raise SystemExit(main())
