"""The daemon as an operator runs it, for the namespace tests: `natfail -c FILE`
in the lab's gateway namespace (natfail.lab's runner), driven with `natfailctl`."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from natfail.lab import DAEMON_ENV, DaemonRunner, Lab, LabAgents, probe_table

ENV = DAEMON_ENV
INTERVAL, TIMEOUT, RISE, FALL = 0.3, 0.2, 1, 2
KINDS = ("nftables", "iptables")


class Gateway:
    """The daemon process and natfailctl, for one test."""

    def __init__(
        self,
        lab: Lab,
        firewall: str,
        *,
        prefix: Sequence[str] = (),
        extra_service: str = "",
        env: dict[str, str] | None = None,
        agents: bool = False,
    ) -> None:
        """``prefix`` goes before the daemon's argv (setpriv, a wrapper: how
        it is run); ``extra_service`` adds to the service's table; ``env``
        adds to the daemon's environment; ``agents``: every backend's
        ``agent`` is set (the test runs them)."""
        self.lab = lab
        self.firewall = firewall
        extra = probe_table(INTERVAL, TIMEOUT, RISE, FALL)
        if extra_service:
            extra = extra_service + "\n" + extra
        config = lab.write_config(firewall=firewall, extra_service=extra, agents=agents)
        log = lab.dir / f"daemon-{firewall}.log"
        self.daemon = DaemonRunner(lab, config, log=log, prefix=prefix, env=env)

    @property
    def config(self) -> Path:
        return self.daemon.config

    @config.setter
    def config(self, path: Path) -> None:
        self.daemon.config = path

    @property
    def log(self) -> Path:
        return self.daemon.log

    @property
    def proc(self) -> subprocess.Popen[str] | None:
        """The daemon's process while it runs."""
        return self.daemon.proc if self.daemon.running else None

    def start(self) -> None:
        self.daemon.start()
        assert self.daemon.wait_ready(10), self.logs()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.daemon.stop(sig)

    def logs(self) -> str:
        return self.daemon.logs()

    def ctl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.daemon.ctl(*argv)

    def status(self) -> dict[str, Any]:
        """The service's part of the status."""
        return self.daemon.service()

    def switches(self, previous: str | None = None, active: str | None = None) -> list[Any]:
        """The daemon's switch records (`natfailctl events --json`), oldest first;
        only those from ``previous`` to ``active`` when given."""
        return self.daemon.switches(previous=previous, active=active)

    def backend_state(self, name: str) -> str:
        return str(self.daemon.backend_state(name))

    def wait_active(self, name: str, timeout: float = 10.0) -> bool:
        return self.daemon.wait_active(name, timeout)

    def conntrack(self) -> str:
        return self.lab.exec(self.lab.gateway, ["conntrack", "-L", "-p", "udp"], check=False).stdout

    def remove_rules(self) -> None:
        gw = self.lab.gateway
        self.lab.exec(gw, ["nft", "delete", "table", "inet", "natfail"], check=False)
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            for table, hook, chain in (
                ("nat", "PREROUTING", "NATFAIL-PRE"),
                ("nat", "POSTROUTING", "NATFAIL-POST"),
                # The fence: left behind, it would drop, under the next test's
                # nftables daemon, what the backends it names start (a new
                # active backend's first initiation, then retried after 5 s).
                ("filter", "FORWARD", "NATFAIL-FENCE"),
            ):
                self.lab.exec(gw, [tool, "-t", table, "-D", hook, "-j", chain], check=False)
                self.lab.exec(gw, [tool, "-t", table, "-F", chain], check=False)
                self.lab.exec(gw, [tool, "-t", table, "-X", chain], check=False)


@contextlib.contextmanager
def running(lab: Lab, firewall: str) -> Iterator[Gateway]:
    """A daemon started with no rules and no state, active on a; after the test it
    is stopped, its log must hold no traceback, and its rules are removed."""
    gateway = Gateway(lab, firewall)
    gateway.remove_rules()
    (lab.dir / "state" / "state.json").unlink(missing_ok=True)
    gateway.start()
    assert gateway.wait_active("a"), gateway.logs()
    try:
        yield gateway
    finally:
        gateway.stop()
    assert "Traceback" not in gateway.logs(), gateway.logs()
    gateway.remove_rules()


@contextlib.contextmanager
def running_with_agents(lab: Lab, firewall: str) -> Iterator[tuple[Gateway, LabAgents]]:
    """:func:`running` with `natfail agent` on every backend and each backend's
    ``agent`` set, no state and no saved clients; the agents' logs must hold
    no traceback either."""
    agents = LabAgents(lab)
    agents.start_all()
    gateway = Gateway(lab, firewall, agents=True)
    gateway.remove_rules()
    for name in ("state.json", "clients.json"):
        (lab.dir / "state" / name).unlink(missing_ok=True)
    try:
        gateway.start()
        assert gateway.wait_active("a"), gateway.logs()
        yield gateway, agents
    finally:
        gateway.stop()
        agents.stop_all()
        gateway.remove_rules()
    assert "Traceback" not in gateway.logs(), gateway.logs()
    for backend in lab.backends:
        assert "Traceback" not in agents.log(backend), agents.log(backend)
