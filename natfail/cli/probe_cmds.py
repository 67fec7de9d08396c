"""`natfailctl probe` and `natfailctl probe-peer`: they work without a daemon
(`probe` has a running daemon run the probe, see `probe`).

Imported only when one of them runs, so the rest of natfailctl stays fast."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from natfail import commands, exitcodes
from natfail import config as cfg
from natfail.cli.common import Refused, UsageError
from natfail.core import noise

if TYPE_CHECKING:
    from natfail.io.probe_transport import ProbeResult, ProbeTransport


def _config_or_none(path: Path | None) -> cfg.Config | None:
    """The config when one is given or the default exists; a bad one given
    explicitly is an error, a missing default is not."""
    if path is not None:
        try:
            return cfg.load(path)
        except cfg.ConfigError as exc:
            raise UsageError(str(exc)) from None
    if not cfg.DEFAULT_PATH.exists():
        return None
    try:
        return cfg.load(cfg.DEFAULT_PATH)
    except cfg.ConfigError as exc:
        raise UsageError(str(exc)) from None


def _key_from_file(path: Path, what: str) -> bytes:
    try:
        return cfg.load_key_file(path)
    except cfg.KeyFileError as exc:
        raise UsageError(f"{what}: {exc}") from None


def _timestamp_path(conf: cfg.Config | None) -> Path | None:
    from natfail.io.timestamps import STATE_FILE

    # Only root: the daemon runs probes for root alone (see _daemon_socket),
    # so anyone else probes alone even while a daemon runs, and must not
    # take the file's lease from under it. Without the file, stamps start
    # from the wall clock, which cannot get ahead of a running daemon's.
    if os.geteuid() != 0:
        return None
    state_dir = conf.daemon.state_dir if conf else cfg.DEFAULT_DAEMON.state_dir
    if os.access(state_dir, os.W_OK):
        return state_dir / STATE_FILE
    return None


def _daemon_socket(args: argparse.Namespace) -> Path | None:
    """Where to ask a running daemon to probe; None when it would refuse us
    (only root may run its "probe" command)."""
    if os.geteuid() != 0:
        return None
    from natfail.cli.daemon_cmds import socket_path

    return socket_path(args)


def _result_from_reply(reply: dict[str, Any]) -> ProbeResult:
    from natfail.io.probe_transport import ProbeResult

    data = reply.get("result")
    if not isinstance(data, dict):
        data = {}
    up, reason, rtt_ms = data.get("up"), data.get("reason"), data.get("rtt_ms")
    invalid, detail, local = data.get("invalid_replies"), data.get("detail"), data.get("local")
    if not (
        isinstance(up, bool)
        and isinstance(reason, str)
        and isinstance(detail, str)
        and isinstance(invalid, int)
        and isinstance(local, bool)
        and (rtt_ms is None or isinstance(rtt_ms, (int, float)))
    ):
        raise Refused("the daemon sent an unreadable probe result")
    rtt = None if rtt_ms is None else rtt_ms / 1000.0
    return ProbeResult(up, reason, rtt, invalid, detail, local=local)


def _line(target: cfg.Endpoint, result: ProbeResult) -> str:
    if result.up:
        line = f"{target}: up, rtt {result.rtt_ms or 0.0:.2f} ms"
        if result.reason != "ok":
            line += f" ({result.reason})"
    else:
        line = f"{target}: down, {result.reason}"
        if result.local:
            line += f" ({result.detail}: on this host, not the backend's fault)"
        elif result.detail:
            line += f" ({result.detail})"
    if result.invalid_replies:
        line += f", {result.invalid_replies} invalid repl"
        line += "y" if result.invalid_replies == 1 else "ies"
    if not result.up and result.reason == "timeout" and not result.invalid_replies:
        line += f"; {TIMEOUT_CAUSES}"
    return line


TIMEOUT_CAUSES = (
    "WireGuard drops what it cannot authenticate without a word, so the usual causes "
    "are: the probe key is not a peer on the backend (natfailctl probe-peer), "
    "--server-key is not the backend's public key, or UDP to that port does not arrive"
)


def probe(args: argparse.Namespace) -> int:
    """With a daemon running, each attempt is the daemon's (its socket, its
    clock: natfailctl's own clock would start above the timestamp file's
    lease, ahead of the daemon's stamps, and a backend would then drop the
    daemon's probes as replays). Without one, or when the daemon holds no
    probe key like ours, natfailctl probes alone."""
    from natfail.cli import client
    from natfail.cli.common import Unreachable

    try:
        target = cfg.Endpoint.parse(args.target)
    except ValueError as exc:
        raise UsageError(f"probe: {args.target!r}: {exc}") from None
    try:
        server_key = cfg.decode_key(args.server_key)
    except ValueError as exc:
        raise UsageError(f"probe: --server-key {exc}") from None
    if args.count < 1:
        raise UsageError("probe: --count must be at least 1")
    if not args.timeout > 0:
        raise UsageError("probe: --timeout must be greater than 0")
    conf = _config_or_none(args.config)
    key_file = args.probe_key_file or (
        conf.probe.private_key_file if conf else cfg.DEFAULT_PROBE.private_key_file
    )
    private = _key_from_file(key_file, "probe key")
    psk = _key_from_file(args.psk_file, "preshared key") if args.psk_file else bytes(32)
    try:
        keys = noise.Keys(private, server_key, psk)
    except ValueError as exc:
        raise UsageError(f"probe: --server-key: {exc}") from None

    request: dict[str, Any] = {
        "command": commands.PROBE,
        "target": str(target),
        "server_public_key": cfg.encode_key(server_key),
        "probe_public_key": cfg.encode_key(keys.public_key),
        "timeout": args.timeout,
    }
    if args.psk_file:
        request["preshared_key"] = cfg.encode_key(psk)
    daemon = _daemon_socket(args)
    standalone: list[ProbeTransport] = []

    async def alone() -> ProbeResult:
        if not standalone:
            from natfail.io.probe_transport import UdpProbeTransport
            from natfail.io.timestamps import TimestampClock

            standalone.append(UdpProbeTransport(TimestampClock(_timestamp_path(conf))))
        return await standalone[0].probe(keys, target, args.timeout)

    async def attempts() -> bool:
        nonlocal daemon
        up = False
        for attempt in range(args.count):
            if attempt:
                await asyncio.sleep(args.interval)
            result: ProbeResult | None = None
            if daemon is not None:
                try:
                    reply = client.call(daemon, request, timeout=args.timeout + client.TIMEOUT)
                except Unreachable:
                    daemon = None
                except (Refused, UsageError) as exc:
                    raise type(exc)(f"probe: the running daemon refused it: {exc}") from None
                else:
                    if reply.get("held"):
                        result = _result_from_reply(reply)
                    else:
                        daemon = None  # not the daemon's key: ours cannot disturb it
            if result is None:
                result = await alone()
            up = result.up
            print(_line(target, result), flush=True)
        for transport in standalone:
            transport.close()
        return up

    return exitcodes.OK if asyncio.run(attempts()) else exitcodes.FAILED


def _generate_key_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        cfg.create_key_file(path, cfg.generate_key())
    except FileExistsError:
        return
    except OSError as exc:
        raise Refused(f"probe-peer: cannot create {path}: {exc.strerror}") from None


def probe_peer(args: argparse.Namespace) -> int:
    conf = _config_or_none(args.config)
    probe_settings = conf.probe if conf else cfg.DEFAULT_PROBE
    key_files = [probe_settings.private_key_file]
    if conf:
        key_files += [s.probe.private_key_file for s in conf.services]
    key_files = list(dict.fromkeys(key_files))
    if args.generate:
        for path in key_files:
            _generate_key_file(path)
    publics: list[str] = []
    for index, path in enumerate(key_files):
        if not path.exists():
            raise Refused(f"probe-peer: {path} does not exist (create it with --generate)")
        public = cfg.encode_key(noise.public_key(_key_from_file(path, "probe key")))
        publics.append(public)
        if index:
            print()
        psk_files = sorted(
            {
                str(s.preshared_key_file)
                for s in (conf.services if conf else ())
                if s.probe.private_key_file == path and s.preshared_key_file
            }
        )
        print(f"# natfail probe key of {socket.gethostname()} ({path})")
        print(f"# public key: {public}")
        print("# Add this peer to every backend's WireGuard config. It needs no AllowedIPs:")
        print("# the gateway only performs handshakes, it never sends data.")
        print("[Peer]")
        print(f"PublicKey = {public}")
        for psk in psk_files:
            print(f"PresharedKey = <the key in {psk}>")
        print()
        print("# or, at runtime on each backend (INTERFACE is its WireGuard interface):")
        line = f"wg set INTERFACE peer {public}"
        if psk_files:
            line += " preshared-key /path/to/that/psk-file"
        print(line)
    _print_agent_configs(conf, publics)
    return exitcodes.OK


def _print_agent_configs(conf: cfg.Config | None, publics: list[str]) -> None:
    """The agent.toml of each backend host: listen where the gateway's config
    says the agent is, obey this gateway's probe key(s)."""
    gateways = ", ".join(f'"{p}"' for p in publics)
    agents: dict[str, list[str]] = {}
    for service in conf.services if conf else ():
        for backend in service.backends:
            if backend.agent is not None:
                agents.setdefault(str(backend.agent), []).append(
                    f"backend {backend.name} of {service.name}"
                )
    print()
    print("# natfail agent on each backend host, /etc/natfail/agent.toml (for hitless")
    print("# failover; a second gateway's probe public key goes in gateways too):")
    if not agents:
        print('listen = "BACKEND_ADDRESS:51821"  # then agent = "BACKEND_ADDRESS:51821"')
        print(f"gateways = [{gateways}]")
        print('interfaces = ["wg0"]              # its WireGuard interface(s)')
        return
    for listen, names in agents.items():
        print()
        print(f"# for {', '.join(names)}")
        print(f'listen = "{listen}"')
        print(f"gateways = [{gateways}]")
        print('interfaces = ["wg0"]  # its WireGuard interface(s) with the server key')
