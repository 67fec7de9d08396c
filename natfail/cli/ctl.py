"""`natfailctl`: the operator's tool.

It must start fast: no scapy, no daemon, no asyncio at import time. Heavy
modules are imported inside the command that needs them."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from natfail import commands, exitcodes
from natfail.cli.common import ArgumentParser, UsageError, guarded

PROG = "natfailctl"


def _build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Control and inspect natfail.")
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=None,
        help="config file (default /etc/natfail/natfail.toml)",
    )
    parser.add_argument("--socket", type=Path, default=None, help="daemon control socket")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = sub.add_parser("check-config", help="validate a config file without a daemon")
    check.add_argument("file", nargs="?", type=Path, default=None)
    check.add_argument(
        "--agent",
        action="store_true",
        help="FILE is an agent config (default /etc/natfail/agent.toml)",
    )

    probe = sub.add_parser(
        "probe", help="one WireGuard handshake probe (through the daemon when it runs)"
    )
    probe.add_argument("target", metavar="HOST:PORT", help="IPv4:port or [IPv6]:port")
    probe.add_argument("--server-key", required=True, help="the server's public key (base64)")
    probe.add_argument(
        "--probe-key-file",
        type=Path,
        default=None,
        help="probe private key (default: probe.private_key_file of the config)",
    )
    probe.add_argument(
        "--psk-file", type=Path, default=None, help="preshared key of the probe peer"
    )
    probe.add_argument("--count", type=int, default=1, help="attempts (default 1)")
    probe.add_argument("--timeout", type=float, default=1.0, help="seconds per attempt (default 1)")
    probe.add_argument(
        "--interval", type=float, default=1.0, help="seconds between attempts (default 1)"
    )

    status = sub.add_parser("status", help="services, backends, health, RTT, active backend")
    status.add_argument("--json", action="store_true", help="the JSON object of the contract")
    status.add_argument(
        "--check",
        action="store_true",
        help="for monitoring: one line, exit 0 ok, 1 warning (a backend down or a "
        "warning), 2 critical (a service without a healthy backend), 3 unreachable",
    )
    events = sub.add_parser("events", help="the last switches of the active backends")
    events.add_argument("--json", action="store_true", help="one JSON object")
    events.add_argument(
        "-n", "--count", type=int, default=20, help="how many, newest last (default 20)"
    )
    switch = sub.add_parser("switch", help="manual failover, pinned until the backend fails")
    switch.add_argument("service")
    switch.add_argument("backend")
    switch.add_argument("--force", action="store_true", help="even to a backend that is down")
    release = sub.add_parser("release", help="end the pin of a manual switch")
    release.add_argument("service")
    for name, text in (
        ("drain", "take a backend out of selection"),
        ("undrain", "put a drained backend back into selection"),
    ):
        drain = sub.add_parser(name, help=text)
        drain.add_argument("service")
        drain.add_argument("backend")
    sub.add_parser("reload", help="re-read the config; a bad one is refused")

    peer = sub.add_parser("probe-peer", help="print the probe's [Peer] block for the backends")
    peer.add_argument(
        "--generate", action="store_true", help="create a missing probe key file (mode 0600)"
    )
    return parser


def _check_agent_config(file: Path | None) -> int:
    from natfail.agent import config as agent_config

    path = file or Path(agent_config.DEFAULT_AGENT_CONFIG)
    problems = agent_config.check_agent_file(path)
    if problems:
        for line in problems:
            sys.stderr.write(f"{PROG}: {line}\n")
        return exitcodes.USAGE
    conf = agent_config.load_agent_config(path)
    print(
        f"{path}: ok: agent listening on {conf.listen}, {len(conf.gateways)} gateway(s), "
        f"interfaces {', '.join(conf.interfaces)}"
    )
    return exitcodes.OK


def _check_config(config_opt: Path | None, file: Path | None) -> int:
    from natfail import config as cfg

    path = file or config_opt or cfg.DEFAULT_PATH
    try:
        conf = cfg.load(path)
    except cfg.ConfigError as exc:
        for problem in exc.problems:  # every one found, one line each
            sys.stderr.write(f"{PROG}: {problem}\n")
        return exitcodes.USAGE
    problems = cfg.check_files(conf)
    if problems:
        for line in problems:
            sys.stderr.write(f"{PROG}: {line}\n")
        return exitcodes.USAGE
    for warning in cfg.warnings(conf):
        sys.stderr.write(f"{PROG}: warning: {warning}\n")
    backends = sum(len(s.backends) for s in conf.services)
    names = ", ".join(s.name for s in conf.services)
    print(
        f"{path}: ok: {len(conf.services)} service(s) ({names}), {backends} backend(s), "
        f"firewall {conf.daemon.firewall}"
    )
    return exitcodes.OK


def run(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "check-config":
        if args.agent:
            return _check_agent_config(args.file)
        return _check_config(args.config, args.file)
    if args.command in ("probe", "probe-peer"):
        from natfail.cli import probe_cmds

        return probe_cmds.probe(args) if args.command == "probe" else probe_cmds.probe_peer(args)
    if args.command in commands.DAEMON:
        from natfail.cli import daemon_cmds

        return daemon_cmds.run(args)
    raise UsageError(f"unknown command {args.command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    return guarded(PROG, lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
