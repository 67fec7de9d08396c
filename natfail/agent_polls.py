"""The gateway's side of the agents: polls for their reports and activations
on a switch, carried out for the controllers (which decide what to send).

Every backend with an ``agent`` is polled in one sweep every
:func:`poll_interval` seconds (their answers fed to the controllers in one
batch, under the daemon's lock); a switch to such a backend sends its agent
the service's recent clients at once, in a task of its own so that a slow
or dead agent never holds the daemon up. An agent that does not answer
costs only its clients' recovery speed, never the failover."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

from natfail import jsonlimit
from natfail.core import agents as ag
from natfail.core import controller as ctl
from natfail.core.tai64n import next_timestamp
from natfail.io.agent_link import AgentLink
from natfail.io.statefile import read_or_none, write_atomic

if TYPE_CHECKING:
    from natfail.daemon import Daemon, ServiceRuntime

log = logging.getLogger("natfail")

CLIENTS_FILE: Final = "clients.json"
POLL_INTERVAL: Final = 2.0
"""Seconds between polls of one agent, at most :data:`POLLS_PER_SECOND`
agents a second (an exchange costs the gateway about 0.3 ms of CPU): a client
that connected less than this long before a switch is not brought over and
waits for WireGuard's own timers."""
POLLS_PER_SECOND: Final = 200
PARALLEL: Final = 64
SAVE_EVERY: Final = 10.0
"""Seconds between writes of the clients file, when they changed."""


def poll_interval(agents: int, pair_interval: float | None = None) -> float:
    """Seconds between sweeps; in a pair at most half ``pair_interval`` (the
    shortest probe interval): a follower learns of an activation within one,
    the decider's record and the poll's round trip included."""
    base = POLL_INTERVAL if pair_interval is None else min(POLL_INTERVAL, pair_interval / 2)
    return max(base, agents / POLLS_PER_SECOND)


@dataclass(frozen=True)
class Activation:
    """How an activation went, for status and metrics."""

    epoch: int
    at: float
    """Unix time it was sent."""
    clients: int
    initiated: int
    answered: bool
    elapsed: float
    """Seconds from sending to the agent's last answer."""


class _Stamps:
    """Never-decreasing TAI64N stamps for one gateway key: the agent takes a
    request only if its stamp is newer than the last it took from that key."""

    def __init__(self) -> None:
        self._last: bytes | None = None

    def __call__(self) -> bytes:
        self._last = next_timestamp(time.time_ns(), self._last)
        return self._last


