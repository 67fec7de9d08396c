"""Probe rounds: started when :class:`natfail.core.schedule.Schedule` says,
their results fed to the controllers in batches.

One timer for every service (no task per service): when it fires, each due
service gets a round (all its backends probed at once, so backends that come
up together compete). A finished round goes to one queue; the pump takes
whatever has piled up, feeds each round to its service's controller and
carries the outcomes out together, so the moves of many services that fall
due together share one firewall transaction."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from natfail.core import controller as ctl
from natfail.core import health as hl

if TYPE_CHECKING:
    from natfail.daemon import Daemon, ServiceRuntime

log = logging.getLogger("natfail")


@dataclass
class _Done:
    name: str
    round: ctl.Round | None
    """None: no probe, the controller asked to decide again (``wake_at``)."""
    waiter: asyncio.Future[None] | None


class Prober:
    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon
        self._queue: asyncio.Queue[_Done] = asyncio.Queue()
        self._deferred: list[_Done] = []
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._pump: asyncio.Task[None] | None = None
        self._wakes: dict[str, tuple[float, asyncio.TimerHandle]] = {}

    # -- the schedule -------------------------------------------------------------------

    def start(self) -> None:
        now = self._d.monotonic()
        count = len(self._d.services)
        for rt in self._d.services.values():
            self._d.schedule.add(rt.service.name, rt.service.probe.interval, now, among=count)
        self._pump = asyncio.create_task(self._pump_loop())
        self.arm()

    def arm(self) -> None:
        """Set the one timer to the earliest due round."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self._d.schedule.next_due()
        if due is not None:
            delay = max(0.0, due - self._d.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        for name in self._d.schedule.pop_due(self._d.monotonic()):
            # A round still out (the pump was slow) is not doubled: this
            # period's round is skipped, the next one comes on time.
            if name not in self._in_flight and name in self._d.services:
                self._spawn(name, None)
        self.arm()

    def _spawn(self, name: str, waiter: asyncio.Future[None] | None) -> None:
        self._in_flight.add(name)
        task = asyncio.create_task(self._round(name, waiter))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def wake(self, name: str, at: float) -> None:
        """Decide ``name`` again at ``at`` (monotonic), without a probe."""
        old = self._wakes.get(name)
        if old is not None:
            if old[0] == at:
                return  # every round of a pending preempt asks for the same time
            old[1].cancel()
        delay = max(0.0, at - self._d.monotonic())

        def due() -> None:
            self._wakes.pop(name, None)
            self._queue.put_nowait(_Done(name, None, None))

        self._wakes[name] = (at, asyncio.get_running_loop().call_later(delay, due))

    async def round_now(self, name: str) -> None:
        """One round of ``name`` now, returning once its outcome is carried out."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._spawn(name, waiter)
        await waiter

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for _, handle in self._wakes.values():
            handle.cancel()
        for task in [*self._tasks, *([self._pump] if self._pump else [])]:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pump is not None:
            await asyncio.gather(self._pump, return_exceptions=True)

    # -- one round ----------------------------------------------------------------------

    async def _round(self, name: str, waiter: asyncio.Future[None] | None) -> None:
        queued = False
        try:
            rt = self._d.services.get(name)
            if rt is None:
                return
            state, keys = rt.state, rt.keys
            backends = state.service.backends
            timeout = state.service.probe.timeout
            transport = self._d.transport
            results = await asyncio.gather(
                *(transport.probe(keys, b.address, timeout) for b in backends)
            )
            probed = tuple(
                ctl.Probed(
                    b.name,
                    b.address,
                    r.up,
                    r.detail or r.reason if r.local else r.reason,
                    r.rtt if r.up else None,
                    r.local,
                )
                for b, r in zip(backends, results, strict=True)
            )
            done = _Done(name, ctl.Round(probed, state.keys_epoch, self._d.monotonic()), waiter)
            waiter = None
            # Still "in flight" until the pump has handled it: a slow pump
            # skips rounds instead of piling up one per interval.
            queued = True
            self._queue.put_nowait(done)
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad round must not end the service's probing
            log.exception("%s: probe round failed", name)
        finally:
            if not queued:
                self._in_flight.discard(name)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    # -- the pump -----------------------------------------------------------------------

    async def _pump_loop(self) -> None:
        while True:
            batch = self._deferred or [await self._queue.get()]
            self._deferred = []
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                async with self._d.lock:
                    await self._process(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("carrying out probe results failed")
            for done in batch:
                if done.round is not None:
                    self._in_flight.discard(done.name)
                if done.waiter is not None and not done.waiter.done():
                    done.waiter.set_result(None)

    async def _process(self, batch: list[_Done]) -> None:
        outcomes: list[tuple[ServiceRuntime, ctl.Outcome]] = []
        seen: set[str] = set()
        for i, done in enumerate(batch):
            rt = self._d.services.get(done.name)
            if rt is None:
                continue
            if done.name in seen:
                # A second round of the same service waits for the first's
                # outcome: it is decided from the state that one leaves.
                self._deferred = batch[i:]
                del batch[i:]
                break
            seen.add(done.name)
            if done.round is None:
                outcome = ctl.decide(rt.state, self._d.monotonic())
            else:
                outcome = ctl.observe_round(rt.state, done.round)
                self._count(rt, done.round, outcome.state)
            outcomes.append((rt, outcome))
        await self._d.executor.carry_out(outcomes)

    def _count(self, rt: ServiceRuntime, probe_round: ctl.Round, state: ctl.ServiceState) -> None:
        metrics = self._d.metrics
        if metrics is None:
            return
        for result in probe_round.results:
            backend = state.service.backend(result.backend)
            if (
                result.local
                or backend is None
                or backend.address != result.address
                or probe_round.keys_epoch != state.keys_epoch
            ):
                continue
            metrics.probe(state.name, result.backend, result.up, result.rtt, result.reason)
            health = state.health[result.backend].state
            if health != hl.HealthState.UNKNOWN:
                metrics.health(state.name, result.backend, health == hl.HealthState.UP)
