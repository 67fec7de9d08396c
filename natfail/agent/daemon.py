"""``natfail agent``: the agent's UDP server on ``listen``.

A datagram is opened by :mod:`natfail.core.agent_channel` against the keys
of the interfaces it serves and the gateways it obeys; anything that does
not authenticate, is not fresh (:class:`~natfail.core.agent_channel.ReplayGuard`)
or does not decode gets no answer and changes nothing. A ``Poll`` is
answered with the interface's recent peers (paged), an ``Activate`` by
bringing the given clients over (:meth:`WireGuard.activate`, in a worker
thread, one at a time per interface) and an ``Activated`` reply.

The interfaces are read in a worker thread: at start, then at most once a
second for reports, and every :data:`REFRESH` seconds for their keys (an
interface that is missing at start is looked for again then)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from natfail.agent.config import AgentConfig
from natfail.agent.wireguard import (
    Interface,
    WireGuard,
    WireGuardError,
    open_interface,
    recent,
)
from natfail.core import agent_channel as ch
from natfail.core import agent_messages as msg

log = logging.getLogger("natfail.agent")

REFRESH = 10.0
"""Seconds between re-reads of every interface's keys."""
KEPT_ACTIVATIONS = 64
"""Activations remembered per interface, for a gateway's repeated request."""
REPORT_MAX_AGE = 1.0
"""A report is made from a reading at most this old."""


@dataclass
class _Served:
    name: str
    wireguard: WireGuard
    reading: Interface | None = None
    read_at: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    activations: dict[tuple[int, int], asyncio.Future[msg.Activated | None]] = field(
        default_factory=dict
    )
    """The recent activations by (epoch, page): a gateway that asks again (its
    answer was lost or late) gets the same answer, and the clients are not
    brought over twice (a second initiation right after the first is dropped
    by the client as a flood, and the first's response no longer matches)."""
    epoch: int = 0
    """The highest activation epoch a gateway sent for this interface: the
    gateways of a pair read it to agree on the active backend. Not kept
    across a restart; the deciding gateway records it again when it sees it
    missing."""


def report_version(peers: list[tuple[bytes, str]]) -> int:
    """Changes when the set of recent peers or one of their endpoints does."""
    digest = hashlib.blake2s(digest_size=8)
    for key, endpoint in sorted(peers):
        digest.update(key + endpoint.encode() + b"\0")
    return int.from_bytes(digest.digest(), "little")


