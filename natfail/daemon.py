"""The daemon: the executor of the core's decisions.

The pure core decides (:mod:`natfail.core.controller` for a service,
:mod:`natfail.core.reload` for a reload, :mod:`natfail.core.schedule` for
when probes are due); this module probes when the schedule says, feeds the
results in, and carries the outcomes out through the edges in
:mod:`natfail.io`, in the order the design fixes: one firewall transaction
(one for every move that falls due together); only if it succeeded, the
conntrack cleanup of the old backend; then the switch record (its log line,
`natfailctl events`), the metrics and the notify hook. A failed transaction
keeps the last good state, and the firewall is checked again at once.

All state changes go through one lock: the pump (probe results, in
batches), operator commands, reloads and repairs take turns."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from natfail import config as cfg
from natfail import exitcodes
from natfail.agent_polls import AgentPolls
from natfail.core import agents as ag
from natfail.core import controller as ctl
from natfail.core import health as hl
from natfail.core import noise, ruleset, saved, status
from natfail.core import selector as sel
from natfail.core.records import SwitchLog
from natfail.core.schedule import Schedule
from natfail.executor import Executor
from natfail.firewall import Firewall
from natfail.foreign import ForeignCheck
from natfail.io import loop_errors
from natfail.io.addresses import Addresses, AddressWatch
from natfail.io.conntrack_worker import AsyncConntrack
from natfail.io.control import ControlServer, RequestError
from natfail.io.dataplane import Dataplane, DataplaneError
from natfail.io.hooks import HookRunner
from natfail.io.metrics import Metrics
from natfail.io.probe_transport import ProbeTransport
from natfail.io.sdnotify import Notifier
from natfail.io.statestore import StateFile
from natfail.oneline import error_line
from natfail.reloading import Reloader
from natfail.requests import Requests
from natfail.rounds import Prober

log = logging.getLogger("natfail")

STATE_FILE = saved.STATE_FILE
# How often the firewall is read to find drift: with the nftables monitor a
# slow safety net, without one (iptables) the repair's whole latency. Neither
# grows with the number of services, and no probe round reads the firewall.
SAFETY_CHECK_INTERVAL = 30.0
UNWATCHED_CHECK_INTERVAL = 2.0
IDLE_TICK = 5.0
"""Seconds between two turns of the main loop when nothing wakes it (a stop,
a reload, a failed transaction all do): its own work (the periodic check,
the foreign-NAT check) is due every 15 s or more, and on a small gateway a
turn every second was a visible share of the CPU."""

WatchRuleset = Callable[[Callable[[], None], Callable[[int], bool]], "asyncio.Future[None]"]


def settle_heap() -> None:
    """Put what the daemon holds now (config, services, sockets, the rules'
    rendering) out of the cyclic garbage collector's way. At 1000 services a
    full collection walked all of it, some 100 ms that a status reply's
    garbage set off, and the probes behind it waited. Collected first, so
    that no cycle left by a reload is kept for good."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


@dataclass
class ServiceRuntime:
    """A service's current state (replaced whole by each outcome) and the
    things that are not decisions: its probe keys and the foreign check."""

    state: ctl.ServiceState
    keys: noise.Keys
    foreign: dict[str, int] = field(default_factory=dict)

    # Read-only views, for status, requests and tests.
    @property
    def service(self) -> cfg.Service:
        return self.state.service

    @property
    def active(self) -> str | None:
        return self.state.active

    @property
    def pin(self) -> sel.Pin | None:
        return self.state.pin

    @property
    def drained(self) -> frozenset[str]:
        return self.state.drained

    @property
    def health(self) -> Mapping[str, hl.BackendHealth]:
        return self.state.health

    @property
    def failovers(self) -> int:
        return self.state.failovers

    @property
    def no_healthy(self) -> bool:
        return self.state.no_healthy


def load_all_keys(
    services: Iterable[cfg.Service], files: dict[Path, bytes] | None = None
) -> dict[str, noise.Keys]:
    """Every service's keys, each key file read once (a thousand services
    usually share one probe key), ``files`` holding those already read; and
    the same keys computed once."""
    read_files: dict[Path, bytes] = dict(files or {})
    made: dict[tuple[bytes, bytes, bytes], noise.Keys] = {}

    def read(path: Path) -> bytes:
        if path not in read_files:
            read_files[path] = cfg.load_key_file(path)
        return read_files[path]

    keys: dict[str, noise.Keys] = {}
    for s in services:
        private = read(s.probe.private_key_file)
        psk = read(s.preshared_key_file) if s.preshared_key_file else bytes(32)
        index = (private, s.server_public_key, psk)
        if index not in made:
            made[index] = noise.Keys(private, s.server_public_key, psk)
        keys[s.name] = made[index]
    return keys


