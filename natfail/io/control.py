"""The control socket: a unix stream socket, one JSON request and one JSON
reply per line.

The daemon decides what a request means (a `Handler`); this module only
frames, limits, authorizes and answers. Nothing a client sends can raise out
of here: malformed input gets an error reply, a client that sends too much or
too slowly is cut off, and the server goes on.

Connections are bounded so that root always gets in: every user but root
together may hold `NONROOT_CONNECTIONS` of the `MAX_CONNECTIONS`, one user at
most `PER_UID_CONNECTIONS`, and a connection that has not sent its request
within `READ_TIMEOUT` is answered with an error and closed. Past the limits a
connection is refused at once with an error reply; when root itself has used
every slot, new connections wait in the listen backlog for a free one.

A request already in the socket when its connection is accepted, and that
needs no waiting (a `QuickHandler` answers it: status, events, ping), is
answered in that same turn of the event loop; any other goes through a task
of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from natfail import commands, exitcodes, jsonlimit
from natfail.io.loop_errors import RepeatLog, accept_failure
from natfail.oneline import error_line

log = logging.getLogger(__name__)

MAX_REQUEST: Final = 64 * 1024
# natfailctl sends its request as soon as it connects; a connection that has
# not sent a whole one by then only holds a slot.
READ_TIMEOUT: Final = 3.0
MAX_CONNECTIONS: Final = 128
NONROOT_CONNECTIONS: Final = 64
PER_UID_CONNECTIONS: Final = 16
# The kernel caps it at net.core.somaxconn (4096 on current kernels).
BACKLOG: Final = 1024
# Connections accepted per wakeup of the listener, so a flood cannot starve the loop.
ACCEPT_BATCH: Final = 64
# After EMFILE and the like: the listener rests, rather than spin on a
# backlog it cannot take from.
ACCEPT_RETRY: Final = 0.5
MAX_DEPTH: Final = jsonlimit.MAX_DEPTH

# Commands a member of the socket's group may run; root may run every one.
READ_ONLY_COMMANDS: Final = commands.READ_ONLY


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

    def __init__(self, message: str, code: int = exitcodes.FAILED) -> None:
        super().__init__(message)
        self.code = code


Handler = Callable[[dict[str, Any], Peer], Awaitable[dict[str, Any]]]
QuickHandler = Callable[[dict[str, Any], Peer], "dict[str, Any] | None"]
"""The answer to a request that needs no waiting (status, ping), or None."""


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


def error_reply(message: str, code: int = exitcodes.FAILED) -> dict[str, Any]:
    return {"ok": False, "error": message, "code": code}


class ControlError(Exception):
    """The control socket cannot be set up; the message is one line."""


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"


_SO_SNDBUFFORCE: Final = 32  # <asm-generic/socket.h>; Python's socket module lacks it


_DEFAULT_ROOM: Final = 64 * 1024


def _room_for(conn: socket.socket, size: int) -> None:
    """Let a large reply (status of a thousand services: 650 kB) go in one
    write: by the default send buffer's fill, each further part waited for
    an event loop turn behind the probes (30 ms at that scale). Past
    net.core.wmem_max needs CAP_NET_ADMIN, which the daemon has; without
    it the reply still goes, in parts."""
    if size <= _DEFAULT_ROOM:
        return
    for option in (_SO_SNDBUFFORCE, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, option, size)
            return


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket nobody listens on (a killed daemon's). A live one is
    never removed: the instance lock keeps a second natfail out, and anything
    else listening there is not ours to take over."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlError(f"cannot check {path}: {exc.strerror or error_line(exc)}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    except FileNotFoundError:
        return
    except BlockingIOError:  # its backlog is full: very much alive
        pass
    except OSError as exc:
        raise ControlError(f"cannot check {path}: {exc.strerror or error_line(exc)}") from None
    finally:
        probe.close()
    raise ControlError(f"another process listens on {path}; not replacing its socket")


class ControlServer:
    def __init__(self, path: Path, handler: Handler, quick: QuickHandler | None = None) -> None:
        self.path = path
        self._handler = handler
        self._quick = quick
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False
        self._retry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._open = 0
        self._by_uid: dict[int, int] = {}
        self._repeats = RepeatLog(log)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._repeats = RepeatLog(log, loop=loop)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ControlError(
                f"cannot create {self.path.parent}: {exc.strerror or error_line(exc)}"
            ) from None
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Owner and group only; the group (set by the unit) may read status.
            old_umask = os.umask(0o117)
            try:
                sock.bind(str(self.path))
            finally:
                os.umask(old_umask)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise ControlError(
                f"cannot listen on {self.path}: {exc.strerror or error_line(exc)}"
            ) from None
        self._listener = sock
        self._resume()

    async def close(self) -> None:
        self._pause()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._tasks:
            # A request under way gets a moment to finish; idle ones are cut.
            _done, pending = await asyncio.wait(list(self._tasks), timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # -- accepting -------------------------------------------------------------------

    def _resume(self) -> None:
        if self._accepting or self._listener is None or self._loop is None:
            return
        self._loop.add_reader(self._listener.fileno(), self._accept_ready)
        self._accepting = True

    def _pause(self) -> None:
        if self._accepting and self._listener is not None and self._loop is not None:
            self._loop.remove_reader(self._listener.fileno())
        self._accepting = False

    def _rest(self) -> None:
        self._pause()
        if self._retry is None and self._loop is not None:
            self._retry = self._loop.call_later(ACCEPT_RETRY, self._after_rest)

    def _after_rest(self) -> None:
        self._retry = None
        if self._open < MAX_CONNECTIONS:
            self._resume()

    def _accept_ready(self) -> None:
        assert self._listener is not None
        # One request of a wake-up at most is answered at once: a status of a
        # thousand services holds the loop 25 ms, and a burst of them must not
        # hold the probes for a whole batch; the others take turns with them.
        quick = True
        for _ in range(ACCEPT_BATCH):
            if self._open >= MAX_CONNECTIONS:
                # Root holds every slot: the rest wait in the backlog.
                self._pause()
                return
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._repeats.report(accept_failure("control", exc))
                self._rest()
                return
            self._admit(conn, quick)
            quick = False

    def _admit(self, conn: socket.socket, quick: bool = False) -> None:
        assert self._loop is not None
        try:
            conn.setblocking(False)
            peer = peer_of(conn)
        except OSError:
            conn.close()
            return
        if peer.uid != 0:
            nonroot = self._open - self._by_uid.get(0, 0)
            mine = self._by_uid.get(peer.uid, 0)
            if nonroot >= NONROOT_CONNECTIONS or mine >= PER_UID_CONNECTIONS:
                self._refuse(conn, peer)
                return
        self._open += 1
        self._by_uid[peer.uid] = self._by_uid.get(peer.uid, 0) + 1
        rest = self._answer_now(conn, peer) if quick else None
        if rest == b"":
            self._release(peer)
            conn.close()
            return
        task = self._loop.create_task(
            self._serve(conn, peer) if rest is None else self._finish(conn, peer, rest)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _answer_now(self, conn: socket.socket, peer: Peer) -> bytes | None:
        """Answer in this turn of the event loop a request whose line is already
        there and that needs no waiting (status, ping, a bad request): returns
        what is left to send (b"" when all went), None when the request must go
        the usual way. At a thousand services each await of the usual way waited
        a loop turn behind a slot of probes: 200 ms for a status on a busy machine."""
        if self._quick is None:
            return None
        try:
            data = conn.recv(MAX_REQUEST, socket.MSG_PEEK)
        except OSError:
            return None
        end = data.find(b"\n")
        if end < 0:
            return None  # not all there yet, or too long: the usual way says so
        ok, reply = self._parse(data[: end + 1], peer)
        if ok:
            try:
                answer = self._quick(reply, peer)
            except RequestError as exc:
                reply = error_reply(str(exc), exc.code)
            except Exception as exc:  # a bug in a handler must not stop the daemon
                self._repeats.report(
                    f"control: request failed: {type(exc).__name__}: {error_line(exc)}",
                    level=logging.ERROR,
                    exc_info=exc,
                )
                with contextlib.suppress(OSError):
                    conn.recv(end + 1)  # closed with it unread, the client would get a reset
                return b""
            else:
                if answer is None:
                    return None
                reply = {"ok": True, **answer}
        encoded = _encode(reply)
        _room_for(conn, len(encoded))
        try:
            conn.recv(end + 1)  # the request, read now that it is answered
            sent = conn.send(encoded)
        except BlockingIOError:
            sent = 0
        except OSError:
            return b""  # the client is gone
        return encoded[sent:]

    async def _finish(self, conn: socket.socket, peer: Peer, rest: bytes) -> None:
        """Send the rest of a reply that did not go in one write."""
        assert self._loop is not None
        try:
            await asyncio.wait_for(self._loop.sock_sendall(conn, rest), READ_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            self._release(peer)
            conn.close()

    def _refuse(self, conn: socket.socket, peer: Peer) -> None:
        # A reply fits in the empty send buffer of a new connection, so this
        # never blocks; the client reads it before it sees the close.
        with contextlib.suppress(OSError):
            conn.send(
                _encode(
                    error_reply("too many connections to the control socket; try again later", 1)
                )
            )
        conn.close()
        self._repeats.report(
            "control: refused connections over the limit",
            f"control: refused a connection from uid {peer.uid} (pid {peer.pid}): "
            f"too many open (at most {PER_UID_CONNECTIONS} per user and "
            f"{NONROOT_CONNECTIONS} for all but root, who always keeps "
            f"{MAX_CONNECTIONS - NONROOT_CONNECTIONS})",
        )

    def _release(self, peer: Peer) -> None:
        self._open -= 1
        left = self._by_uid.get(peer.uid, 0) - 1
        if left > 0:
            self._by_uid[peer.uid] = left
        else:
            self._by_uid.pop(peer.uid, None)
        # A descriptor was freed, so an accept that failed for want of one may
        # succeed now: no need to sit out the rest of the pause.
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._open < MAX_CONNECTIONS:
            self._resume()

    # -- one connection ----------------------------------------------------------------

    async def _serve(self, conn: socket.socket, peer: Peer) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=MAX_REQUEST)
            reply = _encode(await self._one_request(reader, peer))
            _room_for(conn, len(reply))
            writer.write(reply)
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            pass
        except Exception as exc:  # a bug in a handler must not stop the daemon
            self._repeats.report(
                f"control: request failed: {type(exc).__name__}: {error_line(exc)}",
                level=logging.ERROR,
                exc_info=exc,
            )
        finally:
            self._release(peer)
            if writer is None:
                conn.close()
            else:
                writer.close()
                with contextlib.suppress(OSError, asyncio.TimeoutError):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)

    def _bad(self, peer: Peer, message: str) -> dict[str, Any]:
        """The reply to a malformed request, logged at most once a minute per
        kind (a flood of them must not flood the journal)."""
        self._repeats.report(
            f"control: bad request: {message}",
            f"control: bad request from uid {peer.uid} (pid {peer.pid}): {message}",
        )
        return error_reply(message, exitcodes.USAGE)

    async def _one_request(self, reader: asyncio.StreamReader, peer: Peer) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), READ_TIMEOUT)
        except asyncio.TimeoutError:
            return self._bad(peer, "request timed out")
        except asyncio.LimitOverrunError:
            return self._bad(peer, f"request larger than {MAX_REQUEST} bytes")
        except asyncio.IncompleteReadError as exc:
            line = exc.partial
            if not line.strip():
                return error_reply("empty request", exitcodes.USAGE)
        ok, request = self._parse(line, peer)
        if not ok:
            return request
        try:
            result = await self._handler(request, peer)
        except RequestError as exc:
            return error_reply(str(exc), exc.code)
        return {"ok": True, **result}

    def _parse(self, line: bytes, peer: Peer) -> tuple[bool, dict[str, Any]]:
        """(True, the request) for a line that its sender may make, else
        (False, the reply refusing it)."""
        try:
            request = jsonlimit.loads(line, max_depth=MAX_DEPTH)
        except ValueError as exc:  # UnicodeDecodeError is one
            if str(exc).startswith("JSON nested deeper"):
                return False, self._bad(peer, f"request nested deeper than {MAX_DEPTH} levels")
            return False, self._bad(peer, "request is not JSON")
        if not isinstance(request, dict) or not isinstance(request.get("command"), str):
            return False, self._bad(peer, "request must be an object with a string 'command'")
        command = request["command"]
        # The group may change under a running daemon (the unit or an
        # operator sets it), so it is read at every request.
        socket_gid = os.stat(self.path).st_gid
        if not peer.may(command, socket_gid):
            self._repeats.report(
                f"control: refused {command[:64]!r} (not authorized)",
                f"control: refused {command[:64]!r} from uid {peer.uid} (pid {peer.pid})",
            )
            if peer.in_group(socket_gid):
                return False, error_reply(
                    f"{command}: permission denied (only root may do this)", 1
                )
            return False, error_reply(
                "permission denied: not root and not in the socket's group", 1
            )
        return True, request
