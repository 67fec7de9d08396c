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
from typing import TYPE_CHECKING

from natfail.core import controller as ctl
from natfail.core.records import SwitchRecord
from natfail.io import loop_errors
from natfail.io.hooks import SwitchEvent

if TYPE_CHECKING:
    from natfail.daemon import Daemon, ServiceRuntime

log = logging.getLogger("natfail")


class Executor:
    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon
        self._local_errors = loop_errors.RepeatLog(log, clock=daemon.monotonic)

    async def transaction(self, actives: dict[str, str | None]) -> str | None:
        """One transaction to the rules of ``actives``, then the flows it
        strands; None on success, else why not (and a check follows)."""
        error, _ = await self._transaction(actives)
        return error

    async def _transaction(self, actives: dict[str, str | None]) -> tuple[str | None, float]:
        """(why it failed or None, when the transaction itself was done)."""
        firewall = self._d.firewall
        before = firewall.installed
        desired = firewall.build(self._d.config.services, actives)
        error = await firewall.apply(desired)
        done = self._d.monotonic()
        if error is not None:
            # The firewall may have changed under us: look at it next tick.
            self._d.request_check()
        else:
            await firewall.unstrand(desired, before)
        return error, done

    async def carry_out(
        self, outcomes: list[tuple[ServiceRuntime, ctl.Outcome]]
    ) -> tuple[bool, str | None]:
        """Carry out outcomes of different services together, their moves in one
        transaction. Returns whether that transaction succeeded (True with none)
        and why the state file could not be written (None when it was)."""
        save = False
        moving: list[tuple[ServiceRuntime, ctl.Outcome]] = []
        for rt, outcome in outcomes:
            save |= await self._effects(outcome.effects, 0.0, self._d.monotonic())
            if outcome.transaction is None:
                rt.state = outcome.state
            else:
                moving.append((rt, outcome))
        ok = True
        if moving:
            actives = self._d.actives()
            for rt, outcome in moving:
                assert outcome.transaction is not None
                actives[rt.state.name] = outcome.transaction.active
            started = self._d.monotonic()
            error, swapped = await self._transaction(actives)
            ok = error is None
            for rt, outcome in moving:
                assert outcome.kept is not None
                rt.state = outcome.state if ok else outcome.kept
                effects = outcome.after if ok else outcome.failed
                save |= await self._effects(effects, swapped - started, swapped)
        for rt, outcome in outcomes:
            if outcome.wake_at is not None:
                self._d.prober.wake(rt.state.name, outcome.wake_at)
        unsaved = self._d.save_state() if save else None
        if moving and ok:
            self._d.tell_status()
        return ok, unsaved

    async def _effects(self, effects: tuple[ctl.Effect, ...], swap: float, swapped: float) -> bool:
        """Runs effects in order; True when the state file must be written.
        A switch record counts its cleanup from ``swapped`` on (the flows the
        swap stranded, then the old backend's)."""
        save = False
        started = swapped
        for effect in effects:
            if isinstance(effect, ctl.Log):
                log.log(effect.level, "%s", effect.message)
            elif isinstance(effect, ctl.Cleanup):
                await self._d.firewall.cleanup(effect)
            elif isinstance(effect, ctl.Switched):
                self.switched(effect, swap, self._d.monotonic() - started)
            elif isinstance(effect, ctl.SaveState):
                save = True
            elif isinstance(effect, ctl.LocalProbeError):
                self._local_errors.report(
                    f"probes failing on this gateway ({effect.reason}); "
                    "not counted against any backend",
                    f"{effect.service}: probe of {effect.backend} failed on this gateway "
                    f"({effect.reason}); not counted against the backend",
                    level=logging.ERROR,
                )
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
        log.warning("%s", record.line())
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
