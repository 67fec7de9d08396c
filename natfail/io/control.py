"""The control socket: a unix stream socket, one JSON request and one JSON
reply per line.

The daemon decides what a request means (a `Handler`); this module only
frames, limits, authorizes and answers. Nothing a client sends can raise out
of here: malformed input gets an error reply, a client that sends too much or
too slowly is cut off, and the server goes on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

log = logging.getLogger(__name__)

MAX_REQUEST: Final = 64 * 1024
READ_TIMEOUT: Final = 5.0
MAX_CLIENTS: Final = 32

# Commands a member of the socket's group may run; root may run every one.
READ_ONLY_COMMANDS: Final = frozenset({"status", "ping"})


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    def in_group(self, gid: int) -> bool:
        return self.gid == gid or gid in self.groups

    def may(self, command: str, socket_gid: int) -> bool:
        if self.uid == 0:
            return True
        return self.in_group(socket_gid) and command in READ_ONLY_COMMANDS


class RequestError(Exception):
    """A request the daemon refuses; `code` is the exit code natfailctl uses."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


Handler = Callable[[dict[str, Any], Peer], Awaitable[dict[str, Any]]]


# SO_PEERGROUPS (Linux 4.13) is not named by Python's socket module.
SO_PEERGROUPS: Final = getattr(socket, "SO_PEERGROUPS", 59)
_GROUPS_BUFFER: Final = 1024  # Python's getsockopt limit: 256 groups


def _proc_groups(pid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def _peer_groups(sock: socket.socket, pid: int) -> frozenset[int]:
    """The peer's supplementary groups, from the kernel: /proc alone would not
    do, since the unit's ProtectProc=invisible hides other users' processes."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_BUFFER)
    except OSError:  # more than 256 groups, or an old kernel
        return _proc_groups(pid)
    count = len(raw) // 4
    return frozenset(struct.unpack(f"{count}I", raw[: 4 * count]))


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return Peer(pid, uid, gid, _peer_groups(sock, pid))


def error_reply(message: str, code: int = 1) -> dict[str, Any]:
    return {"ok": False, "error": message, "code": code}


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._clients = 0

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            # A socket left by a killed daemon; a live one would hold its
            # own path, but only one daemon runs per config (systemd).
            self.path.unlink()
        # Owner and group only; the group (set by the unit) may read status.
        old_umask = os.umask(0o117)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old_umask)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients += 1
        try:
            if self._clients > MAX_CLIENTS:
                return
            peer = peer_of(writer.get_extra_info("socket"))
            reply = await self._one_request(reader, peer)
            writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            pass
        except Exception:  # a bug in a handler must not stop the daemon
            log.exception("control: request failed")
        finally:
            self._clients -= 1
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _one_request(self, reader: asyncio.StreamReader, peer: Peer) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), READ_TIMEOUT)
        except asyncio.TimeoutError:
            return error_reply("request timed out", 2)
        except asyncio.LimitOverrunError:
            return error_reply(f"request larger than {MAX_REQUEST} bytes", 2)
        except asyncio.IncompleteReadError as exc:
            line = exc.partial
            if not line.strip():
                return error_reply("empty request", 2)
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return error_reply("request is not JSON", 2)
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return error_reply("request must be an object with a string 'command'", 2)
        command = request["command"]
        # The group may change under a running daemon (the unit or an
        # operator sets it), so it is read at every request.
        socket_gid = os.stat(self.path).st_gid
        if not peer.may(command, socket_gid):
            log.warning("control: refused %r from uid %d (pid %d)", command, peer.uid, peer.pid)
            if peer.in_group(socket_gid):
                return error_reply(f"{command}: permission denied (only root may do this)", 1)
            return error_reply("permission denied: not root and not in the socket's group", 1)
        try:
            result = await self._handler(request, peer)
        except RequestError as exc:
            return error_reply(str(exc), exc.code)
        return {"ok": True, **result}