class Agent(asyncio.DatagramProtocol):
    def __init__(
        self,
        config: AgentConfig,
        *,
        opener: Callable[[str], WireGuard] = open_interface,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._served = {name: _Served(name, opener(name)) for name in config.interfaces}
        self._by_key: dict[bytes, _Served] = {}
        self._identities: list[ch.AgentIdentity] = []
        self._guard = ch.ReplayGuard()
        self._gateways = frozenset(config.gateways)
        self._clock = clock
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.ignored = 0
        self.stopping = asyncio.Event()

    # -- the interfaces -------------------------------------------------------------

    async def refresh(self) -> None:
        """Reads every interface and takes its key as an identity."""
        by_key: dict[bytes, _Served] = {}
        for served in self._served.values():
            try:
                reading = await asyncio.to_thread(served.wireguard.read)
            except WireGuardError as exc:
                if served.reading is not None or not self._by_key:
                    log.warning("%s (retrying every %.0f s)", exc, REFRESH)
                served.reading = None
                continue
            if served.reading is None:
                log.info("serving %s (%d peers)", served.name, len(reading.peers))
            served.reading, served.read_at = reading, self._clock()
            by_key[reading.public_key] = served
        self._by_key = by_key
        self._identities = [
            ch.AgentIdentity(s.reading.private_key) for s in by_key.values() if s.reading
        ]

    async def _reading(self, served: _Served) -> Interface | None:
        if served.reading is None or self._clock() - served.read_at > REPORT_MAX_AGE:
            try:
                served.reading = await asyncio.to_thread(served.wireguard.read)
                served.read_at = self._clock()
            except WireGuardError as exc:
                log.warning("%s", exc)
                return None
        return served.reading

    # -- the datagrams ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        request = ch.open_request(data, self._identities, self._gateways)
        if isinstance(request, ch.Ignored):
            self.ignored += 1
            return
        decoded = msg.decode_request(request.payload)
        if decoded is None or not self._guard.accept(request):
            self.ignored += 1
            return
        served = self._by_key.get(request.agent_public)
        if served is None:
            return
        task = asyncio.get_running_loop().create_task(self._answer(served, request, decoded, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def error_received(self, exc: Exception) -> None:
        log.debug("socket error: %s", exc)

    async def _answer(
        self,
        served: _Served,
        request: ch.Request,
        decoded: msg.Poll | msg.Activate,
        addr: tuple[str | int, ...],
    ) -> None:
        try:
            reply = await self._reply(served, decoded)
        except Exception:
            log.exception("%s: answering a gateway failed", served.name)
            return
        if reply is not None and self._transport is not None:
            self._transport.sendto(ch.new_reply(request, msg.encode(reply)), addr)

    async def _reply(
        self, served: _Served, decoded: msg.Poll | msg.Activate
    ) -> msg.Report | msg.Activated | None:
        if isinstance(decoded, msg.Poll):
            reading = await self._reading(served)
            if reading is None:
                return None
            now = self._clock()
            peers = [
                msg.ReportedPeer(
                    p.public_key,
                    p.endpoint,
                    min(int((now - p.last_handshake) * 1000), 2**32 - 1),
                )
                for p in recent(reading, now)
                if p.endpoint is not None
            ]
            version = report_version([(p.public_key, str(p.endpoint)) for p in peers])
            clock_ns = time.time_ns()
            if version == decoded.version:
                peers = []
            pages = msg.paginate_report(version, clock_ns, tuple(peers), served.epoch)
            page = min(decoded.page, len(pages) - 1)
            return pages[page]
        served.epoch = max(served.epoch, decoded.epoch)
        if not decoded.peers:
            # Only a record of who is active: nothing to bring over.
            return msg.Activated(decoded.epoch, decoded.page, 0, 0, 0)
        key = (decoded.epoch, decoded.page)
        earlier = served.activations.get(key)
        if earlier is not None:
            return await asyncio.shield(earlier)
        future: asyncio.Future[msg.Activated | None] = asyncio.get_running_loop().create_future()
        served.activations[key] = future
        while len(served.activations) > KEPT_ACTIVATIONS:
            del served.activations[next(iter(served.activations))]
        try:
            result = await self._activate(served, decoded)
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a repeat re-raises it, none need be
            raise
        except BaseException:
            future.cancel()
            raise
        future.set_result(result)
        if result is None:
            del served.activations[key]  # it failed: a repeat may try again
        return result

    async def _activate(self, served: _Served, decoded: msg.Activate) -> msg.Activated | None:
        targets = [(t.public_key, t.endpoint) for t in decoded.peers]
        async with served.lock:
            try:
                done = await asyncio.to_thread(served.wireguard.activate, targets)
            except WireGuardError as exc:
                log.warning("activation failed: %s", exc)
                return None
        served.reading = None  # the peers changed under the last reading
        log.info(
            "%s: activated %d of %d clients, %d of them re-added (epoch %d, page %d/%d) in %.1f ms",
            served.name,
            done.initiated,
            len(targets),
            done.cleared,
            decoded.epoch,
            decoded.page + 1,
            decoded.pages,
            done.elapsed * 1000,
        )
        return msg.Activated(
            decoded.epoch, decoded.page, done.known, done.initiated, int(done.elapsed * 1e6)
        )

    # -- the lifecycle -----------------------------------------------------------------

    async def run(self, sock: socket.socket | None = None) -> int:
        """Serves until SIGTERM/SIGINT or :attr:`stopping`; ``sock``, when given,
        is an already bound UDP socket to serve on instead of ``listen``."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        await self.refresh()
        if sock is None:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: self, local_addr=self.config.listen.sockaddr()
            )
        else:
            transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)
        log.info(
            "natfail agent listening on %s for %d gateway(s), interfaces %s",
            self.config.listen,
            len(self.config.gateways),
            ", ".join(self.config.interfaces),
        )
        try:
            while not self.stopping.is_set():
                try:
                    await asyncio.wait_for(self.stopping.wait(), REFRESH)
                except TimeoutError:
                    await self.refresh()
        finally:
            transport.close()
            for task in list(self._tasks):
                task.cancel()
        log.info("natfail agent stopped")
        return 0
