"""`natfail demo` as a new user runs it: it must end with exit 0 and show the
client's tunnel back on the standby backend."""

from __future__ import annotations

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
