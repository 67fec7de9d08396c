"""`natfail demo` as a new user runs it: it must end with exit 0 and show the
client's tunnel back on the standby backend."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_runs_and_fails_over() -> None:
    """With agents (the default): the new backend brings the client over."""
    proc = subprocess.run(
        [sys.executable, "-m", "natfail", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "client tunnel back, through backend b" in proc.stdout, proc.stdout
    assert "rules swapped to b" in proc.stdout
    assert "b's agent told to bring 1 client(s) over; it answered" in proc.stdout, proc.stdout
    assert "client outage" in proc.stdout
    assert "\033[" not in proc.stdout  # no colour when not on a terminal
    assert "Traceback" not in proc.stderr


def test_demo_without_agents_shows_wireguards_own_recovery() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "natfail", "demo", "--no-agent"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "client tunnel back, through backend b" in proc.stdout, proc.stdout
    assert "agent told" not in proc.stdout
    assert "WireGuard's own" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_demo_pair_survives_the_masters_death() -> None:
    """Two gateways under keepalived: the master dies, the client's tunnel comes
    back on the same backend without a new handshake."""
    proc = subprocess.run(
        [sys.executable, "-m", "natfail", "demo", "--pair"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "role decide" in proc.stdout and "role follow" in proc.stdout, proc.stdout
    assert "VIPs moved" in proc.stdout, proc.stdout
    assert "client tunnel back, through" in proc.stdout, proc.stdout
    assert re.search(r"^client outage \d+\.\d\d s", proc.stdout, re.MULTILINE), proc.stdout
    assert "same backend" in proc.stdout, proc.stdout
    assert "client re-handshake: none" in proc.stdout, proc.stdout
    assert "\033[" not in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_demo_pair_refuses_no_agent() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "natfail", "demo", "--pair", "--no-agent"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "--no-agent" in proc.stderr, proc.stderr