class Daemon:
    def __init__(
        self,
        config: cfg.Config,
        *,
        dataplane: Dataplane,
        conntrack: AsyncConntrack,
        transport: ProbeTransport,
        notifier: Notifier,
        hooks: HookRunner,
        metrics: Metrics | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        watch_ruleset: WatchRuleset | None = None,
        check_interval: float | None = None,
        addresses: AddressWatch | None = None,
    ) -> None:
        """``addresses``: this gateway's own addresses, in a pair (``[daemon] pair``)."""
        self.config = config
        self.transport = transport
        self.notifier = notifier
        self.hooks = hooks
        self.metrics = metrics
        self.monotonic = monotonic
        self.firewall = Firewall(dataplane, conntrack)
        self._watch_ruleset = watch_ruleset
        self._check_interval = check_interval or (
            SAFETY_CHECK_INTERVAL if watch_ruleset is not None else UNWATCHED_CHECK_INTERVAL
        )
        self._checked = 0.0
        self.services: dict[str, ServiceRuntime] = {}
        self.schedule = Schedule()
        self.switches = SwitchLog()
        self.lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._reconcile_requested = asyncio.Event()
        self._background: set[asyncio.Future[Any]] = set()
        self.state_file = StateFile(config.daemon.state_dir / STATE_FILE)
        self.executor = Executor(self)
        self.prober = Prober(self)
        self.reloader = Reloader(self)
        self.foreign = ForeignCheck(self)
        self.requests = Requests(self)
        self.agent_polls = AgentPolls(self)
        self.addresses = addresses
        self._local: Addresses = frozenset()
        self.control = ControlServer(
            config.daemon.socket, self.requests.handle, self.requests.handle_now
        )

    @property
    def dataplane(self) -> Dataplane:
        return self.firewall.dataplane

    def save_state(self) -> str | None:
        """Writes the operator's wishes; the reason when that failed (logged), else None."""
        return self.state_file.save(rt.state for rt in self.services.values())

    def role_of(self, service: cfg.Service) -> ctl.Role:
        """In a pair, decide while holding the public address; else follow."""
        if not self.config.daemon.pair:
            return "single"
        return "decide" if service.public.ip in self._local else "follow"

    def _addresses_changed(self, addresses: Addresses) -> None:
        self._local = addresses
        task = asyncio.ensure_future(self.update_roles())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def update_roles(self) -> None:
        """Carries out every service's change of role, in one batch (after the
        addresses changed, or a reload changed a public address)."""
        async with self.lock:
            now = self.monotonic()
            outcomes = []
            for rt in self.services.values():
                role = self.role_of(rt.service)
                if role != rt.state.role:
                    outcomes.append((rt, ctl.set_role(rt.state, role, now)))
                    if self.metrics:
                        self.metrics.role(rt.service.name, role)
            if outcomes:
                await self.executor.carry_out(outcomes)
        if outcomes:
            self.agent_polls.poke()  # what the agents recorded, now

    def declare_metrics(self, rt: ServiceRuntime) -> None:
        if self.metrics:
            service = rt.service
            self.metrics.declare(
                service.name,
                [b.name for b in service.backends],
                rt.state.active,
                rt.state.role,
                sorted(rt.state.agents),
            )

    def actives(self) -> dict[str, str | None]:
        return {name: rt.state.active for name, rt in self.services.items()}

    # -- repair -------------------------------------------------------------------------

    async def reconcile(self, why: str) -> None:
        """Put natfail's rules back if something else changed them."""
        async with self.lock:
            desired = self.firewall.build(self.config.services, self.actives())
            try:
                installed, intact = await self.firewall.read()
            except DataplaneError as exc:
                log.error("cannot read the firewall: %s", exc)
                installed, intact = None, False
            if (intact or desired.empty) and installed == desired:
                # (With no DNAT wanted yet, no table at all is as good as an empty one.)
                self.firewall.installed = desired
                return
            self.firewall.installed = installed
            if await self.executor.transaction(self.actives()) is None:
                log.warning("repaired natfail's firewall rules (%s)", why)
                if self.metrics:
                    self.metrics.repairs.inc()

    # -- start, run, stop ---------------------------------------------------------------

    async def _start(self) -> bool:
        """Adopt what a previous run left, install the rules; False if stopped meanwhile."""
        now = self.monotonic()
        saved_services = self.state_file.load()
        try:
            installed, _ = await self.firewall.read()
        except DataplaneError as exc:
            log.error("cannot read the installed rules, starting fresh: %s", exc)
            installed = self.firewall.build(self.config.services, {})
        self.firewall.installed = installed
        adopted = ruleset.active_from(installed, self.config.services)
        keys = load_all_keys(self.config.services)
        if self.addresses is not None:
            self._local = await asyncio.to_thread(self.addresses.current)
        saved_clients = self.agent_polls.load()
        wall = time.time()
        for service in self.config.services:
            wishes = saved.wishes(saved_services.get(service.name), service)
            state = ctl.ServiceState.initial(
                service,
                now,
                active=adopted.get(service.name),
                pin=wishes.pin,
                drained=wishes.drained,
                epoch=wishes.epoch,
                role=self.role_of(service),
                agents=ag.load_clients(
                    saved_clients.get(service.name),
                    (b.name for b in service.backends if b.agent is not None),
                    now,
                    wall,
                ),
            )
            if state.active is not None:
                log.info("%s: adopted the installed rule to %s", service.name, state.active)
            self.services[service.name] = ServiceRuntime(state, keys[service.name])
        desired = self.firewall.build(self.config.services, self.actives())
        if not (desired.empty and installed.empty):
            while await self.firewall.apply(desired) is not None:
                if await self._sleep_or_stop(1.0):
                    return False
        # Whatever reached a public endpoint while its rule was missing (before
        # this start, or while a previous daemon was down) is not NATed.
        await self.firewall.unstrand(desired, None)
        for rt in self.services.values():
            for cleanup in ctl.stray_cleanups(rt.state):
                await self.firewall.cleanup(cleanup)
        return True

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop_errors.install(loop)
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        try:
            if not await self._start():
                return exitcodes.OK
            await self.control.start()
            if self.config.daemon.metrics_listen and self.metrics:
                host, port = cfg.parse_listen(self.config.daemon.metrics_listen)
                self.metrics.serve(host, port)
            for rt in self.services.values():
                self.declare_metrics(rt)
            self.prober.start()
            self.agent_polls.start()
            if self.addresses is not None:
                self.addresses.start(self._addresses_changed)
                roles = [rt.state.role for rt in self.services.values()]
                log.info(
                    "pair: this gateway decides %d service(s) and follows %d",
                    roles.count("decide"),
                    roles.count("follow"),
                )
            if self._watch_ruleset is not None:
                watcher = self._watch_ruleset(self._reconcile_requested.set, self.firewall.own)
                self._background.add(watcher)
            settle_heap()
            self.notifier.notify("READY=1")
            self.tell_status()
            log.info(
                "natfail running: %d service(s), firewall %s, socket %s",
                len(self.services),
                self.config.daemon.firewall,
                self.config.daemon.socket,
            )
            await self._main_loop()
        finally:
            self.notifier.notify("STOPPING=1")
            await self.prober.stop()
            if self.addresses is not None:
                self.addresses.close()
            await self.agent_polls.stop()
            self.transport.close()
            for task in list(self._background):
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            await self.hooks.close()
            await self.control.close()
            if self.metrics:
                self.metrics.close()
            if self.services:
                self.save_state()
            self.firewall.close()
            log.info("natfail stopped; the rules stay in place")
        return exitcodes.OK

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_reload(self) -> None:
        self._reload_requested.set()

    def request_check(self) -> None:
        """Look at the firewall at the next tick (after a failed transaction)."""
        self._reconcile_requested.set()

    async def _sleep_or_stop(self, seconds: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    async def _main_loop(self) -> None:
        watchdog = self.notifier.watchdog_interval
        tick = min(watchdog / 2, IDLE_TICK) if watchdog else IDLE_TICK
        tick = min(tick, self._check_interval)
        while not self._stop.is_set():
            waiters = [
                asyncio.ensure_future(e.wait())
                for e in (self._stop, self._reload_requested, self._reconcile_requested)
            ]
            await asyncio.wait(waiters, timeout=tick, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()
            if watchdog:
                self.notifier.notify("WATCHDOG=1")
            # Nothing here may end the loop: it carries the watchdog and SIGHUP.
            try:
                if self._reconcile_requested.is_set():
                    self._reconcile_requested.clear()
                    self._checked = self.monotonic()
                    await self.reconcile("the ruleset changed")
                elif self.monotonic() - self._checked >= self._check_interval:
                    self._checked = self.monotonic()
                    await self.reconcile("found by the periodic check")
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    with contextlib.suppress(RequestError):  # logged; the old config stays
                        await self.reload()
                await self.foreign.tick()
            except Exception as exc:
                log.error("internal error in the main loop, going on: %s", error_line(exc))
                log.debug("main loop error", exc_info=True)

    async def reload(self) -> str:
        message = await self.reloader.reload()
        settle_heap()
        return message

    # -- what the operator sees ---------------------------------------------------------

    def tell_status(self) -> None:
        self.notifier.notify("STATUS=" + status.summary(rt.state for rt in self.services.values()))

    def status(self) -> dict[str, Any]:
        return status.render(
            (rt.state for rt in self.services.values()),
            wall_now=time.time(),
            monotonic_now=self.monotonic(),
            foreign={name: rt.foreign for name, rt in self.services.items()},
            activations={k: dataclasses.asdict(v) for k, v in self.agent_polls.last.items()},
        )

    async def probe_round(self, name: str) -> None:
        """Probe one service now and carry the outcome out (tests, reloads)."""
        await self.prober.round_now(name)
