"""natfail's daemon in a lab's namespace, as an operator runs it (``natfail -c FILE``),
and what the daemon says about itself: its status and its switch records, read
from its control socket (the JSON `natfailctl status --json` and `natfailctl
events --json` print), never from its log.

A switch record (see natfail.core.records) is a dict with service, from, to,
reason, time, unix_time, swap_ms and cleanup_ms. The daemon writes it after the
swap and the conntrack cleanup; :func:`decided_at` is when the swap began, which
is when the daemon's probes saw the backend fail (decision and transaction
follow each other in one step)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from natfail.cli import client, daemon_cmds
from natfail.cli.common import Refused, Unreachable, UsageError
from natfail.core.records import KEPT
from natfail.lab.processes import LabError, NsLike, wait_until

if TYPE_CHECKING:
    from natfail.lab.lab import Lab

REPO: Final = Path(__file__).resolve().parents[2]
# `python -m natfail` from this source tree, whatever the working directory
DAEMON_ENV: Final[dict[str, str]] = {"PYTHONPATH": str(REPO)}
STOP_TIMEOUT: Final = 10.0

Record = dict[str, Any]


def decided_at(record: Record) -> float:
    """Unix time at which the swap of a switch record began."""
    spent = float(record["swap_ms"]) + float(record["cleanup_ms"])
    return float(record["unix_time"]) - spent / 1000


class DaemonRunner:
    """One daemon with one config in a namespace of a lab (the gateway's unless told),
    its output appended to ``log``; the lab kills it on close if nobody stopped it.

    ``prefix`` goes before the daemon's argv (setpriv, a wrapper); ``env`` adds to
    its environment. ``config`` may be replaced before :meth:`start`."""

    def __init__(
        self,
        lab: Lab,
        config: Path,
        *,
        log: Path | None = None,
        ns: NsLike | None = None,
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.lab = lab
        self.config = config
        self.log = log if log is not None else config.with_suffix(".log")
        self.ns: NsLike = ns if ns is not None else lab.gateway
        self.prefix = list(prefix)
        self.env = {**DAEMON_ENV, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self._socket: Path | None = None

    # -- the process -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Starts the daemon; it is not ready yet (see :meth:`wait_ready`)."""
        if self.running:
            raise RuntimeError(f"the daemon with {self.config} already runs")
        self._socket = None
        with open(self.log, "a") as out:
            self.proc = self.lab.popen(
                self.ns,
                [*self.prefix, sys.executable, "-m", "natfail", "-c", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
            )

    def stop(
        self, sig: signal.Signals = signal.SIGTERM, timeout: float = STOP_TIMEOUT
    ) -> int | None:
        """Sends ``sig`` and waits for the exit; returns the exit status (None: never
        started). A daemon still running after ``timeout`` is killed, and that is a
        LabError. ``proc`` stays, for its exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
                raise LabError(f"the daemon did not exit {timeout:g} s after {sig.name}") from None
        return proc.returncode

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # -- asking it -------------------------------------------------------------------------

    @property
    def socket(self) -> Path:
        """The control socket, found in the config the way natfailctl finds it."""
        if self._socket is None:
            args = argparse.Namespace(socket=None, config=self.config)
            try:
                self._socket = daemon_cmds.socket_path(args)
            except UsageError as exc:
                raise LabError(f"{self.config}: {exc}") from None
        return self._socket

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request on the control socket; its reply, or a LabError with the reason."""
        try:
            return client.call(self.socket, request)
        except (Refused, Unreachable, UsageError) as exc:
            raise LabError(f"{request.get('command')}: {exc}") from None

    def ctl(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """``natfailctl -c CONFIG ARGV...``, for what the command line itself must show."""
        return subprocess.run(
            [sys.executable, "-m", "natfail.cli.ctl", "-c", str(self.config), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, **DAEMON_ENV},
        )

    def status(self) -> dict[str, Any]:
        """What `natfailctl status --json` prints: ``{"services": [...]}``."""
        return {"services": self.call({"command": "status"}).get("services", [])}

    def service(self, name: str | None = None) -> dict[str, Any]:
        """One service of :meth:`status` (the first when ``name`` is None)."""
        services: list[dict[str, Any]] = self.status()["services"]
        for s in services:
            if name is None or s.get("name") == name:
                return s
        raise LabError(f"the daemon has no service {name or ''}".rstrip())

    def active(self, service: str | None = None) -> str | None:
        """The service's active backend; None when there is none or the daemon does not
        answer."""
        try:
            active = self.service(service).get("active")
        except LabError:
            return None
        return active if isinstance(active, str) else None

    def backend_state(self, backend: str, service: str | None = None) -> str | None:
        """up, down, drained ... as status shows it; None for a backend it does not list."""
        for b in self.service(service).get("backends", []):
            if b.get("name") == backend:
                return str(b.get("state"))
        return None

    def events(self, count: int = KEPT) -> list[Record]:
        """The daemon's last ``count`` switch records, oldest first."""
        events: list[Record] = self.call({"command": "events", "count": count}).get("events", [])
        return events

    def switches(
        self,
        *,
        service: str | None = None,
        previous: str | None = None,
        active: str | None = None,
        after: float | None = None,
    ) -> list[Record]:
        """The switch records that match every filter given (None: any; ``after``: Unix
        time)."""
        return [
            e
            for e in self.events()
            if (service is None or e["service"] == service)
            and (previous is None or e["from"] == previous)
            and (active is None or e["to"] == active)
            and (after is None or float(e["unix_time"]) >= after)
        ]

    # -- waiting for it --------------------------------------------------------------------

    def reachable(self) -> bool:
        try:
            self.status()
        except LabError:
            return False
        return True

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Waits until the daemon answers on its socket; False if it exits or is too slow."""
        wait_until(lambda: not self.running or self.reachable(), timeout, 0.05)
        return self.running and self.reachable()

    def wait_active(self, name: str, timeout: float = 15.0, *, service: str | None = None) -> bool:
        return wait_until(lambda: self.active(service) == name, timeout, 0.05)

    def wait_switch(
        self,
        previous: str | None,
        active: str,
        *,
        after: float,
        timeout: float = 10.0,
        service: str | None = None,
    ) -> Record | None:
        """The first record of a switch from ``previous`` to ``active`` at or after
        ``after``, waiting up to ``timeout`` seconds for it."""
        found: list[Record] = []

        def seen() -> bool:
            found[:] = self.switches(service=service, previous=previous, active=active, after=after)
            return bool(found)

        wait_until(seen, timeout, 0.05)
        return found[0] if found else None

    def wait_backend_state(
        self, backend: str, state: str, *, timeout: float = 15.0, service: str | None = None
    ) -> float | None:
        """Unix time at which status first showed ``backend`` in ``state``, None if it did
        not within ``timeout`` seconds (the resolution is the 50 ms of polling)."""

        def shown() -> bool:
            try:
                return self.backend_state(backend, service) == state
            except LabError:
                return False

        return time.time() if wait_until(shown, timeout, 0.05) else None
