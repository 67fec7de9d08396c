"""`natfail`: the daemon in the foreground (`natfail [-c FILE]`), the lab
demo (`natfail demo`) and the backend's agent (`natfail agent [-c FILE]`)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from natfail import exitcodes
from natfail.cli.common import ArgumentParser, Refused, UsageError, guarded

if TYPE_CHECKING:
    from natfail.config import Config

PROG = "natfail"


def _build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="WireGuard high availability gateway.")
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="config file (default /etc/natfail/natfail.toml; for `agent`, "
        "/etc/natfail/agent.toml)",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["demo", "agent"],
        help="`demo` builds a lab of namespaces with real WireGuard and shows it working; "
        "`agent` runs the agent of a backend host",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="with `agent`: validate the agent config and exit",
    )
    parser.add_argument(
        "--no-agent",
        action="store_true",
        help="with `demo`: run no agents on the backends, to compare with WireGuard's own recovery",
    )
    parser.add_argument(
        "--pair",
        action="store_true",
        help="with `demo`: two gateways under keepalived in pair mode; the master dies",
    )
    return parser


def _setup_logging() -> None:
    from natfail.io import journal
    from natfail.logformat import JournalFormatter

    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM") and journal.available():
        # Under systemd: records with their priority and fields (service,
        # backend), so `journalctl -p warning` shows the failovers.
        handler = journal.JournalHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    elif os.environ.get("JOURNAL_STREAM"):
        # The journal reads a line's priority from a "<N>" prefix.
        handler.setFormatter(JournalFormatter("%(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def _run_daemon(config_path: Path | None) -> int:
    from natfail import config as cfg

    path = config_path or cfg.DEFAULT_PATH
    try:
        conf = cfg.load(path)
    except cfg.ConfigError as exc:
        raise UsageError(str(exc)) from None
    problems = cfg.check_files(conf)
    if problems:
        raise UsageError(str(problems[0]))
    from natfail.io.instance_lock import InstanceLock, LockError

    # Before anything touches the system: a second daemon must leave the
    # first one's rules, conntrack, state and socket alone.
    try:
        lock = InstanceLock.acquire(conf.daemon.socket.parent)
    except LockError as exc:
        raise Refused(str(exc)) from None
    try:
        from natfail import preflight

        found = preflight.check(conf)
        if found:
            for line in found:
                sys.stderr.write(f"{PROG}: {line}\n")
            return exitcodes.FAILED
        return _run_locked(conf)
    finally:
        lock.release()


def _run_locked(conf: Config) -> int:
    _setup_logging()
    from natfail import config as cfg

    for warning in cfg.warnings(conf):
        logging.getLogger("natfail").warning("%s", warning)
    import asyncio

    from natfail.daemon import Daemon
    from natfail.io import fdlimit, nft_monitor
    from natfail.io.addresses import NetlinkAddressWatch
    from natfail.io.conntrack import NetlinkConntrack
    from natfail.io.conntrack_worker import ConntrackWorker
    from natfail.io.control import ControlError
    from natfail.io.dataplane import Dataplane, DataplaneError
    from natfail.io.hooks import SubprocessHookRunner
    from natfail.io.metrics import Metrics, MetricsError
    from natfail.io.probe_transport import UdpProbeTransport
    from natfail.io.sdnotify import SdNotify
    from natfail.io.template_child import load_template
    from natfail.io.timestamps import STATE_FILE, TimestampClock

    dataplane: Dataplane
    try:
        if conf.daemon.firewall == "nftables":
            from natfail.io.nftables import NftablesDataplane

            dataplane = NftablesDataplane()
        else:
            from natfail.io.iptables import IptablesDataplane

            dataplane = IptablesDataplane()
    except (DataplaneError, OSError) as exc:
        raise Refused(f"cannot use {conf.daemon.firewall}: {exc}") from None
    from natfail.io import other_dataplane

    leftover = other_dataplane.leftovers(conf.daemon.firewall)
    if leftover is not None:
        logging.getLogger("natfail").warning("%s", leftover)
    limit = fdlimit.raise_nofile_limit()
    backends = sum(len(s.backends) for s in conf.services)
    if limit < fdlimit.needed(backends):
        logging.getLogger("natfail").warning(
            "the open file limit is %d, %d backends need about %d (LimitNOFILE= in the unit)",
            limit,
            backends,
            fdlimit.needed(backends),
        )
    load_template()
    conntrack = ConntrackWorker(NetlinkConntrack)
    conf.daemon.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    clock = TimestampClock(conf.daemon.state_dir / STATE_FILE)
    daemon = Daemon(
        conf,
        dataplane=dataplane,
        conntrack=conntrack,
        transport=UdpProbeTransport(clock),
        notifier=SdNotify(),
        hooks=SubprocessHookRunner(),
        metrics=Metrics(),
        watch_ruleset=nft_monitor.start if conf.daemon.firewall == "nftables" else None,
        addresses=NetlinkAddressWatch() if conf.daemon.pair else None,
    )
    try:
        return asyncio.run(daemon.run())
    except (ControlError, MetricsError) as exc:
        raise Refused(str(exc)) from None
    finally:
        conntrack.close()
        close = getattr(dataplane, "close", None)
        if close is not None:
            close()


def _run_agent(config_path: Path | None, check_only: bool) -> int:
    from natfail.agent import config as agent_config

    path = config_path or Path(agent_config.DEFAULT_AGENT_CONFIG)
    problems = agent_config.check_agent_file(path)
    if problems:
        for line in problems[1:]:
            sys.stderr.write(f"{PROG}: {line}\n")
        raise UsageError(str(problems[0]))
    conf = agent_config.load_agent_config(path)
    if check_only:
        print(
            f"{path}: ok: listen {conf.listen}, {len(conf.gateways)} gateway(s), "
            f"interfaces {', '.join(conf.interfaces)}"
        )
        return 0
    _setup_logging()
    import asyncio

    from natfail.agent.daemon import Agent

    try:
        return asyncio.run(Agent(conf).run())
    except OSError as exc:
        raise Refused(f"cannot listen on {conf.listen}: {exc.strerror or exc}") from None


def run(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.check_config and args.command != "agent":
        raise UsageError(
            "--check-config goes with `agent` (the gateway's: natfailctl check-config)"
        )
    if args.command == "agent":
        return _run_agent(args.config, args.check_config)
    if args.pair and args.command != "demo":
        raise UsageError("--pair goes with `demo`")
    if args.pair and args.no_agent:
        raise UsageError("demo --pair needs the agents: --pair and --no-agent do not go together")
    if args.command == "demo":
        from natfail import demo

        return demo.run(agents=not args.no_agent, pair=args.pair)
    return _run_daemon(args.config)


def main(argv: Sequence[str] | None = None) -> int:
    return guarded(PROG, lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
