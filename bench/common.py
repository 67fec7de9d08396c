"""Helpers shared by the lab benchmarks: the machine they ran on, the daemon's log,
and a client pinger that keeps every reply's timestamp."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from natfail.lab import SERVER_TUNNEL_V4, Lab, wait_until

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
ENV = {"PYTHONPATH": str(ROOT)}

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .* icmp_seq=(\d+)")


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


def log_time(line: str) -> float | None:
    """Unix time of a daemon log line (logging's default asctime, millisecond resolution)."""
    m = _LOG_TIME.match(line)
    if m is None:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def find_in_log(log: Path, needle: str, after: float) -> tuple[float, str] | None:
    """The first line at or after ``after`` (10 ms slack for the log's ms resolution)
    that contains ``needle``."""
    for line in log.read_text().splitlines():
        at = log_time(line)
        if at is not None and at >= after - 0.01 and needle in line:
            return at, line
    return None


class Daemon:
    """natfail in the gateway namespace of a lab, logging to a file."""

    def __init__(self, lab: Lab, config: Path, log: Path) -> None:
        self.lab = lab
        self.config = config
        self.log = log
        with open(log, "w") as sink:
            self.proc = lab.popen(
                lab.gateway,
                [sys.executable, "-m", "natfail", "-c", str(config)],
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=ENV,
            )

    def status_active(self) -> str | None:
        proc = subprocess.run(
            [sys.executable, "-m", "natfail.cli.ctl", "-c", str(self.config), "status", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, **ENV},
        )
        m = re.search(r'"active": "([^"]+)"', proc.stdout) if proc.returncode == 0 else None
        return m.group(1) if m else None

    def wait_active(self, name: str, timeout: float = 15.0) -> bool:
        return wait_until(lambda: self.status_active() == name, timeout, 0.2)

    def wait_log(self, needle: str, after: float, timeout: float) -> tuple[float, str] | None:
        found: list[tuple[float, str]] = []

        def seen() -> bool:
            hit = find_in_log(self.log, needle, after)
            if hit is not None:
                found.append(hit)
            return hit is not None

        wait_until(seen, timeout, 0.05)
        return found[0] if found else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Pinger:
    """``ping -D -i 0.05`` from the client through the tunnel; a thread collects the
    reception time of every reply."""

    def __init__(self, lab: Lab, interval: float = 0.05, target: str = SERVER_TUNNEL_V4) -> None:
        self.interval = interval
        self.replies: list[float] = []
        self._lock = threading.Lock()
        self.proc = lab.popen(
            lab.client,
            ["ping", "-n", "-D", "-i", f"{interval:g}", "-W", "1", target],
            stdout=subprocess.PIPE,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = _REPLY.match(line)
            if m:
                with self._lock:
                    self.replies.append(float(m.group(1)))

    def first_reply_after(self, after: float, limit: float) -> float | None:
        """Waits up to ``limit`` seconds (from now) for a reply received after ``after``."""
        deadline = time.time() + limit
        while time.time() < deadline:
            with self._lock:
                later = [t for t in self.replies if t > after]
            if later:
                return later[0]
            time.sleep(0.02)
        return None

    def last_reply_before(self, before: float) -> float | None:
        with self._lock:
            earlier = [t for t in self.replies if t <= before]
        return earlier[-1] if earlier else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self._thread.join(2)


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
