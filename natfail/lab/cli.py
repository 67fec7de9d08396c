"""``python -m natfail.lab``: build a lab by hand, list labs, remove dead ones."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Sequence

from natfail import exitcodes
from natfail.lab.lab import Lab
from natfail.lab.leftovers import MARKER_DIR, cleanup_stale, list_str, marker_alive, read_marker
from natfail.lab.processes import LabError


def _cmd_up(args: argparse.Namespace) -> int:
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with Lab(
        args.backends,
        keepalive=args.keepalive,
        ipv6=not args.no_ipv6,
        preshared_key=args.psk,
    ) as lab:
        print(lab.describe(), flush=True)
        print("up; Ctrl-C or SIGTERM tears it down", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return exitcodes.OK


def _cmd_list(args: argparse.Namespace) -> int:
    markers = sorted(MARKER_DIR.glob("*.json")) if MARKER_DIR.is_dir() else []
    for path in markers:
        data = read_marker(path) or {}
        state = "live" if marker_alive(data) else "dead"
        print(
            f"{path.stem} pid {data.get('pid')} {state}: {' '.join(list_str(data, 'namespaces'))}"
        )
    return exitcodes.OK


def _cmd_down(args: argparse.Namespace) -> int:
    cleaned = cleanup_stale(args.prefix)
    print(f"removed {len(cleaned)} dead lab(s)" + (f": {' '.join(cleaned)}" if cleaned else ""))
    return exitcodes.OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m natfail.lab",
        description="A lab of network namespaces with real WireGuard, for tests, "
        "benchmarks and the demo.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a lab and keep it until interrupted")
    up.add_argument("--backends", type=int, default=2)
    up.add_argument("--keepalive", type=int, default=None)
    up.add_argument("--no-ipv6", action="store_true")
    up.add_argument("--psk", action="store_true", help="give the probe peer a preshared key")
    up.set_defaults(func=_cmd_up)
    ls = sub.add_parser("list", help="list labs and whether their owner lives")
    ls.set_defaults(func=_cmd_list)
    down = sub.add_parser("down", help="remove leftovers of dead labs")
    down.add_argument("--prefix", default="nf")
    down.set_defaults(func=_cmd_down)
    args = parser.parse_args(argv)
    try:
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except (LabError, ValueError, RuntimeError) as e:
        print(f"natfail.lab: {e}", file=sys.stderr)
        return exitcodes.FAILED
