"""The control socket with real unix sockets: framing, limits, garbage, and
authorization by the peer's credentials."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import tempfile
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
    return {"message": f"did {request['command']}"}


def _with_server(body: Callable[[Path], Awaitable[None]], tmp_path: Path) -> None:
    async def main() -> None:
        server = control.ControlServer(tmp_path / "ctl.sock", _handler)
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
