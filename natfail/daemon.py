"""The daemon: probes -> health -> selector -> dataplane -> conntrack.

Decisions are made by the pure core (`natfail.core.health`,
`natfail.core.selector`, `natfail.core.ruleset`); this module schedules the
probes, feeds the results in, carries the decisions out through the edges in
`natfail.io`, and keeps the operator's wishes (pins, drains) across restarts.

Order of a switch, always: one dataplane transaction; only if it succeeded,
the conntrack cleanup of the old backend; then the switch record (its log
line, `natfailctl events`), the metrics and the notify hook. A failed
transaction keeps the last good state and is retried on the next round."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from natfail import commands, exitcodes, jsonlimit
from natfail import config as cfg
from natfail.core import health as hl
from natfail.core import noise, ruleset
from natfail.core import selector as sel
from natfail.core.records import KEPT, SwitchLog, SwitchRecord
from natfail.io import loop_errors
from natfail.io.conntrack import ConntrackError
from natfail.io.conntrack_worker import AsyncConntrack
from natfail.io.control import ControlServer, Peer, RequestError
from natfail.io.dataplane import Dataplane, DataplaneError
from natfail.io.hooks import HookRunner, SwitchEvent
from natfail.io.metrics import Metrics
from natfail.io.probe_transport import ProbeResult, ProbeTransport
from natfail.io.sdnotify import Notifier
from natfail.io.statefile import read_or_none, write_atomic
from natfail.oneline import error_line

log = logging.getLogger("natfail")

STATE_FILE = "state.json"
# How often the flows of each public endpoint are checked for a NAT that is
# not natfail's (a foreign DNAT at a higher priority).
FOREIGN_CHECK_INTERVAL = 15.0
# How often the firewall is read to find drift: with the nftables monitor a
# slow safety net, without one (iptables) the repair's whole latency. Neither
# grows with the number of services, and no probe round reads the firewall.
SAFETY_CHECK_INTERVAL = 30.0
UNWATCHED_CHECK_INTERVAL = 2.0


@dataclass
class ServiceRuntime:
    service: cfg.Service
    keys: noise.Keys
    health: dict[str, hl.BackendHealth]
    active: str | None = None
    pin: sel.Pin | None = None
    drained: set[str] = field(default_factory=set)
    failovers: int = 0
    no_healthy: bool = False
    foreign: dict[str, int] = field(default_factory=dict)
    """Reply sources (not natfail's backends) of client flows to the public endpoint."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def candidates(self) -> list[sel.Candidate]:
        return [
            sel.Candidate(
                b.name,
                b.priority,
                self.health[b.name].state,
                self.health[b.name].since,
                self.health[b.name].loss,
                self.health[b.name].failures,
            )
            for b in self.service.backends
        ]


@dataclass
class _ReloadPlan:
    removed: list[str] = field(default_factory=list)
    added: list[ServiceRuntime] = field(default_factory=list)
    lost: list[tuple[cfg.Service, str]] = field(default_factory=list)
    """(old service, backend): flows to remove once the new rules are in."""
    moved: list[tuple[ServiceRuntime, str, str]] = field(default_factory=list)
    """(runtime, previous backend, reason): services whose active backend went away."""


def _first_by_priority(service: cfg.Service, drained: set[str]) -> str:
    order = sorted(
        enumerate(service.backends), key=lambda ib: (ib[1].name in drained, -ib[1].priority, ib[0])
    )
    return order[0][1].name


def load_keys(service: cfg.Service) -> noise.Keys:
    """The probe identity of one service; ConfigError-like ValueError when unusable."""
    private = cfg.load_key_file(service.probe.private_key_file)
    psk = cfg.load_key_file(service.preshared_key_file) if service.preshared_key_file else None
    return noise.Keys(private, service.server_public_key, psk or bytes(32))


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
        watch_ruleset: Callable[[Callable[[], None]], asyncio.Future[None]] | None = None,
        check_interval: float | None = None,
    ) -> None:
        self.config = config
        self.dataplane = dataplane
        self.conntrack = conntrack
        self.transport = transport
        self.notifier = notifier
        self.hooks = hooks
        self.metrics = metrics
        self.monotonic = monotonic
        self._watch_ruleset = watch_ruleset
        self._check_interval = check_interval or (
            SAFETY_CHECK_INTERVAL if watch_ruleset is not None else UNWATCHED_CHECK_INTERVAL
        )
        self._checked = 0.0
        self.services: dict[str, ServiceRuntime] = {}
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._reconcile_requested = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Future[Any]] = set()
        self._desired: ruleset.Ruleset | None = None
        self.switches = SwitchLog()
        self._local_errors = loop_errors.RepeatLog(log, clock=monotonic)
        self._foreign_checked = 0.0
        self.control = ControlServer(config.daemon.socket, self._handle)

    # -- state kept across restarts ---------------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.config.daemon.state_dir / STATE_FILE

    def _load_state(self) -> dict[str, Any]:
        try:
            raw = read_or_none(self._state_path)
            data = jsonlimit.loads(raw) if raw else {}
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self._state_path, exc)
            return {}
        services = data.get("services") if isinstance(data, dict) else None
        return services if isinstance(services, dict) else {}

    def _save_state(self) -> str | None:
        """Writes the operator's wishes; the reason when that failed (logged), else None."""
        services: dict[str, Any] = {}
        for name, rt in self.services.items():
            pin = {"backend": rt.pin.backend, "armed": rt.pin.armed} if rt.pin else None
            services[name] = {"pin": pin, "drained": sorted(rt.drained), "active": rt.active}
        try:
            write_atomic(
                self._state_path,
                json.dumps({"version": 1, "services": services}, indent=1).encode(),
            )
        except OSError as exc:
            reason = exc.strerror or str(exc)
            log.error("cannot write state file %s: %s", self._state_path, reason)
            return reason
        return None

    def _runtime(
        self, service: cfg.Service, keys: noise.Keys, saved: Any, now: float
    ) -> ServiceRuntime:
        rt = ServiceRuntime(
            service=service,
            keys=keys,
            health={b.name: hl.BackendHealth.initial(now) for b in service.backends},
        )
        if isinstance(saved, dict):
            names = {b.name for b in service.backends}
            drained = saved.get("drained")
            if isinstance(drained, list):
                rt.drained = {d for d in drained if d in names}
            pin = saved.get("pin")
            if isinstance(pin, dict) and pin.get("backend") in names:
                rt.pin = sel.Pin(str(pin["backend"]), bool(pin.get("armed", True)))
        return rt

    # -- the firewall ------------------------------------------------------------------

    def _build(self, actives: dict[str, str | None]) -> ruleset.Ruleset:
        # No table until some service has a DNAT: natfail's NAT chains make the
        # kernel track client packets, and a flow tracked before its DNAT
        # exists stays un-NATed while the client keeps retrying. So the table
        # comes with the first DNAT, in one transaction.
        if all(a is None for a in actives.values()):
            return ruleset.Ruleset()
        return ruleset.build(self.config.services, actives)

    def _actives(self) -> dict[str, str | None]:
        return {name: rt.active for name, rt in self.services.items()}

    def _apply(self, desired: ruleset.Ruleset) -> bool:
        try:
            self.dataplane.apply(desired)
        except DataplaneError as exc:
            log.error("firewall transaction failed, keeping the last good state: %s", exc)
            # The firewall may have changed under us: look at it next tick.
            self._reconcile_requested.set()
            return False
        self._desired = desired
        return True

    async def _apply_and_unstrand(
        self, desired: ruleset.Ruleset, before: ruleset.Ruleset | None
    ) -> bool:
        """One transaction; then, only if it succeeded, the flows it strands go."""
        if not self._apply(desired):
            return False
        await self._unstrand(desired, before)
        return True

    async def _unstrand(self, desired: ruleset.Ruleset, before: ruleset.Ruleset | None) -> None:
        """Remove client flows that reached a public endpoint while its DNAT was
        missing or different: such an entry is not NATed (its reply source is the
        public endpoint itself) and the client's own retries would keep it, and
        the client cut off, for good. Run for every DNAT that ``desired`` installs,
        restores or changes compared with ``before`` (None: every DNAT)."""
        old = set() if before is None else set(before.dnat)
        for dnat in sorted(desired.dnat - old, key=ruleset.Dnat.sort_key):
            try:
                await self.conntrack.remove_unnated(dnat.public)
            except ConntrackError as exc:
                log.error(
                    "%s: removing the un-NATed flows to %s failed: %s",
                    dnat.service,
                    dnat.public,
                    exc,
                )

    async def _cleanup(self, service: cfg.Service, backend_name: str) -> None:
        backend = service.backend(backend_name)
        if backend is None:
            return
        mark = ruleset.backend_mark(service.name, backend.name)
        try:
            result = await self.conntrack.remove_backend(mark, backend.address)
        except ConntrackError as exc:
            log.error("%s: conntrack cleanup of %s failed: %s", service.name, backend_name, exc)
            return
        if result.found_after_first or result.left:
            log.info(
                "%s: conntrack cleanup of %s needed %d passes (%d left)",
                service.name,
                backend_name,
                result.passes,
                result.left,
            )

    async def _commit(self, rt: ServiceRuntime, decision: sel.Decision) -> bool:
        """Carry out a decision: swap, clean, tell. False when the swap failed."""
        rt.no_healthy = decision.no_healthy
        if decision.pin_dropped:
            log.info(
                "%s: pin on %s ended (%s)",
                rt.service.name,
                rt.pin.backend if rt.pin else "?",
                decision.reason,
            )
        pin_changed = decision.pin != rt.pin
        rt.pin = decision.pin
        if not decision.changed:
            if pin_changed:
                self._save_state()
            return True
        previous = rt.active
        actives = self._actives()
        actives[rt.service.name] = decision.active
        started = self.monotonic()
        if not await self._apply_and_unstrand(self._build(actives), self._desired):
            return False
        rt.active = decision.active
        swapped = self.monotonic()
        if previous is not None:
            await self._cleanup(rt.service, previous)
        cleaned = self.monotonic()
        self._switched(rt, previous, decision.reason, swapped - started, cleaned - swapped)
        return True

    def _switched(
        self, rt: ServiceRuntime, previous: str | None, reason: str, swap: float, cleanup: float
    ) -> None:
        """After a swap to ``rt.active`` and the cleanup: count, log, metrics, hook."""
        assert rt.active is not None
        if previous is not None:
            rt.failovers += 1
        active = rt.service.backend(rt.active)
        record = SwitchRecord(
            rt.service.name, previous, rt.active, reason, time.time(), swap * 1000, cleanup * 1000
        )
        self.switches.add(record)
        log.warning("%s", record.line())
        names = [b.name for b in rt.service.backends]
        if self.metrics:
            if previous is not None:
                self.metrics.switched(rt.service.name, names, rt.active, reason)
            else:
                self.metrics.set_active(rt.service.name, names, rt.active)
        self._save_state()
        self._status()
        if rt.service.notify is not None and active is not None:
            event = SwitchEvent(rt.service.name, previous, rt.active, reason, str(active.address))
            self.hooks.submit(rt.service.notify, event)

    async def _decide(self, rt: ServiceRuntime) -> None:
        async with self._lock:
            if self.services.get(rt.service.name) is not rt:
                return  # removed by a reload meanwhile
            now = self.monotonic()
            decision = sel.select(
                rt.candidates(),
                current=rt.active,
                now=now,
                drained=rt.drained,
                pin=rt.pin,
                failback=rt.service.failback,
                preempt_delay=rt.service.preempt_delay,
            )
            if decision.no_healthy and not rt.no_healthy:
                log.error(
                    "%s: no healthy backend; traffic stays on %s",
                    rt.service.name,
                    rt.active or "nothing",
                )
            await self._commit(rt, decision)

    async def reconcile(self, why: str) -> None:
        """Put natfail's rules back if something else changed them."""
        async with self._lock:
            desired = self._build(self._actives())
            try:
                installed = self.dataplane.read()
                intact = self.dataplane.intact()
            except DataplaneError as exc:
                log.error("cannot read the firewall: %s", exc)
                installed, intact = None, False
            if (intact or desired.empty) and installed == desired:
                # (With no DNAT wanted yet, no table at all is as good as an empty one.)
                self._desired = desired
                return
            if await self._apply_and_unstrand(desired, installed):
                log.warning("repaired natfail's firewall rules (%s)", why)
                if self.metrics:
                    self.metrics.repairs.inc()

    # -- probing -----------------------------------------------------------------------

    def _observe(
        self, rt: ServiceRuntime, backend: cfg.Backend, keys: noise.Keys, result: ProbeResult
    ) -> bool:
        """Feed one probe result to the backend's health; True when it just went down.

        ``backend`` and ``keys`` are what was probed: a reload while the probe
        was in flight may have removed the backend or changed its address or
        the service's keys, and then the result says nothing about it."""
        old = rt.health.get(backend.name)
        now_probed = rt.service.backend(backend.name)
        if (
            old is None
            or now_probed is None
            or now_probed.address != backend.address
            or rt.keys != keys
        ):
            return False
        if result.local:
            # Our own trouble (out of file descriptors, say) says nothing
            # about the backend: it must never move traffic.
            reason = result.detail or result.reason
            self._local_errors.report(
                f"probes failing on this gateway ({reason}); not counted against any backend",
                f"{rt.service.name}: probe of {backend.name} failed on this gateway ({reason}); "
                "not counted against the backend",
                level=logging.ERROR,
            )
            return False
        probe = rt.service.probe
        new = hl.observe(
            old,
            result.up,
            max(self.monotonic(), old.since),
            probe.rise,
            probe.fall,
            rtt=result.rtt if result.up else None,
            reason="" if result.up else result.reason,
        )
        rt.health[backend.name] = new
        if self.metrics:
            self.metrics.probe(rt.service.name, backend.name, result.up, result.rtt, result.reason)
            if new.state != hl.HealthState.UNKNOWN:
                self.metrics.health(rt.service.name, backend.name, new.state == hl.HealthState.UP)
        if new.state != old.state:
            detail = (
                f"rtt {result.rtt_ms:.2f} ms"
                if result.up and result.rtt_ms is not None
                else result.reason
            )
            log.info(
                "%s: backend %s is %s (%s)", rt.service.name, backend.name, new.state.value, detail
            )
        return new.state == hl.HealthState.DOWN and old.state != hl.HealthState.DOWN

    async def _probe_round(self, rt: ServiceRuntime) -> None:
        probe, keys = rt.service.probe, rt.keys
        backends = list(rt.service.backends)
        results = await asyncio.gather(
            *(self.transport.probe(keys, b.address, probe.timeout) for b in backends)
        )
        went_down = [
            b.name
            for b, result in zip(backends, results, strict=True)
            if self._observe(rt, b, keys, result) and b.name != rt.active
        ]
        await self._decide(rt)
        if went_down:
            await self._forget_standbys(rt, went_down)

    async def _forget_standbys(self, rt: ServiceRuntime, names: list[str]) -> None:
        """Remove the flows of standby backends that went down.

        A standby can own flows: one that was active before, or whose own
        packet reached a client after the client's flow had expired (the
        SNAT sends it out as public:port, and the client answers there). The
        client's keepalives would keep such a flow alive after the standby
        dies; removed, the client's next packet takes the DNAT to the active."""
        async with self._lock:
            if self.services.get(rt.service.name) is not rt:
                return
            for name in names:
                health = rt.health.get(name)
                if name != rt.active and health is not None and health.state == hl.HealthState.DOWN:
                    await self._cleanup(rt.service, name)

    async def _service_loop(self, rt: ServiceRuntime) -> None:
        interval = rt.service.probe.interval
        # A random phase spreads services and gateways apart; the period itself
        # stays exact, so detection time stays within fall x interval + timeout.
        next_round = self.monotonic() + random.uniform(0, min(interval, 1.0) * 0.1)
        while not self._stop.is_set():
            delay = next_round - self.monotonic()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(rt.wake.wait(), delay)
            rt.wake.clear()
            now = self.monotonic()
            next_round += interval
            if next_round <= now:
                # Stalled (SIGSTOP, a suspended VM): one round now, the next a
                # whole interval later, never a burst of rounds to catch up,
                # which would count `fall` failures in less than fall x interval.
                next_round = now + interval
            try:
                await self._probe_round(rt)
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad round must not end the service's probing
                log.exception("%s: probe round failed", rt.service.name)

    def _start_task(self, rt: ServiceRuntime) -> None:
        self._tasks[rt.service.name] = asyncio.create_task(self._service_loop(rt))

    async def _stop_service(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- start, reload, stop -----------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop_errors.install(loop)
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        now = self.monotonic()
        saved = self._load_state()
        try:
            installed = self.dataplane.read()
        except DataplaneError as exc:
            log.error("cannot read the installed rules, starting fresh: %s", exc)
            installed = ruleset.Ruleset()
        adopted = ruleset.active_from(installed, self.config.services)
        for service in self.config.services:
            rt = self._runtime(service, load_keys(service), saved.get(service.name), now)
            rt.active = adopted.get(service.name)
            if rt.active is not None:
                log.info("%s: adopted the installed rule to %s", service.name, rt.active)
            self.services[service.name] = rt
        desired = self._build(self._actives())
        if not (desired.empty and installed.empty):
            while not self._apply(desired):
                if await self._sleep_or_stop(1.0):
                    return exitcodes.OK
        # Whatever reached a public endpoint while its rule was missing (before
        # this start, or while a previous daemon was down) is not NATed.
        await self._unstrand(desired, None)
        # A daemon killed between a swap and its conntrack cleanup leaves
        # flows pinned to the old backend: only the active one's may stay.
        for rt in self.services.values():
            if rt.active is None:
                continue
            for backend in rt.service.backends:
                if backend.name != rt.active:
                    await self._cleanup(rt.service, backend.name)
        await self.control.start()
        if self.config.daemon.metrics_listen and self.metrics:
            host, port = cfg.parse_listen(self.config.daemon.metrics_listen)
            self.metrics.serve(host, port)
        for rt in self.services.values():
            self._start_task(rt)
        if self._watch_ruleset is not None:
            watcher = self._watch_ruleset(self._reconcile_requested.set)
            self._background.add(watcher)
        self.notifier.notify("READY=1")
        self._status()
        log.info(
            "natfail running: %d service(s), firewall %s, socket %s",
            len(self.services),
            self.config.daemon.firewall,
            self.config.daemon.socket,
        )
        try:
            await self._main_loop()
        finally:
            self.notifier.notify("STOPPING=1")
            for name in list(self._tasks):
                await self._stop_service(name)
            for task in list(self._background):
                task.cancel()
            await asyncio.gather(*self._background, return_exceptions=True)
            await self.hooks.close()
            await self.control.close()
            if self.metrics:
                self.metrics.close()
            self._save_state()
            log.info("natfail stopped; the rules stay in place")
        return exitcodes.OK

    async def _sleep_or_stop(self, seconds: float) -> bool:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    async def _main_loop(self) -> None:
        watchdog = self.notifier.watchdog_interval
        tick = (
            min(watchdog / 2, 1.0, self._check_interval)
            if watchdog
            else min(1.0, self._check_interval)
        )
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
                if self.monotonic() - self._foreign_checked >= FOREIGN_CHECK_INTERVAL:
                    self._foreign_checked = self.monotonic()
                    await self._check_foreign_all()
            except Exception as exc:
                log.error("internal error in the main loop, going on: %s", error_line(exc))
                log.debug("main loop error", exc_info=True)

    async def _check_foreign_all(self) -> None:
        async with self._lock:
            for rt in list(self.services.values()):
                await self._check_foreign(rt)

    async def _check_foreign(self, rt: ServiceRuntime) -> None:
        """Warn when client flows to the public endpoint are NATed elsewhere: a
        DNAT that is not natfail's and comes first (another table or chain at a
        higher priority) takes the traffic, whatever natfail installs."""
        if rt.active is None:
            return
        public = rt.service.public
        try:
            flows = await self.conntrack.public_flows(public)
        except ConntrackError as exc:
            log.error("%s: cannot read the flows to %s: %s", rt.service.name, public, exc)
            return
        foreign = ruleset.foreign_targets(rt.service, flows.by_reply_source)
        if foreign and foreign != rt.foreign:
            shown = ", ".join(f"{addr} ({n} flows)" for addr, n in sorted(foreign.items()))
            log.warning(
                "%s: client flows to %s are NATed to %s, not by natfail: another "
                "DNAT rule comes before natfail's and overrides it",
                rt.service.name,
                public,
                shown,
            )
        elif rt.foreign and not foreign:
            log.info(
                "%s: no client flow to %s is NATed by another rule any more",
                rt.service.name,
                public,
            )
        rt.foreign = foreign

    async def reload(self) -> str:
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            return await self._reload()
        finally:
            self.notifier.notify("READY=1")
            self._status()

    def _read_config(self, path: Path) -> tuple[cfg.Config, dict[str, noise.Keys]]:
        """The new config and its keys, all checked; run off the event loop, so
        that no file (a FIFO, a huge one) can stall the probes and the watchdog."""
        new = cfg.load(path)
        problems = cfg.check_files(new)
        if problems:
            raise cfg.ConfigError(path, "", problems[0].split(": ", 1)[-1])
        if new.daemon != self.config.daemon:
            raise cfg.ConfigError(
                path,
                "daemon",
                "[daemon] settings change only with a restart (systemctl restart natfail)",
            )
        return new, {s.name: load_keys(s) for s in new.services}

    async def _reload(self) -> str:
        path = self.config.path
        try:
            new, keys = await asyncio.to_thread(self._read_config, path)
        except (cfg.ConfigError, ValueError) as exc:
            log.error("reload refused, the running config stays: %s", exc)
            raise RequestError(f"reload refused: {exc}", exitcodes.USAGE) from None
        async with self._lock:
            # Everything up to the transaction is undone on any failure: a
            # reload takes effect whole or not at all.
            snapshot = self._snapshot()
            try:
                plan = self._plan_reload(new, keys)
                started = self.monotonic()
                applied = await self._apply_and_unstrand(
                    self._build(self._actives()), self._desired
                )
            except Exception as exc:
                self._restore(snapshot)
                log.error("reload failed, the running config stays: %s", error_line(exc))
                log.debug("reload failure", exc_info=True)
                raise RequestError(
                    f"reload failed, the running config stays: {error_line(exc)}"
                ) from None
            if not applied:
                self._restore(snapshot)
                log.error(
                    "reload refused, the running config stays: the firewall refused the new rules"
                )
                raise RequestError(
                    "reload refused: the firewall refused the new rules; the "
                    "running config stays (see the log)"
                )
            swapped = self.monotonic()
            for name in plan.removed:
                await self._stop_service(name)
                if self.metrics:
                    self.metrics.forget(name)
            for rt in plan.added:
                self._start_task(rt)
            for service, backend in plan.lost:
                await self._cleanup(service, backend)
            cleaned = self.monotonic()
            for rt, previous, reason in plan.moved:
                self._switched(rt, previous, reason, swapped - started, cleaned - swapped)
            self._save_state()
        message = (
            f"reloaded {path}: {len(new.services)} service(s), {len(plan.added)} added, "
            f"{len(plan.removed)} removed"
        )
        log.info("%s", message)
        return message

    def _snapshot(self) -> tuple[cfg.Config, dict[str, ServiceRuntime], dict[str, Any]]:
        kept = {
            name: (rt.service, rt.keys, rt.health, rt.active, rt.pin, set(rt.drained))
            for name, rt in self.services.items()
        }
        return self.config, dict(self.services), kept

    def _restore(
        self, snapshot: tuple[cfg.Config, dict[str, ServiceRuntime], dict[str, Any]]
    ) -> None:
        self.config, self.services, kept = snapshot[0], dict(snapshot[1]), snapshot[2]
        for name, (service, svc_keys, health, active, pin, drained) in kept.items():
            rt = self.services[name]
            rt.service, rt.keys, rt.health = service, svc_keys, health
            rt.active, rt.pin, rt.drained = active, pin, drained

    def _plan_reload(self, new: cfg.Config, keys: dict[str, noise.Keys]) -> _ReloadPlan:
        """Carry the runtimes over to ``new`` (in place; the caller can undo it)."""
        now = self.monotonic()
        plan = _ReloadPlan()
        plan.removed = [n for n in self.services if n not in keys]
        for name in plan.removed:
            rt = self.services.pop(name)
            if rt.active is not None:
                plan.lost.append((rt.service, rt.active))
        for service in new.services:
            existing = self.services.get(service.name)
            if existing is None:
                plan.added.append(self._runtime(service, keys[service.name], None, now))
                continue
            plan.lost += self._update_runtime(existing, service, keys[service.name], now)
        self.config = new
        for rt in plan.added:
            self.services[rt.service.name] = rt
        # A service whose active backend went away moves in this same
        # transaction, and never to nothing: a moment without its DNAT lets
        # client packets make un-NATed conntrack entries.
        for service, backend in plan.lost:
            rt_lost = self.services.get(service.name)
            if rt_lost is None or rt_lost.active is not None:
                continue  # the whole service was removed
            decision = sel.select(
                rt_lost.candidates(),
                current=None,
                now=now,
                drained=rt_lost.drained,
                pin=rt_lost.pin,
                failback=rt_lost.service.failback,
                preempt_delay=rt_lost.service.preempt_delay,
            )
            active = decision.active
            if active is None:
                # No verdict on the new backends yet: the first by priority
                # beats no rule; the next probe rounds correct it.
                active = _first_by_priority(rt_lost.service, rt_lost.drained)
            rt_lost.active, rt_lost.pin = active, decision.pin
            plan.moved.append((rt_lost, backend, decision.reason))
        return plan

    def _update_runtime(
        self, rt: ServiceRuntime, service: cfg.Service, keys: noise.Keys, now: float
    ) -> list[tuple[cfg.Service, str]]:
        """Carry a service over a reload; returns backends whose flows must go.

        A backend renamed at the same address keeps its health and, when it
        was active, the traffic: its flows still lead to the right place."""
        old = rt.service
        lost: list[tuple[cfg.Service, str]] = []
        health: dict[str, hl.BackendHealth] = {}
        new_names = {b.name for b in service.backends}

        def predecessor(backend: cfg.Backend) -> cfg.Backend | None:
            same_name = old.backend(backend.name)
            if same_name is not None:
                return same_name
            return next(
                (
                    b
                    for b in old.backends
                    if b.address == backend.address and b.name not in new_names
                ),
                None,
            )

        for backend in service.backends:
            before = predecessor(backend)
            same = before is not None and before.address == backend.address
            previous = rt.health.get(before.name) if before is not None else None
            health[backend.name] = (
                previous
                if same and previous is not None and keys == rt.keys
                else hl.BackendHealth.initial(now)
            )
        if rt.active is not None:
            before_active = old.backend(rt.active)
            after = service.backend(rt.active)
            if after is None or before_active is None or after.address != before_active.address:
                renamed = next(
                    (
                        b
                        for b in service.backends
                        if before_active is not None
                        and b.address == before_active.address
                        and predecessor(b) is before_active
                    ),
                    None,
                )
                if renamed is not None:
                    rt.active = renamed.name
                else:
                    lost.append((old, rt.active))
                    rt.active = None
        rt.drained &= new_names
        if rt.pin is not None and rt.pin.backend not in new_names:
            rt.pin = None
        rt.service, rt.keys, rt.health = service, keys, health
        rt.wake.set()  # probe the changed service at once
        return lost

    # -- status and commands -----------------------------------------------------------

    def _status(self) -> None:
        parts = [
            f"{name}: {rt.active or 'none'}" + (" (pinned)" if rt.pin else "")
            for name, rt in self.services.items()
        ]
        self.notifier.notify("STATUS=active " + ", ".join(parts))

    def _since(self, monotonic_since: float) -> str:
        wall = time.time() - (self.monotonic() - monotonic_since)
        return datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="seconds")

    def status(self) -> dict[str, Any]:
        services = []
        for rt in self.services.values():
            backends = []
            for b in rt.service.backends:
                h = rt.health[b.name]
                backends.append(
                    {
                        "name": b.name,
                        "address": str(b.address),
                        "state": sel.effective_state(h.state, b.name in rt.drained),
                        "rtt_ms": None if h.last_rtt is None else round(h.last_rtt * 1000, 3),
                        "since": self._since(h.since),
                        "priority": b.priority,
                        "reason": h.last_reason,
                    }
                )
            services.append(
                {
                    "name": rt.service.name,
                    "public": str(rt.service.public),
                    "active": rt.active,
                    "pinned": rt.pin is not None,
                    "failovers": rt.failovers,
                    "backends": backends,
                    "warnings": self._warnings(rt),
                }
            )
        return {"services": services}

    @staticmethod
    def _warnings(rt: ServiceRuntime) -> list[str]:
        if not rt.foreign:
            return []
        shown = ", ".join(f"{addr} ({n} flows)" for addr, n in sorted(rt.foreign.items()))
        return [
            f"client flows to {rt.service.public} are NATed to {shown} by a rule that is "
            "not natfail's and comes first"
        ]

    def _service_arg(self, request: dict[str, Any]) -> ServiceRuntime:
        name = request.get("service")
        rt = self.services.get(name) if isinstance(name, str) else None
        if rt is None:
            raise RequestError(f"no service {name!r} (services: {', '.join(self.services)})")
        return rt

    def _backend_arg(self, rt: ServiceRuntime, request: dict[str, Any]) -> str:
        name = request.get("backend")
        if not isinstance(name, str) or rt.service.backend(name) is None:
            names = ", ".join(b.name for b in rt.service.backends)
            raise RequestError(f"service {rt.service.name} has no backend {name!r} ({names})")
        return name

    def _operator_change(self, rt: ServiceRuntime, command: str, request: dict[str, Any]) -> str:
        """Apply switch/release/drain/undrain to the service's wishes; the message."""
        name = rt.service.name
        if command == "release":
            if rt.pin is None:
                return f"{name}: not pinned"
            rt.pin = None
            return f"{name}: pin released"
        backend = self._backend_arg(rt, request)
        state = rt.health[backend].state
        if command == "switch":
            if backend in rt.drained:
                raise RequestError(f"{name}: backend {backend} is drained (undrain it first)")
            force = request.get("force", False)
            if not isinstance(force, bool):
                # "false" is a non-empty string: never let it mean yes.
                raise RequestError(f"force must be true or false, not {force!r}", exitcodes.USAGE)
            if state != hl.HealthState.UP and not force:
                raise RequestError(
                    f"{name}: backend {backend} is {state.value}; use --force to switch anyway"
                )
            rt.pin = sel.Pin.new(backend, state)
            return f"{name}: switched to {backend}, pinned until it fails or release"
        if command == "drain":
            rt.drained.add(backend)
            return f"{name}: backend {backend} drained"
        rt.drained.discard(backend)
        return f"{name}: backend {backend} back in selection"

    async def _handle(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        command = request["command"]
        if command == "status":
            return self.status()
        if command == "ping":
            return {"message": "pong"}
        if command == "events":
            count = request.get("count", 20)
            if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= KEPT:
                raise RequestError(
                    f"count must be a whole number from 1 to {KEPT}", exitcodes.USAGE
                )
            return {"events": [r.to_json() for r in self.switches.last(count)]}
        if command == "reload":
            log.info("reload requested by uid %d", peer.uid)
            return {"message": await self.reload()}
        if command not in commands.OPERATOR:
            raise RequestError(f"unknown command {command!r}", exitcodes.USAGE)
        # Under the lock: a reload running meanwhile cannot swap the service
        # out between the check of the request and the switch.
        async with self._lock:
            rt = self._service_arg(request)
            pin, drained = rt.pin, set(rt.drained)
            message = self._operator_change(rt, command, request)
            decision = sel.select(
                rt.candidates(),
                current=rt.active,
                now=self.monotonic(),
                drained=rt.drained,
                pin=rt.pin,
                failback=rt.service.failback,
                preempt_delay=rt.service.preempt_delay,
            )
            if not await self._commit(rt, decision):
                # Nothing is left behind to happen later without the operator.
                rt.pin, rt.drained = pin, drained
                log.error(
                    "%s: %s by uid %d refused: the firewall refused the change",
                    rt.service.name,
                    command,
                    peer.uid,
                )
                raise RequestError(
                    f"{rt.service.name}: the firewall refused the change, nothing changed; "
                    "see the log"
                )
            log.info("%s (uid %d)", message, peer.uid)
            unsaved = self._save_state()
            if unsaved is not None:
                # In effect now, but an "ok" would be a lie about the restart.
                raise RequestError(
                    f"{message}, but the state file could not be written "
                    f"({unsaved}): this is lost when natfail restarts"
                )
        return {"message": message, "active": rt.active}
