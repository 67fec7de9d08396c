"""The foreign-NAT check: client flows to a public endpoint that another NAT
rule (another table, or a chain at a higher priority) took before natfail's
DNAT saw them. Whatever natfail installs, such a rule takes the traffic; the
operator hears of it in the log and in status.

A look is one conntrack dump per public address, for every service on it:
the kernel walks its whole hash table for each dump (about 3.5 ms of CPU on
a 24 GiB machine, even with the table empty), so a dump per service would
cost more than the probes of a small gateway. Each address is looked at once
per FOREIGN_CHECK_INTERVAL, and never more than FOREIGN_LOOKS_PER_SECOND
addresses a second; the first tick looks at once. A foreign rule usually
catches every service it matches, so the first look shows it."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from natfail.core import ruleset, status
from natfail.io.conntrack import ConntrackError, PublicFlows

if TYPE_CHECKING:
    from natfail.daemon import Daemon, ServiceRuntime

log = logging.getLogger("natfail")

FOREIGN_CHECK_INTERVAL = 15.0
FOREIGN_LOOKS_PER_SECOND = 2.0
MAX_CATCH_UP = 10.0
"""Seconds of a stalled loop counted (two main loop ticks): no burst of dumps after."""
MAX_LOOKS_DUE = 10.0
"""Looks that may pile up in the credit; the rest of a backlog is dropped."""
_NONE = PublicFlows(0, 0)


class ForeignCheck:
    def __init__(self, daemon: Daemon, interval: float = FOREIGN_CHECK_INTERVAL) -> None:
        self._d = daemon
        self._interval = interval
        self._last: float | None = None
        self._credit = 1.0
        """Looks due: the first tick looks at once."""
        self._queue: list[str] = []

    def _addresses(self) -> dict[str, list[ServiceRuntime]]:
        """The services with an active backend (the others have no DNAT to override),
        by public address."""
        by_address: dict[str, list[ServiceRuntime]] = {}
        for rt in self._d.services.values():
            if rt.active is not None:
                by_address.setdefault(str(rt.service.public.ip), []).append(rt)
        return by_address

    async def tick(self) -> None:
        now = self._d.monotonic()
        if self._last is None:
            self._last = now
        # A stalled loop does not catch up with a burst of dumps.
        elapsed, self._last = min(now - self._last, MAX_CATCH_UP), now
        addresses = self._addresses()
        if not addresses:
            return
        self._credit = min(
            self._credit
            + min(len(addresses) * elapsed / self._interval, FOREIGN_LOOKS_PER_SECOND * elapsed),
            MAX_LOOKS_DUE,
        )
        # No lock: a look reads the flows to one address and writes only rt.foreign,
        # and must not hold up probe results and commands while conntrack dumps.
        while self._credit > 1.0 - 1e-9:  # (sums of fractions fall just short)
            self._credit -= 1.0
            if not self._queue:
                self._queue = list(addresses)
            services = addresses.get(self._queue.pop())
            if services:
                await self._look(services)

    async def check_all(self) -> None:
        for services in self._addresses().values():
            await self._look(services)

    async def _look(self, services: list[ServiceRuntime]) -> None:
        publics = [rt.service.public for rt in services]
        try:
            flows = await self._d.firewall.conntrack.public_flows(publics)
        except ConntrackError as exc:
            log.error("cannot read the flows to %s: %s", publics[0].ip, exc)
            return
        for rt in services:
            self._judge(rt, flows.get(rt.service.public, _NONE))

    def _judge(self, rt: ServiceRuntime, flows: PublicFlows) -> None:
        service = rt.service
        public = service.public
        foreign = ruleset.foreign_targets(service, flows.by_reply_source)
        if foreign and foreign != rt.foreign:
            shown = status.describe_foreign(foreign)
            log.warning(
                "%s: client flows to %s are NATed to %s, not by natfail: another "
                "DNAT rule comes before natfail's and overrides it",
                service.name,
                public,
                shown,
            )
        elif rt.foreign and not foreign:
            log.info(
                "%s: no client flow to %s is NATed by another rule any more", service.name, public
            )
        rt.foreign = foreign
