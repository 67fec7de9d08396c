"""`natfail`: the daemon in the foreground (`natfail [-c FILE]`) and the lab
demo (`natfail demo`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from natfail.cli.common import ArgumentParser, Refused, UsageError, guarded

PROG = "natfail"


def _build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="WireGuard high availability gateway.")
    parser.add_argument(
        "-c", "--config", type=Path, default=None,
        help="config file (default /etc/natfail/natfail.toml)",
    )
    parser.add_argument(
        "command", nargs="?", choices=["demo"],
        help="`demo` builds a lab of namespaces with real WireGuard and shows it working",
    )
    return parser


def _run_daemon(config_path: Path | None) -> int:
    from natfail import config as cfg

    path = config_path or cfg.DEFAULT_PATH
    try:
        conf = cfg.load(path)
    except cfg.ConfigError as exc:
        raise UsageError(str(exc)) from None
    problems = cfg.check_files(conf)
    if problems:
        raise UsageError(problems[0])
    # The control loop (probes, health, switching) is the next milestone; until
    # it lands, refuse plainly instead of pretending to run.
    raise Refused(f"{path}: config is valid, but the daemon loop is not built yet")


def run(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "demo":
        from natfail import demo

        return demo.run()
    return _run_daemon(args.config)


def main(argv: Sequence[str] | None = None) -> int:
    return guarded(PROG, lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
