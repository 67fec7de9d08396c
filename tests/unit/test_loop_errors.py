"""Repeated errors are logged once and then counted: the event loop's
handler, and the control server and metrics listener out of file
descriptors (with ulimit -n 64 and a flood, 11,849 accept tracebacks)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from natfail.cli import client
from natfail.io import loop_errors
from natfail.io.loop_errors import RepeatLog
from natfail.lab import wait_until

REPO = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_a_repeat_is_logged_once_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    repeats = RepeatLog(logging.getLogger("natfail.test"), clock=clock)
    with caplog.at_level(logging.INFO, logger="natfail"):
        for _ in range(1000):
            repeats.report("accept failed", "accept failed: the first one")
            clock.now += 0.01  # 10 s in all
        assert _messages(caplog) == ["accept failed: the first one"]
        clock.now += 51.0
        repeats.report("accept failed")
        assert _messages(caplog)[1:] == ["accept failed (repeated 1000 times in 61 s)"]
        repeats.report("another")  # a new kind is not held back by the first
        assert _messages(caplog)[2:] == ["another"]
        # a count still pending is written by flush once due, and only then
        repeats.report("another")
        repeats.flush()
        assert len(caplog.records) == 3
        clock.now += 60.0
        repeats.flush()
        assert _messages(caplog)[3:] == ["another (repeated 1 time in 60 s)"]
        # a kind that went quiet is forgotten: next time it is logged in full
        clock.now += 61.0
        repeats.flush()
        repeats.report("accept failed", "accept failed: again")
        assert _messages(caplog)[4:] == ["accept failed: again"]


def test_the_table_of_kinds_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    repeats = RepeatLog(logging.getLogger("natfail.test"), clock=Clock())
    with caplog.at_level(logging.INFO, logger="natfail"):
        for i in range(10_000):
            repeats.report(f"error {i}")
    assert len(caplog.records) == loop_errors.MAX_KINDS + 1
    assert caplog.records[-1].getMessage() == loop_errors.OTHER


def test_the_loop_handler(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop_errors.install(loop, clock=clock)
        emfile = OSError(errno.EMFILE, "Too many open files")
        for _ in range(500):
            loop.call_exception_handler(
                {
                    "message": "socket.accept() out of system resource",
                    "exception": emfile,
                    "socket": object(),
                }
            )
        try:
            raise RuntimeError("a bug")
        except RuntimeError as exc:
            bug = exc
        for _ in range(3):
            loop.call_exception_handler(
                {"message": "Task exception was never retrieved", "exception": bug}
            )
        loop.call_exception_handler({"message": "no exception here"})
        clock.now += 60.0
        # the next of each kind, once due, writes the count
        loop.call_exception_handler(
            {"message": "socket.accept() out of system resource", "exception": emfile}
        )
        loop.call_exception_handler(
            {"message": "Task exception was never retrieved", "exception": bug}
        )

    with caplog.at_level(logging.INFO, logger="natfail"):
        asyncio.run(main())
    records = caplog.records
    assert [r.getMessage() for r in records[:3]] == [
        "event loop: socket.accept() out of system resource: OSError: "
        "[Errno 24] Too many open files",
        "event loop: Task exception was never retrieved: RuntimeError: a bug",
        "event loop: no exception here",
    ]
    assert records[0].exc_info is None  # no traceback for an OSError
    assert records[1].exc_info is not None  # a bug keeps its traceback, once
    counts = sorted(r.getMessage() for r in records[3:])
    assert counts == [
        "event loop: Task exception was never retrieved: RuntimeError: a bug "
        "(repeated 3 times in 60 s)",
        "event loop: socket.accept() out of system resource: OSError: "
        "[Errno 24] Too many open files (repeated 500 times in 60 s)",
    ]


def test_a_pending_count_is_written_by_a_timer_on_the_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        repeats = RepeatLog(
            logging.getLogger("natfail.test"), interval=0.2, loop=asyncio.get_running_loop()
        )
        for _ in range(5):
            repeats.report("same")
        await asyncio.sleep(1.0)

    with caplog.at_level(logging.INFO, logger="natfail"):
        asyncio.run(main())
    assert _messages(caplog)[0] == "same"
    assert _messages(caplog)[1].startswith("same (repeated 4 times in ")
    assert len(caplog.records) == 2


# -- out of file descriptors, for real --------------------------------------------------

_SERVER = textwrap.dedent("""
    import asyncio, logging, os, resource, sys
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    from natfail.io import control, loop_errors
    from natfail.io.metrics import Metrics

    mode, path, seconds = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])

    async def handler(request, peer):
        return {}

    def starve():
        # Room for a few connections more than are open now, no more.
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 6, hard))

    async def main():
        if mode == "asyncio":  # the control server and the listener need no help
            loop_errors.install(asyncio.get_running_loop())
        if mode == "control":
            server = control.ControlServer(path, handler)
            await server.start()
        elif mode == "asyncio":
            async def serve(reader, writer):
                await reader.read()
                writer.close()
            server = await asyncio.start_unix_server(serve, path=str(path))
        else:
            metrics = Metrics()
            metrics.serve("127.0.0.1", 0)
            path.write_text(str(metrics.address[1]))
        starve()
        print("ready", flush=True)
        await asyncio.sleep(seconds)

    asyncio.run(main())
""")


def _starved(mode: str, path: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, mode, str(path), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n", proc.communicate()
    return proc


def _flood(connect: Callable[[], socket.socket], count: int) -> list[socket.socket]:
    return [connect() for _ in range(count)]


@pytest.mark.parametrize("mode", ["control", "asyncio"])
def test_unix_servers_out_of_descriptors_log_once(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "ctl.sock"
    proc = _starved(mode, path, 60.0)
    try:

        def connect() -> socket.socket:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            return s

        socks = _flood(connect, 60)
        time.sleep(3)  # several rounds of EMFILE on accept
        for s in socks:
            s.close()
        if mode == "control":
            # once the flood is gone, root's request is served again
            assert wait_until(lambda: _status_ok(path), 20, 0.2)
        else:
            time.sleep(1)
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err
    accept_lines = [line for line in err.splitlines() if "accept" in line]
    assert len(accept_lines) == 1, err
    assert "Too many open files" in accept_lines[0]


def _status_ok(path: Path) -> bool:
    try:
        return bool(client.call(path, {"command": "status"}, timeout=2)["ok"])
    except Exception:
        return False


def test_the_metrics_listener_out_of_descriptors_logs_once(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    proc = _starved("metrics", port_file, 60.0)
    try:
        port = int(port_file.read_text())
        socks = _flood(lambda: socket.create_connection(("127.0.0.1", port), timeout=10), 60)
        time.sleep(3)
        for s in socks:
            s.close()

        def scrape() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
                    return bool(reply.status == 200)
            except OSError:
                return False

        assert wait_until(scrape, 20, 0.2)
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err
    accept_lines = [line for line in err.splitlines() if "accept" in line]
    assert len(accept_lines) == 1, err
