"""The foreign-NAT check: client flows to a public endpoint that another NAT
rule (another table, or a chain at a higher priority) took before natfail's
DNAT saw them. Whatever natfail installs, such a rule takes the traffic; the
operator hears of it in the log and in status.

Each service is looked at once per FOREIGN_CHECK_INTERVAL, a slice of the
services per tick, and never more than FOREIGN_CHECKS_PER_SECOND services a
second: each look is a conntrack dump, and a thousand services every 15 s
would cost a fifth of a core. A foreign rule usually catches every service
it matches, so the first service looked at shows it."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from natfail.core import ruleset, status
from natfail.io.conntrack import ConntrackError

if TYPE_CHECKING:
    from natfail.daemon import Daemon, ServiceRuntime

log = logging.getLogger("natfail")

FOREIGN_CHECK_INTERVAL = 15.0
FOREIGN_CHECKS_PER_SECOND = 2.0
MAX_CATCH_UP = 2.0


class ForeignCheck:
    def __init__(self, daemon: Daemon, interval: float = FOREIGN_CHECK_INTERVAL) -> None:
        self._d = daemon
        self._interval = interval
        self._last: float | None = None
        self._queue: list[str] = []

    async def tick(self) -> None:
        now = self._d.monotonic()
        if self._last is None:
            self._last = now
        # A stalled loop does not catch up with a burst of dumps.
        elapsed, self._last = min(now - self._last, MAX_CATCH_UP), now
        count = len(self._d.services)
        share = math.ceil(
            min(count * elapsed / self._interval, FOREIGN_CHECKS_PER_SECOND * elapsed, count)
        )
        if not share:
            return
        # No lock: a look reads one public endpoint and writes only rt.foreign,
        # and must not hold up probe results and commands while conntrack dumps.
        for _ in range(share):
            if not self._queue:
                self._queue = list(self._d.services)
            rt = self._d.services.get(self._queue.pop())
            if rt is not None:
                await self.check(rt)

    async def check_all(self) -> None:
        for rt in list(self._d.services.values()):
            await self.check(rt)

    async def check(self, rt: ServiceRuntime) -> None:
        if rt.active is None:
            return
        service = rt.service
        public = service.public
        try:
            flows = await self._d.firewall.conntrack.public_flows(public)
        except ConntrackError as exc:
            log.error("%s: cannot read the flows to %s: %s", service.name, public, exc)
            return
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
