"""Swap latency of each dataplane: one apply() that moves every service to the other
backend (what the daemon does on a failover), median and p99.

Runs in a fresh empty network namespace (re-executes itself with ``ip netns exec``).
Writes bench/results/dataplane.json. Usage: .venv/bin/python bench/bench_dataplane.py [-n N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import machine as machine_info  # noqa: E402
from common import write_results  # noqa: E402
from nsrun import reexec_in_fresh_netns  # noqa: E402

from natfail import exitcodes  # noqa: E402
from natfail.config import Service  # noqa: E402
from natfail.core import ruleset  # noqa: E402
from natfail.io.iptables import IptablesDataplane  # noqa: E402
from natfail.io.nftables import NftablesDataplane  # noqa: E402
from tests.builders import service  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "dataplane.json"
TARGET_NFT_MS = 1.0


def services() -> list[Service]:
    return [
        service("wg0", "203.0.113.10:51820", [("a", "10.0.0.2:51820"), ("b", "10.0.0.3:51820")]),
        service(
            "wg6", "[2001:db8::10]:51820", [("a", "[fd00::2]:51820"), ("b", "[fd00::3]:51820")]
        ),
    ]


def measure(dp: NftablesDataplane | IptablesDataplane, n: int) -> dict[str, float | int]:
    s = services()
    states = [ruleset.build(s, {"wg0": x, "wg6": x}) for x in ("a", "b")]
    dp.remove_all()
    dp.apply(states[0])
    times = []
    for i in range(n):
        t = time.perf_counter()
        dp.apply(states[(i + 1) % 2])
        times.append((time.perf_counter() - t) * 1000)
    if dp.read() != states[n % 2]:
        raise SystemExit(f"{dp.name}: read-back differs after the swaps")
    dp.remove_all()
    times.sort()
    return {
        "swaps": n,
        "median_ms": round(statistics.median(times), 4),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 4),
        "max_ms": round(times[-1], 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=1000)
    args = parser.parse_args()
    reexec_in_fresh_netns()
    nft = NftablesDataplane()
    ipt = IptablesDataplane()
    try:
        result = {
            "what": "one apply() swapping 2 services (IPv4 + IPv6) to the other backend",
            "machine": machine_info(),
            "nftables": measure(nft, args.n),
            "iptables": measure(ipt, max(50, args.n // 10)),
            "target": {"nftables_median_ms_below": TARGET_NFT_MS},
        }
    finally:
        ipt.close()
    result["nftables_meets_target"] = result["nftables"]["median_ms"] < TARGET_NFT_MS  # type: ignore[index]
    write_results(RESULTS, result)
    print(json.dumps(result, indent=2))
    return exitcodes.OK


if __name__ == "__main__":
    raise SystemExit(main())
