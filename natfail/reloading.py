"""Carrying out a reload (SIGHUP or `natfailctl reload`).

The new config and its keys are read and checked off the event loop; the
plan is :func:`natfail.core.reload.plan`; its rules go in one transaction,
and only when that succeeded do the new states replace the running ones:
a reload takes effect whole or not at all."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from natfail import config as cfg
from natfail import exitcodes
from natfail.core import noise
from natfail.core import reload as planner
from natfail.io.control import RequestError
from natfail.oneline import error_line

if TYPE_CHECKING:
    from natfail.daemon import Daemon

log = logging.getLogger("natfail")


def read_config(path: Path, running: cfg.Config) -> tuple[cfg.Config, dict[str, noise.Keys]]:
    """The new config and its keys, all checked; run off the event loop, so
    that no file (a FIFO, a huge one) can stall the probes and the watchdog."""
    from natfail.daemon import load_all_keys

    new = cfg.load(path)
    problems = cfg.check_files(new)
    if problems:
        raise problems[0].error()
    if new.daemon != running.daemon:
        raise cfg.ConfigError(
            path,
            "daemon",
            "[daemon] settings change only with a restart (systemctl restart natfail)",
        )
    return new, load_all_keys(new.services)


class Reloader:
    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon

    async def reload(self) -> str:
        d = self._d
        d.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            return await self._reload()
        finally:
            d.notifier.notify("READY=1")
            d.tell_status()

    async def _reload(self) -> str:
        d = self._d
        path = d.config.path
        try:
            new, keys = await asyncio.to_thread(read_config, path, d.config)
        except (cfg.ConfigError, ValueError) as exc:
            log.error("reload refused, the running config stays: %s", exc)
            raise RequestError(f"reload refused: {exc}", exitcodes.USAGE) from None
        async with d.lock:
            try:
                now = d.monotonic()
                changed_keys = {
                    name
                    for name, rt in d.services.items()
                    if name in keys and rt.keys != keys[name]
                }
                plan = planner.plan(
                    {name: rt.state for name, rt in d.services.items()},
                    new.services,
                    changed_keys,
                    now,
                    d.role_of,
                )
                done = await d.executor.transact(
                    new.services, {name: s.active for name, s in plan.states.items()}
                )
            except Exception as exc:
                log.error("reload failed, the running config stays: %s", error_line(exc))
                log.debug("reload failure", exc_info=True)
                raise RequestError(
                    f"reload failed, the running config stays: {error_line(exc)}"
                ) from None
            if done.error is not None:
                log.error(
                    "reload refused, the running config stays: the firewall refused the new rules"
                )
                raise RequestError(
                    "reload refused: the firewall refused the new rules; the "
                    "running config stays (see the log)"
                )
            self._adopt(new, keys, plan, now)
            started = d.monotonic()
            for cleanup in plan.cleanups:
                await d.firewall.cleanup(cleanup)
            cleaned = done.unstrand + d.monotonic() - started
            for record in plan.switched:
                d.executor.switched(record, done.swap, cleaned)
            d.save_state()
        await d.update_roles()
        message = (
            f"reloaded {path}: {len(new.services)} service(s), {len(plan.added)} added, "
            f"{len(plan.removed)} removed"
        )
        log.info("%s", message)
        return message

    def _adopt(
        self,
        new: cfg.Config,
        keys: dict[str, noise.Keys],
        plan: planner.ReloadPlan,
        now: float,
    ) -> None:
        from natfail.daemon import ServiceRuntime

        d = self._d
        old = d.services
        services: dict[str, ServiceRuntime] = {}
        for name, state in plan.states.items():
            rt = old.get(name)
            if rt is None:
                services[name] = ServiceRuntime(state, keys[name])
                d.schedule.add(name, state.service.probe.interval, now, among=len(plan.states))
                d.declare_metrics(services[name])
                continue
            changed = rt.state.service != state.service or rt.keys != keys[name]
            rt.state, rt.keys = state, keys[name]
            services[name] = rt
            if changed:
                # Probe the changed service at once, then on its own period.
                d.schedule.soon(name, now, state.service.probe.interval)
        for name in plan.removed:
            d.schedule.remove(name)
            if d.metrics:
                d.metrics.forget(name)
        d.config = new
        d.services = services
        d.transport.retain(b.address for s in new.services for b in s.backends)
        d.prober.arm()
        d.agent_polls.ensure_started()
