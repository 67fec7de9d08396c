"""In-memory fakes of the edges, one beside each Protocol the daemon uses:
the dataplane, conntrack, the probe transport, sd_notify and the notify hook.
The daemon's unit tests run against them; the namespace tests run the real
parts. They share one call log (``calls``), so a test can check the order of
a transaction, its cleanup and the hook."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from natfail.core import noise, ruleset
from natfail.core.model import Endpoint
from natfail.io.conntrack import CleanupResult, PublicFlows
from natfail.io.dataplane import DataplaneError
from natfail.io.hooks import SwitchEvent
from natfail.io.probe_transport import ProbeResult

Call = tuple[Any, ...]


class FakeDataplane:
    """Holds one installed Ruleset; `fail_next` refuses that many applies."""

    name = "fake"
    inline = False  # as the iptables dataplane: the worker thread is exercised

    def __init__(self, calls: list[Call], installed: ruleset.Ruleset | None = None) -> None:
        self.calls = calls
        self.installed = installed if installed is not None else ruleset.Ruleset()
        self.is_intact = installed is not None
        self.applied: list[ruleset.Ruleset] = []
        self.fail_next = 0
        self.reads = 0

    def apply(self, desired: ruleset.Ruleset) -> None:
        if self.fail_next:
            self.fail_next -= 1
            self.calls.append(("apply-failed", desired.active()))
            raise DataplaneError("nft: transaction refused (fake)")
        self.calls.append(("apply", desired.active()))
        self.applied.append(desired)
        self.installed = desired
        self.is_intact = True

    def read(self) -> ruleset.Ruleset:
        self.reads += 1
        return self.installed

    def intact(self) -> bool:
        self.reads += 1
        return self.is_intact

    def inspect(self) -> tuple[ruleset.Ruleset, bool]:
        self.reads += 1
        return self.installed, self.is_intact

    def remove_all(self) -> None:
        self.flush()

    def flush(self) -> None:
        """Someone ran `nft flush ruleset`: drift."""
        self.installed = ruleset.Ruleset()
        self.is_intact = False


class FakeConntrack:
    """Records cleanups in the shared call log; un-NATed flow removals (after
    every DNAT install) in `unnated`, with how many applies preceded each."""

    def __init__(self, calls: list[Call]) -> None:
        self.calls = calls
        self.removed: list[tuple[int, str]] = []
        self.unnated: list[tuple[str, int]] = []
        self.flows: dict[str, dict[Endpoint, int]] = {}
        self.looks = 0
        """Calls of public_flows (one per public address group)."""

    async def remove_unnated(self, public: Endpoint) -> int:
        applies = sum(1 for c in self.calls if c[0] == "apply")
        self.unnated.append((str(public), applies))
        return 1

    async def public_flows(self, publics: Iterable[Endpoint]) -> dict[Endpoint, PublicFlows]:
        self.looks += 1
        out = {}
        for public in publics:
            by_source = self.flows.get(str(public), {})
            unnated = by_source.get(public, 0)
            out[public] = PublicFlows(sum(by_source.values()), unnated, dict(by_source))
        return out

    async def remove_backend(self, mark: int, address: Endpoint) -> CleanupResult:
        self.calls.append(("cleanup", mark, str(address)))
        self.removed.append((mark, str(address)))
        return CleanupResult(1, 0, 0, 3)


class FakeTransport:
    """Scripted probes: `up[address]` says whether that backend answers."""

    def __init__(self) -> None:
        self.up: dict[str, bool] = {}
        self.probed: list[str] = []
        self.retained: set[str] = set()
        self.closed = False

    def retain(self, targets: Iterable[Endpoint]) -> None:
        self.retained = {str(t) for t in targets}

    def close(self) -> None:
        self.closed = True

    async def probe(self, keys: noise.Keys, target: Endpoint, timeout: float) -> ProbeResult:
        address = str(target)
        self.probed.append(address)
        if self.up.get(address, False):
            return ProbeResult(True, "ok", 0.0015)
        return ProbeResult(False, "timeout")


class FakeNotifier:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def notify(self, *lines: str) -> None:
        self.lines.extend(lines)

    @property
    def watchdog_interval(self) -> float | None:
        return None


class FakeHooks:
    def __init__(self) -> None:
        self.events: list[tuple[Path, SwitchEvent]] = []
        self.closed = False

    def submit(self, executable: Path, event: SwitchEvent) -> None:
        self.events.append((executable, event))

    async def close(self) -> None:
        self.closed = True
