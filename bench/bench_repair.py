"""How fast the daemon puts its rules back after `nft flush ruleset`.

A lab with real wireguard-go, the daemon in the gateway namespace (nftables),
and `nft monitor` in the same namespace: the time from starting `nft flush
ruleset` to the event of natfail's table coming back. It is an upper bound:
it includes starting the nft process (a few ms), and the flush event and the
repair event usually reach the pipe together. Target: 100 ms.

Writes bench/results/repair.json. Usage (root): .venv/bin/python bench/bench_repair.py [-n N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import machine as machine_info  # noqa: E402
from common import write_results  # noqa: E402

from natfail.lab import DaemonRunner, Lab  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "repair.json"
TARGET_MS = 100.0


def _read_until(proc: subprocess.Popen[str], needle: str, timeout: float) -> float | None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            return None
        if needle in line:
            return time.monotonic()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=30, help="flushes (default 30)")
    args = parser.parse_args()
    samples: list[float] = []
    with Lab(backends=2) as lab:
        config = lab.write_config()
        daemon = DaemonRunner(lab, config)
        daemon.start()
        if not daemon.wait_active("a", 15):
            raise SystemExit("the daemon did not select a: " + daemon.logs())
        monitor = lab.popen(lab.gateway, ["nft", "monitor", "tables"], stdout=subprocess.PIPE)
        time.sleep(0.3)
        for _ in range(args.n):
            flushed = time.monotonic()
            lab.exec(lab.gateway, ["nft", "flush", "ruleset"])
            back = _read_until(monitor, "add table inet natfail", 5)
            if back is None:
                raise SystemExit("the table did not come back within 5 s: " + daemon.logs())
            samples.append((back - flushed) * 1000)
            time.sleep(0.2)
        monitor.kill()
        daemon.stop()
    samples.sort()
    result = {
        "what": "start of `nft flush ruleset` in the gateway -> natfail's table back "
        "(upper bound: includes starting nft)",
        "machine": machine_info(),
        "flushes": len(samples),
        "median_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 2),
        "max_ms": round(samples[-1], 2),
        "target_ms": TARGET_MS,
        "meets_target": samples[-1] <= TARGET_MS,
    }
    write_results(RESULTS, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
