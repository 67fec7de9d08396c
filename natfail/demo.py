"""`natfail demo`: the daemon failing a WireGuard service over, in a lab of
network namespaces with real wireguard-go.

It builds the lab, runs `natfail` in the gateway's namespace with a demo
config, shows `natfailctl status`, keeps the client pinging through the
tunnel every 50 ms, kills the active backend and prints the timeline from
the daemon's own log and the client's pings: killed, detected, swapped,
cleaned, tunnel back."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from natfail import exitcodes
from natfail.lab import SERVER_TUNNEL_V4, Lab, LabError, wait_until

REPO = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(REPO)}
PROBE = "[service.probe]\ninterval = 0.5\ntimeout = 0.3\nrise = 1\nfall = 2"
RECOVERY_LIMIT = 40.0

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_SWAP = re.compile(r"swap_ms=([\d.]+) cleanup_ms=([\d.]+)")


class _Out:
    def __init__(self) -> None:
        self.colour = sys.stdout.isatty() and "NO_COLOR" not in os.environ

    def paint(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def title(self, text: str) -> None:
        print(self.paint("1", text), flush=True)

    def line(self, text: str = "") -> None:
        print(text, flush=True)


def _log_time(line: str) -> float | None:
    m = _LOG_TIME.match(line)
    if m is None:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _find(log: Path, needle: str, after: float) -> tuple[float, str] | None:
    for line in log.read_text().splitlines():
        at = _log_time(line)
        if at is not None and at >= after - 0.01 and needle in line:
            return at, line
    return None


def run() -> int:
    if os.geteuid() != 0:
        sys.stderr.write("natfail: demo: run as root (it builds network namespaces)\n")
        return exitcodes.FAILED
    out = _Out()
    out.title("natfail demo: WireGuard failover in a lab of network namespaces")
    try:
        with Lab(backends=2) as lab:
            return _story(lab, out)
    except LabError as exc:
        sys.stderr.write(f"natfail: demo: {exc}\n")
        return exitcodes.FAILED


def _ctl(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "natfail.cli.ctl", "-c", str(config), *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **ENV},
    )


def _active(config: Path) -> str | None:
    proc = _ctl(config, "status", "--json")
    if proc.returncode != 0:
        return None
    match = re.search(r'"active": "([^"]+)"', proc.stdout)
    return match.group(1) if match else None


def _story(lab: Lab, out: _Out) -> int:
    a, b = lab.backends[0], lab.backends[1]
    config = lab.write_config(extra_service=PROBE)
    log = lab.dir / "natfail.log"
    out.line(
        f"lab {lab.id}: client -> gateway {lab.public_v4}:{lab.public_port} -> "
        f"backend a {a.address} (priority 100), b {b.address} (priority 90)"
    )
    out.line("probe: every 0.5 s, timeout 0.3 s, up after 1 answer, down after 2 misses")
    with open(log, "w") as sink:
        daemon = lab.popen(
            lab.gateway,
            [sys.executable, "-m", "natfail", "-c", str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=ENV,
        )
    if not wait_until(lambda: _active(config) == "a", 15):
        out.line(out.paint("31", "the daemon did not select backend a; its log:"))
        out.line(log.read_text())
        return exitcodes.FAILED
    out.line()
    out.line(_ctl(config, "status").stdout.rstrip())
    out.line()
    if not lab.client_ping(count=3, interval=0.1, timeout=5):
        out.line(out.paint("31", "the client's tunnel does not carry pings"))
        return exitcodes.FAILED
    out.line(f"client pings {SERVER_TUNNEL_V4} through the tunnel every 50 ms")
    pinger = lab.popen(
        lab.client,
        ["ping", "-n", "-D", "-i", "0.05", "-W", "1", SERVER_TUNNEL_V4],
        stdout=subprocess.PIPE,
    )
    time.sleep(1.0)
    killed = time.time()
    a.stop()
    out.line(out.paint("31", "killed backend a's wireguard-go"))
    recovered = _first_reply_after(pinger, killed + 0.2, RECOVERY_LIMIT)
    pinger.kill()
    pinger.wait()
    detected = _find(log, "backend a is down", killed)
    swapped = _find(log, "switch service=wg0 from=a to=b", killed)
    daemon.terminate()
    daemon.wait(10)
    out.line()
    out.title("timeline (from the kill)")
    out.line(f"  {0:8.0f} ms  backend a killed")
    if detected is None or swapped is None:
        out.line(out.paint("31", "the daemon did not fail over; its log:"))
        out.line(log.read_text())
        return exitcodes.FAILED
    swap = _SWAP.search(swapped[1])
    swap_ms, clean_ms = (float(swap.group(1)), float(swap.group(2))) if swap else (0.0, 0.0)
    out.line(f"  {(detected[0] - killed) * 1000:8.0f} ms  failure detected by the probes")
    out.line(
        f"  {(swapped[0] - killed) * 1000:8.0f} ms  rules swapped to b "
        f"(one transaction: {swap_ms:.1f} ms) and conntrack cleaned ({clean_ms:.1f} ms)"
    )
    if recovered is None:
        out.line(out.paint("31", f"  the client's tunnel was not back within {RECOVERY_LIMIT:g} s"))
        return exitcodes.FAILED
    out.line(
        out.paint(
            "32", f"  {(recovered - killed) * 1000:8.0f} ms  client tunnel back, through backend b"
        )
    )
    out.line()
    out.line(
        "The gap between the swap and the tunnel is WireGuard's own: backend b has no "
        "session\nwith the client until the client's WireGuard starts a new handshake "
        "(it does so\nafter about 5 to 15 s without answers)."
    )
    out.line(f"client endpoint still {lab.client_endpoint()}; removing the lab")
    return exitcodes.OK


def _first_reply_after(pinger: subprocess.Popen[str], after: float, limit: float) -> float | None:
    assert pinger.stdout is not None
    deadline = time.time() + limit
    stamp = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from")
    fd = pinger.stdout.fileno()
    os.set_blocking(fd, False)
    buffer = ""
    while time.time() < deadline:
        try:
            chunk = os.read(fd, 65536).decode(errors="replace")
        except BlockingIOError:
            chunk = ""
        if chunk:
            buffer += chunk
            *lines, buffer = buffer.split("\n")
            for line in lines:
                m = stamp.match(line)
                if m and float(m.group(1)) > after:
                    return float(m.group(1))
        time.sleep(0.02)
    return None
