from __future__ import annotations

import os
import socket
from pathlib import Path

from natfail.io.sdnotify import SdNotify


def test_sends_one_datagram_per_message(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        notifier = SdNotify({"NOTIFY_SOCKET": str(path)})
        notifier.notify("READY=1", "STATUS=wg0: active a\nsecond line")
        assert server.recv(4096) == b"READY=1\nSTATUS=wg0: active a second line"


def test_abstract_socket() -> None:
    name = f"natfail-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(2)
        SdNotify({"NOTIFY_SOCKET": "@" + name}).notify("WATCHDOG=1")
        assert server.recv(4096) == b"WATCHDOG=1"


def test_without_systemd_does_nothing_and_never_raises(tmp_path: Path) -> None:
    SdNotify({}).notify("READY=1")
    SdNotify({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).notify("READY=1")


def test_watchdog_interval() -> None:
    assert SdNotify({"WATCHDOG_USEC": "2000000"}).watchdog_interval == 2.0
    assert SdNotify({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert SdNotify({}).watchdog_interval is None
