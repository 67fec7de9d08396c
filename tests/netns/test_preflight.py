"""The daemon's checks at start-up, as an operator meets them: `natfail -c
FILE` in a namespace of its own with IP forwarding off, then with a metrics
address another process holds. Each problem is one line, exit 1, and
nothing is touched (no natfail table)."""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from natfail.lab import DAEMON_ENV
from tests.unit.test_cli import write_valid


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"nfpf{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _start(ns: str, conf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "natfail", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**DAEMON_ENV, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )


def _tables(ns: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "tables"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_forwarding_off_and_a_taken_metrics_port_are_named(tmp_path: Path, namespace: str) -> None:
    conf = write_valid(tmp_path)
    conf.write_text(
        f'[daemon]\nsocket = "{tmp_path / "run" / "natfail.sock"}"\n'
        f'state_dir = "{tmp_path / "state"}"\nmetrics_listen = "127.0.0.1:9585"\n\n'
        + conf.read_text()
    )
    proc = _start(namespace, conf)
    assert proc.returncode == 1, proc
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("natfail: net.ipv4.ip_forward is 0"), line
    assert "natfail" not in _tables(namespace)

    subprocess.run(
        ["ip", "netns", "exec", namespace, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"],
        check=True,
    )
    holder = subprocess.Popen(
        [
            "ip", "netns", "exec", namespace, sys.executable, "-c",
            "import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1',9585)); "
            "s.listen(); print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        proc = _start(namespace, conf)
    finally:
        holder.kill()
        holder.wait(5)
    assert proc.returncode == 1, proc
    (line,) = proc.stderr.strip().splitlines()
    assert "metrics_listen 127.0.0.1:9585: another process listens there" in line, line
    assert "natfail" not in _tables(namespace)
