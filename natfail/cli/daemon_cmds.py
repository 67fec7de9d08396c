"""The natfailctl commands that talk to a running daemon."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from natfail import commands, exitcodes
from natfail.cli import client
from natfail.cli.common import UsageError


def socket_path(args: argparse.Namespace) -> Path:
    """--socket, else daemon.socket of -c FILE (default /etc/natfail/natfail.toml),
    else the default socket when there is no config at all.

    A config with mistakes elsewhere still names the socket: the operator who
    broke it must still reach the daemon (to see that `reload` refuses it)."""
    if args.socket is not None:
        return Path(args.socket)
    from natfail import config as cfg

    path = args.config or cfg.DEFAULT_PATH
    if args.config is None and not path.exists():
        return cfg.DEFAULT_DAEMON.socket
    try:
        return cfg.load(path).daemon.socket
    except cfg.ConfigError as exc:
        socket = _socket_from_raw(path)
        if socket is None:
            raise UsageError(str(exc)) from None
        return socket


def _socket_from_raw(path: Path) -> Path | None:
    from natfail import config as cfg

    try:
        data = cfg.read_raw(path)
    except cfg.ConfigError:
        return None
    daemon = data.get("daemon", {})
    socket = daemon.get("socket") if isinstance(daemon, dict) else None
    if socket is None:
        return cfg.DEFAULT_DAEMON.socket
    return Path(socket) if isinstance(socket, str) and socket else None


def _rtt(value: Any) -> str:
    return f"{value:.2f} ms" if isinstance(value, (int, float)) else "-"


def _agent(agent: Any) -> str:
    """The AGENT column: "-" without one, else reachability and clients known."""
    if not isinstance(agent, dict):
        return "-"
    if not agent.get("reachable"):
        return "unreachable"
    return f"{agent.get('clients', 0)} clients"


def _print_status(reply: dict[str, Any]) -> None:
    for index, service in enumerate(reply.get("services", [])):
        if index:
            print()
        pinned = " (pinned)" if service.get("pinned") else ""
        role = service.get("role")
        shown_role = f"  role {role}" if role in ("decide", "follow") else ""
        print(
            f"service {service.get('name')}  public {service.get('public')}  "
            f"active {service.get('active') or '-'}{pinned}  "
            f"failovers {service.get('failovers', 0)}{shown_role}"
        )
        for warning in service.get("warnings") or []:
            print(f"  warning: {warning}")
        rows = [("BACKEND", "ADDRESS", "STATE", "RTT", "AGENT", "SINCE")]
        for backend in service.get("backends", []):
            marker = "*" if backend.get("name") == service.get("active") else " "
            rows.append(
                (
                    f"{marker}{backend.get('name')}",
                    str(backend.get("address")),
                    str(backend.get("state")),
                    _rtt(backend.get("rtt_ms")),
                    _agent(backend.get("agent")),
                    str(backend.get("since") or "-"),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print(
                "  "
                + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )


def run(args: argparse.Namespace) -> int:
    path = socket_path(args)
    command = args.command
    request: dict[str, Any] = {"command": command}
    if command in commands.OPERATOR:
        request["service"] = args.service
    if command in commands.WITH_BACKEND:
        request["backend"] = args.backend
    if command == "switch":
        request["force"] = bool(args.force)
    if command == "events":
        request["count"] = args.count
    reply = client.call(path, request)
    if command == "events":
        events = {"events": reply.get("events", [])}
        if args.json:
            print(json.dumps(events, indent=2))
        else:
            for e in events["events"]:
                print(
                    f"{e.get('time')}  {e.get('service')}  {e.get('from') or '-'} -> "
                    f"{e.get('to')}  {e.get('reason')}  swap {e.get('swap_ms')} ms  "
                    f"cleanup {e.get('cleanup_ms')} ms"
                )
        return exitcodes.OK
    if command == "status":
        status = {"services": reply.get("services", [])}
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            _print_status(status)
    elif reply.get("message"):
        print(reply["message"])
    return exitcodes.OK
