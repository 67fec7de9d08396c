"""natfailctl's socket from the [daemon] table alone agrees with the whole
config's, and leaves to the whole file what it cannot tell."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from natfail.cli import socket_lookup
from natfail.config import load
from natfail.locations import DEFAULT_SOCKET
from tests.unit.test_config import MINIMAL


@pytest.mark.parametrize(
    "daemon",
    [
        "",
        '[daemon]\nsocket = "/run/x/natfail.sock"\n',
        '# the daemon\n[daemon]  # natfail\nfirewall = "iptables"\nsocket = "rel.sock"\n',
        '[daemon]\nstate_dir = "/var/lib/x"\n',
    ],
)
def test_the_table_alone_agrees_with_the_whole_file(tmp_path: Path, daemon: str) -> None:
    path = tmp_path / "natfail.toml"
    path.write_text(daemon + MINIMAL)
    assert socket_lookup.socket_in(path) == load(path).daemon.socket


@pytest.mark.parametrize(
    "text",
    [
        'daemon.socket = "/a.sock"\n',  # a dotted key outside the table
        'daemon = { socket = "/a.sock" }\n',  # an inline table
        '[daemon]\nsocket = "/a.sock"\n[daemon]\nsocket = "/b.sock"\n',  # twice
        '[daemon]\nsocket = """/a.sock"""\n',  # a multi-line string
        "[daemon]\nsocket = 5\n",  # a mistake: the whole file tells it
        '[daemon]\nsocket = ""\n',
        f'[daemon]\nsocket = "/{"x" * 200}.sock"\n',  # longer than a unix socket path
        '[daemon]\nsocket = "/a.sock"\nsocket = "/b.sock"\n',  # not TOML
        "[daemon.extra]\nx = 1\n",
    ],
)
def test_what_the_table_cannot_tell_is_left_to_the_whole_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "natfail.toml"
    path.write_text(text + MINIMAL)
    assert socket_lookup.socket_in(path) is None


def test_the_services_are_not_read(tmp_path: Path) -> None:
    path = tmp_path / "natfail.toml"
    path.write_text('[daemon]\nsocket = "/run/x.sock"\n[[service]]\nname = 5\n')
    assert socket_lookup.socket_in(path) == Path("/run/x.sock")
    path.write_text("[[service]]\nname = 5\n")
    assert socket_lookup.socket_in(path) == DEFAULT_SOCKET


def test_a_fifo_or_a_missing_file_is_left_to_the_whole_file(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    started = time.monotonic()
    assert socket_lookup.socket_in(fifo) is None
    assert time.monotonic() - started < 5  # never waits for a writer
    assert socket_lookup.socket_in(tmp_path / "missing.toml") is None


def test_a_relative_socket_of_a_broken_file_is_the_config_directorys(tmp_path: Path) -> None:
    """The fallback that reads a broken file raw resolves the socket as load does."""
    import argparse

    from natfail.cli.daemon_cmds import socket_path

    path = tmp_path / "natfail.toml"
    path.write_text('daemon.socket = "rel.sock"\n[[service]]\nname = 5\n')
    args = argparse.Namespace(socket=None, config=path)
    assert socket_path(args) == tmp_path / "rel.sock"
