"""The control socket with real unix sockets: framing, limits, garbage, and
authorization by the peer's credentials."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natfail.cli import client
from natfail.cli.common import Refused, Unreachable, UsageError
from natfail.io import control

NOBODY = 65534


async def _handler(request: dict[str, Any], peer: control.Peer) -> dict[str, Any]:
    if request["command"] == "status":
        return {"services": [], "uid": peer.uid}
    if request["command"] == "switch":
        raise control.RequestError("backend b is down (use --force)", 1)
    if request["command"] == "boom":
        raise RuntimeError("a bug")
    if request["command"] == "slow":  # holds its slot a moment
        await asyncio.sleep(0.02)
    return {"message": f"did {request['command']}"}


def _with_server(
    body: Callable[[Path], Awaitable[None]],
    tmp_path: Path,
    quick: control.QuickHandler | None = None,
) -> None:
    async def main() -> None:
        server = control.ControlServer(tmp_path / "ctl.sock", _handler, quick)
        await server.start()
        try:
            await body(server.path)
        finally:
            await server.close()
        assert not server.path.exists()

    asyncio.run(main())


async def _raw(path: Path, payload: bytes, *, shut: bool = True) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(payload)
    await writer.drain()
    if shut:
        writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


async def _call(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    return await asyncio.to_thread(client.call, path, request)


def test_status_round_trip(tmp_path: Path) -> None:
    async def body(path: Path) -> None:
        reply = await _call(path, {"command": "status"})
        assert reply == {"ok": True, "services": [], "uid": os.geteuid()}
        assert os.stat(path).st_mode & 0o777 == 0o660

    _with_server(body, tmp_path)


def test_refusals_map_to_exceptions(tmp_path: Path) -> None:
    async def body(path: Path) -> None:
        with pytest.raises(Refused, match="backend b is down"):
            await _call(path, {"command": "switch"})
        with pytest.raises(UsageError, match="string 'command'"):
            await _call(path, {"cmd": "status"})

    _with_server(body, tmp_path)


@pytest.mark.parametrize(
    "payload, fragment",
    [
        (b"not json\n", "not JSON"),
        (b"[1, 2]\n", "object"),
        (b'{"command": 5}\n', "string 'command'"),
        (b"\xff\xfe\n", "not JSON"),
        (b"\n", "not JSON"),
        (b"", "empty request"),
        (b'{"command": "status"}', None),  # no newline, then EOF: still answered
    ],
)
def test_garbage_gets_an_error_reply(tmp_path: Path, payload: bytes, fragment: str | None) -> None:
    async def body(path: Path) -> None:
        reply = json.loads(await _raw(path, payload))
        if fragment is None:
            assert reply["ok"] is True
        else:
            assert reply["ok"] is False and fragment in reply["error"]
        # and the server still serves
        assert (await _call(path, {"command": "status"}))["ok"]

    _with_server(body, tmp_path)


def test_oversized_and_silent_clients_are_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "READ_TIMEOUT", 0.2)

    async def body(path: Path) -> None:
        reply = json.loads(await _raw(path, b"x" * (control.MAX_REQUEST + 10)))
        assert "larger than" in reply["error"]
        silent = json.loads(await _raw(path, b'{"command":', shut=False))
        assert "timed out" in silent["error"]
        assert (await _call(path, {"command": "status"}))["ok"]

    _with_server(body, tmp_path)


def test_a_handler_bug_does_not_stop_the_server(tmp_path: Path) -> None:
    async def body(path: Path) -> None:
        assert await _raw(path, b'{"command": "boom"}\n') == b""
        assert (await _call(path, {"command": "status"}))["ok"]

    _with_server(body, tmp_path)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.binary(max_size=2048))
def test_random_bytes_only_yield_error_replies(tmp_path: Path, payload: bytes) -> None:
    async def body(path: Path) -> None:
        data = await _raw(path, payload)
        reply = json.loads(data)
        assert isinstance(reply, dict) and "ok" in reply
        assert (await _call(path, {"command": "status"}))["ok"]

    _with_server(body, tmp_path)


def test_no_daemon_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(Unreachable):
        client.call(tmp_path / "none.sock", {"command": "status"})
    stale = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()
    with pytest.raises(Unreachable):
        client.call(stale, {"command": "status"})


def _as_user(path: Path, uid: int, gid: int, groups: list[int], command: str) -> str:
    """Run a request in a child that dropped to `uid`; return how it ended."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            try:
                reply = client.call(path, {"command": command}, timeout=5)
                outcome = "ok" if reply.get("ok") else "refused"
            except Refused as exc:
                outcome = f"refused: {exc}"
            except (Unreachable, UsageError) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
            os.write(write_fd, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        outcome = pipe.read()
    os.waitpid(pid, 0)
    return outcome


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
@pytest.mark.parametrize("mode", [0o660, 0o666])
def test_authorization_by_peer_credentials(mode: int) -> None:
    """0660 is what the daemon creates; 0666 shows that the daemon's own
    check holds even when the file's mode would let anybody in."""
    group = 4242  # the socket's group, as the unit would set it
    directory = Path(tempfile.mkdtemp(prefix="natfail-ctl-"))
    directory.chmod(0o755)

    async def body(path: Path) -> None:
        os.chown(path, 0, group)
        path.chmod(mode)
        outsider = await asyncio.to_thread(_as_user, path, NOBODY, NOBODY, [], "status")
        member = await asyncio.to_thread(_as_user, path, NOBODY, NOBODY, [group], "status")
        member_reload = await asyncio.to_thread(_as_user, path, NOBODY, NOBODY, [group], "reload")
        assert outsider.startswith("refused: "), outsider
        assert "permission denied" in outsider
        assert member == "ok"
        assert member_reload.startswith("refused: ") and "only root" in member_reload

    try:
        _with_server(body, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- hostile clients: deep JSON, floods, idle connections -----------------------------


def test_deeply_nested_json_gets_an_error_reply_and_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """60,000 levels raised RecursionError with a traceback and no reply; a
    flood of them wrote megabytes of log."""
    unclosed = b"[" * 60_000 + b"\n"
    balanced = b'{"command": "status", "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}\n"

    async def body(path: Path) -> None:
        for i in range(50):
            reply = json.loads(await _raw(path, unclosed if i % 2 else balanced))
            assert reply["ok"] is False and reply["code"] == 2
            assert f"nested deeper than {control.MAX_DEPTH} levels" in reply["error"]
        assert (await _call(path, {"command": "status"}))["ok"]

    with caplog.at_level("INFO", logger="natfail"):
        _with_server(body, tmp_path)
    lines = [r for r in caplog.records if "nested deeper" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert lines[0].exc_info is None and "Traceback" not in caplog.text


def test_a_flood_of_garbage_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(path: Path) -> None:
        for _ in range(100):
            assert json.loads(await _raw(path, b"garbage\n"))["ok"] is False

    with caplog.at_level("INFO", logger="natfail"):
        _with_server(body, tmp_path)
    assert len([r for r in caplog.records if "not JSON" in r.getMessage()]) == 1


def _hold_connections(path: Path, uid: int, count: int) -> tuple[int, int, int]:
    """A child that drops to `uid`, opens `count` connections that send
    nothing, reports how many the server left open (not answered at once),
    and holds them until the returned pipe closes. Returns (pid, held, pipe)."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(ready_r)
            os.close(hold_w)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            socks = []
            for _ in range(count):
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(path))
                socks.append(s)
            time.sleep(0.5)
            held = 0
            for s in socks:
                s.setblocking(False)
                try:
                    s.recv(1)  # a refusal reply, or the close
                except BlockingIOError:
                    held += 1
                except OSError:
                    pass
            os.write(ready_w, str(held).encode())
            os.read(hold_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    held = int(os.read(ready_r, 16) or b"-1")
    os.close(ready_r)
    return pid, held, hold_w


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
def test_idle_connections_of_other_users_never_lock_root_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """About 40 idle connections from a member of the group locked root out:
    0 of 89 root calls succeeded, and nothing was logged."""
    monkeypatch.setattr(control, "READ_TIMEOUT", 30.0)  # they stay idle throughout
    directory = Path(tempfile.mkdtemp(prefix="natfail-ctl-"))
    directory.chmod(0o755)
    many = control.MAX_CONNECTIONS + 20  # more than all slots, from two users

    async def body(path: Path) -> None:
        path.chmod(0o666)
        children = []
        try:
            for uid in (NOBODY, NOBODY - 1):
                pid, held, hold = await asyncio.to_thread(_hold_connections, path, uid, many)
                children.append((pid, hold))
                assert held == control.PER_UID_CONNECTIONS, held
            for _ in range(20):
                assert (await _call(path, {"command": "status"}))["uid"] == 0
            # the others get a refusal they can read, not a reset
            refused = await asyncio.to_thread(_as_user, path, NOBODY, NOBODY, [], "status")
            assert "too many connections" in refused, refused
        finally:
            # every pipe first: a later child holds a copy of an earlier one's
            for _pid, hold in children:
                os.close(hold)
            for pid, _hold in children:
                await asyncio.to_thread(os.waitpid, pid, 0)

    with caplog.at_level("INFO", logger="natfail"):
        try:
            _with_server(body, directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    refusals = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(refusals) == 1, caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")
def test_every_user_but_root_shares_a_bounded_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "READ_TIMEOUT", 30.0)
    directory = Path(tempfile.mkdtemp(prefix="natfail-ctl-"))
    directory.chmod(0o755)
    users = control.NONROOT_CONNECTIONS // control.PER_UID_CONNECTIONS + 1

    async def body(path: Path) -> None:
        path.chmod(0o666)
        children = []
        try:
            held_total = 0
            for i in range(users):
                pid, held, hold = await asyncio.to_thread(
                    _hold_connections, path, NOBODY - 100 - i, control.PER_UID_CONNECTIONS
                )
                children.append((pid, hold))
                held_total += held
            assert held_total == control.NONROOT_CONNECTIONS
            assert (await _call(path, {"command": "status"}))["ok"]
        finally:
            # every pipe first: a later child holds a copy of an earlier one's
            for _pid, hold in children:
                os.close(hold)
            for pid, _hold in children:
                await asyncio.to_thread(os.waitpid, pid, 0)

    try:
        _with_server(body, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_idle_connections_are_cut_after_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "READ_TIMEOUT", 0.3)

    async def body(path: Path) -> None:
        idle = [await asyncio.open_unix_connection(str(path)) for _ in range(10)]
        for reader, writer in idle:
            reply = json.loads(await asyncio.wait_for(reader.read(), 10))
            assert "timed out" in reply["error"]
            writer.close()
        assert (await _call(path, {"command": "status"}))["ok"]

    _with_server(body, tmp_path)


def test_root_past_every_slot_waits_rather_than_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 concurrent clients: none may be reset; the ones past the slots wait
    in the backlog for a free one."""
    monkeypatch.setattr(control, "MAX_CONNECTIONS", 8)
    monkeypatch.setattr(control, "NONROOT_CONNECTIONS", 4)

    async def body(path: Path) -> None:
        request = b'{"command": "slow"}\n'
        replies = await asyncio.gather(*(_raw(path, request) for _ in range(300)))
        assert all(json.loads(r)["ok"] for r in replies)

    _with_server(body, tmp_path)


# -- the socket's path ------------------------------------------------------------------


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    stale = tmp_path / "ctl.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(stale))
    sock.close()

    async def body(path: Path) -> None:
        assert (await _call(path, {"command": "status"}))["ok"]

    _with_server(body, tmp_path)


def test_a_live_socket_is_never_taken_over(tmp_path: Path) -> None:
    live = socket.socket(socket.AF_UNIX)
    live.bind(str(tmp_path / "ctl.sock"))
    live.listen(1)
    inode = (tmp_path / "ctl.sock").stat().st_ino

    async def main() -> None:
        server = control.ControlServer(tmp_path / "ctl.sock", _handler)
        with pytest.raises(control.ControlError, match="another process listens on"):
            await server.start()
        await server.close()

    try:
        asyncio.run(main())
        assert (tmp_path / "ctl.sock").stat().st_ino == inode
    finally:
        live.close()


def test_a_file_at_the_socket_path_is_not_removed(tmp_path: Path) -> None:
    (tmp_path / "ctl.sock").write_text("precious")

    async def main() -> None:
        server = control.ControlServer(tmp_path / "ctl.sock", _handler)
        with pytest.raises(control.ControlError, match="is not a socket"):
            await server.start()

    asyncio.run(main())
    assert (tmp_path / "ctl.sock").read_text() == "precious"


# --------------------------------------------------------------------------
# answered in the turn that accepts the connection


def _quick(request: dict[str, Any], peer: control.Peer) -> dict[str, Any] | None:
    if request["command"] == "status":
        return {"services": [], "quick": True}
    if request["command"] == "events":
        raise control.RequestError("count must be a whole number", 2)
    if request["command"] == "big":
        return {"blob": "x" * 3_000_000}
    if request["command"] == "boom":
        raise RuntimeError("a bug")
    return None  # the usual way, through the handler


async def _sent_before_accept(path: Path, payload: bytes) -> bytes:
    """A request that is in the socket before the server's loop gets to accept
    it (this coroutine does not yield until it is sent), and the whole reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.sendall(payload)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    chunks = []
    try:
        while data := await asyncio.wait_for(loop.sock_recv(sock, 65536), 10):
            chunks.append(data)
    finally:
        sock.close()
    return b"".join(chunks)


def test_a_reading_request_is_answered_in_the_turn_that_accepts_it(tmp_path: Path) -> None:
    async def body(path: Path) -> None:
        reply = json.loads(await _sent_before_accept(path, b'{"command": "status"}\n'))
        assert reply == {"ok": True, "services": [], "quick": True}
        # declined by the quick answer: the handler's, as before
        reply = json.loads(await _sent_before_accept(path, b'{"command": "switch"}\n'))
        assert reply["ok"] is False and "backend b is down" in reply["error"]
        reply = json.loads(await _sent_before_accept(path, b'{"command": "events"}\n'))
        assert reply == {"ok": False, "error": "count must be a whole number", "code": 2}
        reply = json.loads(await _sent_before_accept(path, b"garbage\n"))
        assert reply["ok"] is False and "not JSON" in reply["error"]
        # a bug in the quick answer closes that connection, and only that
        assert await _sent_before_accept(path, b'{"command": "boom"}\n') == b""
        # a request still coming in goes the usual way
        assert (await _call(path, {"command": "status"}))["ok"] is True

    _with_server(body, tmp_path, _quick)


def test_a_quick_reply_larger_than_the_send_buffer_arrives_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "_room_for", lambda conn, size: None)

    async def body(path: Path) -> None:
        raw = await _sent_before_accept(path, b'{"command": "big"}\n')
        assert raw.endswith(b"\n") and len(json.loads(raw)["blob"]) == 3_000_000
        # and the server still answers
        assert (await _call(path, {"command": "ping"}))["message"] == "did ping"

    _with_server(body, tmp_path, _quick)


def test_one_request_per_wake_up_is_answered_at_once(tmp_path: Path) -> None:
    """A burst of waiting status requests must not hold the loop for all of
    them in one turn: the first is answered at once, the others in turns."""

    async def body(path: Path) -> None:
        socks = []
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(path))
            sock.sendall(b'{"command": "status"}\n')
            sock.setblocking(False)
            socks.append(sock)
        loop = asyncio.get_running_loop()
        replies = []
        for sock in socks:
            data = b""
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 65536), 10):
                data += chunk
            sock.close()
            replies.append(json.loads(data))
        assert [r.get("quick", False) for r in replies] == [True, False, False]
        assert all(r["ok"] for r in replies)

    _with_server(body, tmp_path, _quick)
