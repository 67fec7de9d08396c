"""`natfail agent` on a lab's backends, as an operator runs it on a backend
host (``natfail agent -c agent.toml``), listening on the backend's own
address and obeying the lab's probe key."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from natfail.lab.processes import LabError, wait_until
from natfail.lab.runner import DAEMON_ENV

if TYPE_CHECKING:
    from natfail.lab.lab import Lab
    from natfail.lab.topology import LabBackend

AGENT_PORT: Final = 51821


def agent_address(backend: LabBackend) -> str:
    return f"{backend.v4}:{AGENT_PORT}"


class LabAgents:
    """One agent per backend of ``lab``, started and stopped one by one."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.procs: dict[str, subprocess.Popen[str]] = {}

    def gateway_keys(self) -> list[str]:
        """The probe public keys the agents obey: the lab's one gateway's."""
        return [self.lab.probe_key.public_b64]

    def log(self, backend: LabBackend) -> str:
        path = self.lab.dir / f"agent-{backend.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(
        self, backend: LabBackend, timeout: float = 10.0, *, prefix: Sequence[str] = ()
    ) -> None:
        """Starts the backend's agent and waits until it listens; LabError if not.
        ``prefix`` goes before its argv (``faketime``, say)."""
        config = self.lab.dir / f"agent-{backend.name}.toml"
        keys = ", ".join(f'"{k}"' for k in self.gateway_keys())
        config.write_text(
            f'listen = "{agent_address(backend)}"\n'
            f"gateways = [{keys}]\n"
            f'interfaces = ["{backend.wg_if}"]\n'
        )
        with open(self.lab.dir / f"agent-{backend.name}.log", "a") as out:
            proc = self.lab.popen(
                backend.ns,
                [*prefix, sys.executable, "-m", "natfail", "agent", "-c", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=DAEMON_ENV,
            )
        self.procs[backend.name] = proc
        if (
            not wait_until(
                lambda: "listening" in self.log(backend) or proc.poll() is not None, timeout
            )
            or proc.poll() is not None
        ):
            raise LabError(
                f"the agent of backend {backend.name} did not start: {self.log(backend)}"
            )

    def start_all(self) -> None:
        for backend in self.lab.backends:
            self.start(backend)

    def stop(self, backend: LabBackend) -> None:
        proc = self.procs.pop(backend.name, None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop_all(self) -> None:
        for backend in self.lab.backends:
            self.stop(backend)
