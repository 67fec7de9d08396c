"""Carrying out the controllers' outcomes, in the order the design fixes.

For a batch of outcomes (of different services): the effects that come
first; then one firewall transaction for every move among them; only if it
succeeded, each move's ``after`` effects (the conntrack cleanup of the old
backend, the switch record, the hook) and its new state; if it failed, each
one's ``failed`` effects and the last good state. The state file is written
once for the batch. Nothing here chooses anything."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from natfail import config as cfg
from natfail.core import controller as ctl
from natfail.core.records import SwitchRecord
from natfail.io import loop_errors
from natfail.io.hooks import SwitchEvent

if TYPE_CHECKING:
    from natfail.daemon import Daemon, ServiceRuntime

log = logging.getLogger("natfail")


@dataclass(frozen=True)
class Transacted:
    error: str | None
    """Why the transaction failed; None when it went in."""
    swap: float
    """Seconds the transaction took."""
    unstrand: float
    """Seconds the removal of the flows it stranded took after it."""


class Executor:
    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon
        self._local_errors = loop_errors.RepeatLog(log, clock=daemon.monotonic)

    async def transaction(self, actives: dict[str, str | None]) -> str | None:
        """One transaction to the rules of ``actives``, then the flows it
        strands; None on success, else why not (and a check follows)."""
        return (await self.transact(self._d.config.services, actives)).error

    async def transact(
        self, services: tuple[cfg.Service, ...], actives: dict[str, str | None]
    ) -> Transacted:
        """The transaction for ``services`` with ``actives``; only if it
        succeeded, the removal of the flows it stranded."""
        firewall = self._d.firewall
        before = firewall.installed
        desired = firewall.build(services, actives)
        started = self._d.monotonic()
        error = await firewall.apply(desired)
        swapped = self._d.monotonic()
        if error is not None:
            # The firewall may have changed under us: look at it next tick.
            self._d.request_check()
            return Transacted(error, swapped - started, 0.0)
        await firewall.unstrand(desired, before)
        return Transacted(None, swapped - started, self._d.monotonic() - swapped)

    async def carry_out(
        self, outcomes: list[tuple[ServiceRuntime, ctl.Outcome]]
    ) -> tuple[bool, str | None]:
        """Carry out outcomes of different services together, their moves in one
        transaction. Returns whether that transaction succeeded (True with none)
        and why the state file could not be written (None when it was)."""
        save = False
        moving: list[tuple[ServiceRuntime, ctl.Outcome]] = []
        ok = True
        try:
            for rt, outcome in outcomes:
                save |= await self._effects(rt, outcome.effects)
                if outcome.transaction is None:
                    rt.state = outcome.state
                else:
                    moving.append((rt, outcome))
            if moving:
                actives = self._d.actives()
                for rt, outcome in moving:
                    assert outcome.transaction is not None
                    actives[rt.state.name] = outcome.transaction.active
                try:
                    done = await self.transact(self._d.config.services, actives)
                except BaseException:
                    # Not knowing whether it went in: a check reads the truth.
                    self._d.request_check()
                    raise
                ok = done.error is None
                # Every mover takes its state before any of them tells: an
                # effect that fails must not leave the others behind the rules.
                for rt, outcome in moving:
                    assert outcome.kept is not None
                    rt.state = outcome.state if ok else outcome.kept
                for rt, outcome in moving:
                    effects = outcome.after if ok else outcome.failed
                    save |= await self._effects(rt, effects, done)
        finally:
            for rt, outcome in outcomes:
                if outcome.wake_at is not None:
                    self._d.prober.wake(rt.state.name, outcome.wake_at)
            unsaved = self._d.save_state() if save else None
            if moving and ok:
                self._d.tell_status()
        return ok, unsaved

    async def _effects(
        self,
        rt: ServiceRuntime,
        effects: tuple[ctl.Effect, ...],
        done: Transacted | None = None,
    ) -> bool:
        """Runs one service's effects in order; True when the state file must
        be written. One that fails is logged and the rest still run. A switch
        record's cleanup is the stranded flows' removal plus this service's
        own cleanup."""
        save = False
        started = self._d.monotonic()
        for effect in effects:
            try:
                if isinstance(effect, ctl.Log):
                    fields = {"NATFAIL_SERVICE": rt.state.name, "NATFAIL_BACKEND": effect.backend}
                    log.log(effect.level, "%s", effect.message, extra={"journal": fields})
                elif isinstance(effect, ctl.Cleanup):
                    await self._d.firewall.cleanup(effect)
                elif isinstance(effect, ctl.Switched):
                    swap, unstrand = (done.swap, done.unstrand) if done else (0.0, 0.0)
                    self.switched(effect, swap, unstrand + self._d.monotonic() - started)
                elif isinstance(effect, ctl.SaveState):
                    save = True
                elif isinstance(effect, ctl.SaveClients):
                    self._d.agent_polls.changed()
                elif isinstance(effect, ctl.Activate):
                    self._d.agent_polls.activate(effect)
                elif isinstance(effect, ctl.LocalProbeError):
                    self._local_errors.report(
                        f"probes failing on this gateway ({effect.reason}); "
                        "not counted against any backend",
                        f"{effect.service}: probe of {effect.backend} failed on this gateway "
                        f"({effect.reason}); not counted against the backend",
                        level=logging.ERROR,
                    )
            except Exception:
                log.exception("%s: carrying out %s failed", rt.state.name, type(effect).__name__)
        return save

    def switched(self, effect: ctl.Switched, swap: float, cleanup: float) -> None:
        """After a swap and its cleanup: the record, the metrics, the hook."""
        record = SwitchRecord(
            effect.service,
            effect.previous,
            effect.active,
            effect.reason,
            time.time(),
            swap * 1000,
            cleanup * 1000,
        )
        self._d.switches.add(record)
        # A move of traffic is a warning; the first choice after a start is not.
        fields = {
            "NATFAIL_SERVICE": effect.service,
            "NATFAIL_BACKEND": effect.active,
            "NATFAIL_FROM": effect.previous,
            "NATFAIL_REASON": effect.reason,
        }
        level = logging.INFO if effect.previous is None else logging.WARNING
        log.log(level, "%s", record.line(), extra={"journal": fields})
        rt = self._d.services.get(effect.service)
        if rt is None:
            return
        if self._d.metrics:
            names = [b.name for b in rt.service.backends]
            if effect.previous is not None:
                self._d.metrics.switched(effect.service, names, effect.active, effect.reason)
            else:
                self._d.metrics.set_active(effect.service, names, effect.active)
        if rt.service.notify is not None:
            event = SwitchEvent(
                effect.service, effect.previous, effect.active, effect.reason, str(effect.address)
            )
            self._d.hooks.submit(rt.service.notify, event)
