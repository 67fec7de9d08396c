"""`natfailctl status --check`: the verdict a monitoring system reads."""

from __future__ import annotations

from typing import Any

from natfail import exitcodes
from natfail.cli.daemon_cmds import check_status


def _service(name: str, active: str | None, *states: str, **extra: Any) -> dict[str, Any]:
    backends = [{"name": chr(ord("a") + i), "state": s} for i, s in enumerate(states)]
    return {"name": name, "active": active, "backends": backends, **extra}


def test_every_backend_up_is_ok() -> None:
    code, line = check_status([_service("wg0", "a", "up", "up")])
    assert code == exitcodes.OK and line.startswith("OK:")


def test_a_standby_down_or_a_warning_is_a_warning() -> None:
    code, line = check_status([_service("wg0", "a", "up", "down")])
    assert code == exitcodes.CHECK_WARNING and "wg0 (b not up)" in line
    code, line = check_status([_service("wg0", "a", "up", "up", warnings=["foreign NAT"])])
    assert code == exitcodes.CHECK_WARNING and "wg0 (warnings)" in line


def test_no_healthy_backend_or_nothing_active_is_critical() -> None:
    code, line = check_status(
        [
            _service("wg0", "a", "down", "down", no_healthy_backend=True),
            _service("wg1", None, "unknown"),
            _service("wg2", "a", "up", "down"),
        ]
    )
    assert code == exitcodes.CHECK_CRITICAL
    assert line == "CRITICAL: no healthy backend for wg0, wg1"
