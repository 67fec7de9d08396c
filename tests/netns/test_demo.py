"""`natfail demo` as a new user runs it: it must end with exit 0 and show the
client's tunnel back on the standby backend."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_and_fails_over() -> None:
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
    assert "\033[" not in proc.stdout  # no colour when not on a terminal
    assert "Traceback" not in proc.stderr