class AgentPolls:
    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon
        self._links: dict[bytes, AgentLink] = {}
        self._task: asyncio.Task[None] | None = None
        self._activations: set[asyncio.Task[None]] = set()
        self._dirty = False
        self._saved_at = 0.0
        self._poke = asyncio.Event()
        self.last: dict[tuple[str, str], Activation] = {}
        self.path = daemon.config.daemon.state_dir / CLIENTS_FILE

    def _link(self, rt: ServiceRuntime) -> AgentLink:
        key = rt.keys.private_key
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = AgentLink(key, _Stamps())
        return link

    # -- the clients file -----------------------------------------------------------

    def load(self) -> dict[str, Any]:
        """The clients saved by a previous run, by service (see :func:`ag.load_clients`)."""
        try:
            raw = read_or_none(self.path)
            data = jsonlimit.loads(raw) if raw else {}
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("ignoring unreadable clients file %s: %s", self.path, exc)
            return {}
        services = data.get("services") if isinstance(data, dict) else None
        return services if isinstance(services, dict) else {}

    def changed(self) -> None:
        self._dirty = True

    def save(self, force: bool = False) -> None:
        now = self._d.monotonic()
        if not self._dirty or (not force and now - self._saved_at < SAVE_EVERY):
            return
        wall = time.time()
        services = {
            name: dumped
            for name, rt in self._d.services.items()
            if (dumped := ag.dump_clients(rt.state.agents, now, wall))
        }
        try:
            write_atomic(self.path, json.dumps({"version": 1, "services": services}).encode())
        except OSError as exc:
            log.error("cannot write %s: %s", self.path, exc.strerror or exc)
            return
        self._dirty, self._saved_at = False, now

    # -- polls ------------------------------------------------------------------------

    def start(self) -> None:
        if any(rt.state.agents for rt in self._d.services.values()):
            self._task = asyncio.create_task(self._loop())

    def poke(self) -> None:
        """Sweep now (a change of role wants to know what the agents recorded)."""
        self._poke.set()

    def ensure_started(self) -> None:
        """After a reload that may have added the first agent."""
        if self._task is None or self._task.done():
            self.start()

    async def stop(self) -> None:
        tasks = [*self._activations, *([self._task] if self._task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self._links.values():
            link.close()
        self.save(force=True)

    async def _loop(self) -> None:
        while True:
            started = self._d.monotonic()
            try:
                count = await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("polling the agents failed")
                count = 0
            if count == 0:
                self._task = None
                return  # a reload that adds an agent starts the polls again
            elapsed = self._d.monotonic() - started
            pair = None
            if self._d.config.daemon.pair:
                pair = min(s.probe.interval for s in self._d.config.services)
            wait = max(0.1, poll_interval(count, pair) - elapsed)
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), wait)

    async def sweep(self) -> int:
        """Polls every agent once and feeds the answers in; how many were polled."""
        jobs: list[tuple[str, str, ServiceRuntime]] = [
            (name, backend, rt)
            for name, rt in self._d.services.items()
            for backend in rt.state.agents
        ]
        gate = asyncio.Semaphore(PARALLEL)

        async def poll(name: str, backend: str, rt: ServiceRuntime) -> ag.Polled:
            view = rt.state.agents[backend]
            target = rt.service.backend(backend)
            reports = None
            if target is not None and target.agent is not None:
                async with gate:
                    reports = await self._link(rt).poll(
                        target.agent, rt.service.server_public_key, view.version
                    )
            return ag.Polled(reports, self._d.monotonic(), time.time())

        agents = {b.agent for _, b_name, rt in jobs if (b := rt.service.backend(b_name))}
        for link in self._links.values():
            link.retain(a for a in agents if a is not None)
        results = await asyncio.gather(*(poll(*job) for job in jobs))
        async with self._d.lock:
            by_service: dict[str, ctl.Outcome] = {}
            for (name, backend, _), polled in zip(jobs, results, strict=True):
                rt = self._d.services.get(name)
                if rt is None:
                    continue
                before = by_service.get(name)
                state = before.state if before is not None else rt.state
                outcome = ctl.agent_polled(state, backend, polled)
                effects = (*before.effects, *outcome.effects) if before else outcome.effects
                by_service[name] = ctl.Outcome(outcome.state, effects)
                view = outcome.state.agents.get(backend)
                if self._d.metrics and view is not None:
                    self._d.metrics.agent(name, backend, view.reachable, view.recent(polled.at))
            outcomes: list[tuple[ServiceRuntime, ctl.Outcome]] = []
            now = self._d.monotonic()
            for name, folded in by_service.items():
                rt = self._d.services.get(name)
                if rt is None:
                    continue
                settled = ctl.agents_polled(folded.state, now)
                merged = replace(settled, effects=(*folded.effects, *settled.effects))
                outcomes.append((rt, merged))
            await self._d.executor.carry_out(outcomes)
        self.save()
        return len(jobs)

    # -- activations ------------------------------------------------------------------

    def activate(self, effect: ctl.Activate) -> None:
        """Sends the activation in a task of its own; returns at once."""
        rt = self._d.services.get(effect.service)
        if rt is None:
            return
        task = asyncio.create_task(self._activate(self._link(rt), effect))
        self._activations.add(task)
        task.add_done_callback(self._activations.discard)

    async def _activate(self, link: AgentLink, effect: ctl.Activate) -> None:
        epoch = effect.epoch
        sent, started = time.time(), self._d.monotonic()
        replies = await link.activate(effect.agent, effect.server_public_key, epoch, effect.targets)
        elapsed = self._d.monotonic() - started
        answered = all(r is not None for r in replies)
        initiated = sum(r.initiated for r in replies if r is not None)
        done = Activation(epoch, sent, len(effect.targets), initiated, answered, elapsed)
        self.last[(effect.service, effect.backend)] = done
        if self._d.metrics:
            self._d.metrics.activated(effect.service, effect.backend, answered, initiated, elapsed)
        if answered:
            log.info(
                "activate service=%s backend=%s epoch=%d clients=%d initiated=%d ms=%.1f",
                effect.service,
                effect.backend,
                epoch,
                len(effect.targets),
                initiated,
                elapsed * 1000,
            )
        else:
            log.warning(
                "%s: the agent of %s at %s did not answer the activation of %d clients; "
                "they come back on WireGuard's own timers (about 15 s)",
                effect.service,
                effect.backend,
                effect.agent,
                len(effect.targets),
            )
