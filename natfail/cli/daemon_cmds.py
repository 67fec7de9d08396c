"""The natfailctl commands that talk to a running daemon."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from natfail import commands, exitcodes
from natfail.cli import client, socket_lookup
from natfail.cli.common import UsageError
from natfail.cli.jsonout import dumps_indented
from natfail.locations import DEFAULT_CONFIG, DEFAULT_SOCKET


def socket_path(args: argparse.Namespace) -> Path:
    """--socket, else daemon.socket of -c FILE (default /etc/natfail/natfail.toml),
    else the default socket when there is no config at all.

    A config with mistakes elsewhere still names the socket: the operator who
    broke it must still reach the daemon (to see that `reload` refuses it)."""
    if args.socket is not None:
        return Path(args.socket)
    path = args.config or DEFAULT_CONFIG
    if args.config is None and not path.exists():
        return DEFAULT_SOCKET
    found = socket_lookup.socket_in(path)
    if found is not None:
        return found
    from natfail import config as cfg

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
    return socket_lookup.socket_value(
        daemon.get("socket") if isinstance(daemon, dict) else None, path
    )


def _rtt(value: Any) -> str:
    return f"{value:.2f} ms" if isinstance(value, (int, float)) else "-"


def _agent(agent: Any) -> str:
    """The AGENT column: "-" without one, else reachability and clients known."""
    if not isinstance(agent, dict):
        return "-"
    if not agent.get("reachable"):
        return "unreachable"
    return f"{agent.get('clients', 0)} clients"


def _age(since: Any, now: datetime) -> str:
    """How long ago ``since`` (ISO 8601) was: 42s, 7m, 3h, 2d."""
    try:
        then = datetime.fromisoformat(str(since))
    except ValueError:
        return "-"
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def check_status(services: list[Any]) -> tuple[int, str]:
    """The monitoring verdict of a status: exit code and one line."""
    critical = [
        s.get("name")
        for s in services
        if isinstance(s, dict) and (s.get("no_healthy_backend") or not s.get("active"))
    ]
    warned: list[str] = []
    for s in services:
        if not isinstance(s, dict) or s.get("name") in critical:
            continue
        down = [
            b.get("name")
            for b in s.get("backends") or []
            if isinstance(b, dict) and b.get("state") in ("down", "unknown")
        ]
        if down or s.get("warnings"):
            what = f"{', '.join(map(str, down))} not up" if down else "warnings"
            warned.append(f"{s.get('name')} ({what})")
    if critical:
        return exitcodes.CHECK_CRITICAL, "CRITICAL: no healthy backend for " + ", ".join(
            map(str, critical)
        )
    if warned:
        return exitcodes.CHECK_WARNING, "WARNING: " + "; ".join(warned)
    return exitcodes.OK, f"OK: {len(services)} service(s), each on a healthy backend"


def _print_status(reply: dict[str, Any]) -> None:
    now = datetime.now(timezone.utc)
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
        if service.get("no_healthy_backend"):
            active = service.get("active") or "nothing"
            print(f"  NO HEALTHY BACKEND: traffic stays on {active}")
        for warning in service.get("warnings") or []:
            print(f"  warning: {warning}")
        rows = [("BACKEND", "ADDRESS", "STATE", "PRIO", "RTT", "AGENT", "FOR", "REASON")]
        for backend in service.get("backends", []):
            marker = "*" if backend.get("name") == service.get("active") else " "
            rows.append(
                (
                    f"{marker}{backend.get('name')}",
                    str(backend.get("address")),
                    str(backend.get("state")),
                    str(backend.get("priority", "-")),
                    _rtt(backend.get("rtt_ms")),
                    _agent(backend.get("agent")),
                    _age(backend.get("since"), now),
                    str(backend.get("reason") or "-") if backend.get("state") != "up" else "-",
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
            print(dumps_indented(events))
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
        if args.check:
            code, line = check_status(status["services"])
            print(line)
            return code
        if args.json:
            print(dumps_indented(status))
        else:
            _print_status(status)
    elif reply.get("message"):
        print(reply["message"])
    return exitcodes.OK
