"""The daemon as an operator runs it, for the namespace tests: `natfail -c FILE`
in the lab's gateway namespace, driven with `natfailctl`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from natfail.lab import Lab, wait_until

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(REPO)}
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
    ) -> None:
        """``prefix`` goes before the daemon's argv (setpriv, a wrapper: how
        it is run); ``extra_service`` adds to the service's table; ``env``
        adds to the daemon's environment."""
        self.lab = lab
        self.firewall = firewall
        self.prefix = list(prefix)
        self.env = {**ENV, **(env or {})}
        extra = (
            f"[service.probe]\ninterval = {INTERVAL}\ntimeout = {TIMEOUT}\n"
            f"rise = {RISE}\nfall = {FALL}"
        )
        if extra_service:
            extra = extra_service + "\n" + extra
        self.config = lab.write_config(firewall=firewall, extra_service=extra)
        self.log = lab.dir / f"daemon-{firewall}.log"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        out = open(self.log, "a")  # noqa: SIM115 - the daemon keeps it while it runs
        self.proc = self.lab.popen(
            self.lab.gateway,
            [*self.prefix, sys.executable, "-m", "natfail", "-c", str(self.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        out.close()
        assert wait_until(lambda: self.ctl("status").returncode == 0, 10), self.logs()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def ctl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "natfail.cli.ctl", "-c", str(self.config), *argv],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, **ENV},
        )

    def status(self) -> dict[str, Any]:
        proc = self.ctl("status", "--json")
        assert proc.returncode == 0, proc.stderr
        service: dict[str, Any] = json.loads(proc.stdout)["services"][0]
        return service

    def switches(self, previous: str | None = None, active: str | None = None) -> list[Any]:
        """The daemon's switch records (`natfailctl events --json`), oldest first;
        only those from ``previous`` to ``active`` when given."""
        proc = self.ctl("events", "--json", "-n", "1000")
        assert proc.returncode == 0, proc.stderr
        events: list[Any] = json.loads(proc.stdout)["events"]
        return [
            e
            for e in events
            if (previous is None or e["from"] == previous) and (active is None or e["to"] == active)
        ]

    def backend_state(self, name: str) -> str:
        return str(next(b for b in self.status()["backends"] if b["name"] == name)["state"])

    def wait_active(self, name: str, timeout: float = 10.0) -> bool:
        return wait_until(lambda: self.status()["active"] == name, timeout, 0.05)

    def conntrack(self) -> str:
        return self.lab.exec(self.lab.gateway, ["conntrack", "-L", "-p", "udp"], check=False).stdout

    def remove_rules(self) -> None:
        gw = self.lab.gateway
        self.lab.exec(gw, ["nft", "delete", "table", "inet", "natfail"], check=False)
        for tool in ("iptables-legacy", "ip6tables-legacy"):
            for hook, chain in (("PREROUTING", "NATFAIL-PRE"), ("POSTROUTING", "NATFAIL-POST")):
                self.lab.exec(gw, [tool, "-t", "nat", "-D", hook, "-j", chain], check=False)
                self.lab.exec(gw, [tool, "-t", "nat", "-F", chain], check=False)
                self.lab.exec(gw, [tool, "-t", "nat", "-X", chain], check=False)


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
