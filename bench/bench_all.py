"""Runs every benchmark, then bench/plot.py; run as root through ``sudo scripts/bench``.

Each benchmark writes its own bench/results/*.json; a failing one is reported and the
others still run. Exit status 1 if any failed.
Usage (root): .venv/bin/python bench/bench_all.py [--only NAME,...] [--kills N]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = ["probe", "dataplane", "conntrack", "repair", "failover", "nginx", "activation"]
OPTIONAL = ["hitless"]
"""Run only when named in --only: bench_hitless takes about 25 minutes."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated subset of " + ",".join(BENCHES + OPTIONAL),
    )
    parser.add_argument("--kills", type=int, default=20, help="kills in bench_failover")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else BENCHES
    chosen = [b for b in BENCHES + OPTIONAL if b in only]
    failed: list[str] = []
    started = time.monotonic()
    for name in chosen:
        argv = [sys.executable, str(ROOT / "bench" / f"bench_{name}.py")]
        if name == "failover":
            argv += ["-n", str(args.kills)]
        print(f"== bench_{name}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run(argv, cwd=ROOT, check=False).returncode
        print(f"== bench_{name}: exit {rc} after {time.monotonic() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    print("== plot", flush=True)
    if (
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "plot.py")], cwd=ROOT, check=False
        ).returncode
        != 0
    ):
        failed.append("plot")
    print(
        f"== all done in {time.monotonic() - started:.0f} s"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
