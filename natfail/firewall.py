"""The daemon's hands on the firewall and conntrack: the transactions, and
the conntrack work that follows them. A dataplane whose calls are short
(``inline``: libnftables) makes its changes on the event loop; one that
waits on another process (the iptables helpers, whose commits grow with the
table) is called from one worker thread, and every reading of the whole
firewall is, too: off the loop.

It decides nothing: the rules come from :class:`natfail.core.ruleset.Builder`
over the actives the controllers chose, and what to clean comes as
:class:`natfail.core.controller.Cleanup` effects. It remembers the last
ruleset that was installed, so a repair is a comparison, and it knows the
thread ids its transactions come from, so the nftables monitor can tell
natfail's own changes from somebody else's."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Mapping

from natfail.core import ruleset
from natfail.core.controller import Cleanup
from natfail.core.model import Service
from natfail.io.conntrack import ConntrackError
from natfail.io.conntrack_worker import AsyncConntrack
from natfail.io.dataplane import Dataplane, DataplaneError

log = logging.getLogger("natfail")


class Firewall:
    def __init__(self, dataplane: Dataplane, conntrack: AsyncConntrack) -> None:
        self.dataplane = dataplane
        self.conntrack = conntrack
        self.installed: ruleset.Ruleset | None = None
        """What the last successful transaction (or check) left installed."""
        self._thread_ids: set[int] = set()
        self._builder: ruleset.Builder | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="natfail-firewall"
        )

    def own(self, thread_id: int) -> bool:
        """True when a firewall change came from natfail's own transaction."""
        return thread_id in self._thread_ids

    async def _in_thread(self, name: str, *args: object) -> object:
        def work() -> object:
            self._thread_ids.add(threading.get_native_id())
            return getattr(self.dataplane, name)(*args)

        if name == "apply" and getattr(self.dataplane, "inline", False):
            # A change short enough to make on the event loop (libnftables
            # changes two map elements in about 0.6 ms at 1000 services;
            # reading the whole table back takes 200 ms and stays off it).
            # Made from a worker thread it would wait for the GIL behind a
            # busy loop that releases and retakes it at every socket call:
            # measured 60 to 170 ms per switch at 1000 services.
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def build(
        self, services: tuple[Service, ...] | list[Service], actives: Mapping[str, str | None]
    ) -> ruleset.Ruleset:
        # No table until some service has a DNAT: natfail's NAT chains make the
        # kernel track client packets, and a flow tracked before its DNAT
        # exists stays un-NATed while the client keeps retrying. So the table
        # comes with the first DNAT, in one transaction.
        if all(a is None for a in actives.values()):
            return ruleset.Ruleset()
        if self._builder is None or self._builder.services != tuple(services):
            self._builder = ruleset.Builder(services)
        return self._builder.build(actives)

    async def read(self) -> tuple[ruleset.Ruleset, bool]:
        """What is installed and whether natfail's table is intact (one reading)."""
        result = await self._in_thread("inspect")
        assert isinstance(result, tuple)
        return result

    async def apply(self, desired: ruleset.Ruleset) -> str | None:
        """One transaction; None when it succeeded, else why not (logged)."""
        try:
            await self._in_thread("apply", desired)
        except DataplaneError as exc:
            log.error("firewall transaction failed, keeping the last good state: %s", exc)
            return str(exc)
        self.installed = desired
        return None

    async def unstrand(self, desired: ruleset.Ruleset, before: ruleset.Ruleset | None) -> None:
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

    async def cleanup(self, effect: Cleanup) -> None:
        try:
            result = await self.conntrack.remove_backend(effect.mark, effect.address)
        except ConntrackError as exc:
            log.error("%s: conntrack cleanup of %s failed: %s", effect.service, effect.backend, exc)
            return
        if result.found_after_first or result.left:
            log.info(
                "%s: conntrack cleanup of %s needed %d passes (%d left)",
                effect.service,
                effect.backend,
                result.passes,
                result.left,
            )
