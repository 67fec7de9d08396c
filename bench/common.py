"""Helpers shared by the lab benchmarks: the machine they ran on, the daemon
(natfail.lab's runner, started at once) and the client pinger."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from natfail.lab import DAEMON_ENV, DaemonRunner, Lab, Pinger

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
ENV = DAEMON_ENV

__all__ = ["ENV", "RESULTS_DIR", "ROOT", "Daemon", "Pinger", "machine", "stats", "write_results"]


def write_results(path: Path, result: dict[str, Any], indent: int = 2) -> None:
    """A benchmark's figures, as the JSON file under bench/results it owns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent) + "\n")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What every results file records about the machine it ran on."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


class Daemon(DaemonRunner):
    """natfail in the gateway namespace of a lab, logging to ``log``, started at once
    (not waited for: see :meth:`wait_ready` and :meth:`wait_active`)."""

    proc: subprocess.Popen[str]  # started in the constructor

    def __init__(self, lab: Lab, config: Path, log: Path) -> None:
        super().__init__(lab, config, log=log)
        self.start()

    def status_active(self) -> str | None:
        return self.active()


def stats(values: list[float]) -> dict[str, float]:
    """min / median / p90 / max / mean of a list (ms figures, rounded)."""
    if not values:
        return {}
    s = sorted(values)
    p90 = s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]
    return {
        "min": round(s[0], 1),
        "median": round(
            s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2, 1
        ),
        "p90": round(p90, 1),
        "max": round(s[-1], 1),
        "mean": round(sum(s) / len(s), 1),
    }
