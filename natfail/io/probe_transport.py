"""The probe transport: WireGuard handshake initiations over UDP, with
asyncio. Every probe has its own connected socket, so replies and ICMP
errors reach the probe they belong to and many probes can be in flight.

The handshake itself (what to send, whether a reply is valid) is decided in
`natfail.core.noise`; this module only moves bytes and measures time."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from natfail.config import Endpoint
from natfail.core import noise
from natfail.io.timestamps import TimestampClock

# WireGuard drops initiations from one peer that come faster than this
# (wireguard-go HandshakeInitationRate).
MIN_INITIATION_GAP = 0.020

# Failure reasons, stable words for logs, status and metrics.
UP = "ok"
UNDER_LOAD = "under-load"
TIMEOUT = "timeout"
INVALID = "invalid-replies"
UNREACHABLE = "port-unreachable"
NO_ROUTE = "no-route"
SEND_ERROR = "send-error"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    up: bool
    reason: str
    rtt: float | None = None
    """Seconds from the initiation to the reply that decided, when one did."""
    invalid_replies: int = 0
    detail: str = ""
    sent_at: float | None = None
    """The transport's monotonic clock when the initiation left, if it did."""

    @property
    def rtt_ms(self) -> float | None:
        return None if self.rtt is None else self.rtt * 1000.0


class ProbeTransport(Protocol):
    async def probe(self, keys: noise.Keys, target: Endpoint, timeout: float) -> ProbeResult: ...


def _classify_oserror(exc: OSError) -> str:
    if exc.errno == errno.ECONNREFUSED:
        return UNREACHABLE
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL):
        return NO_ROUTE
    return SEND_ERROR


class _Exchange(asyncio.DatagramProtocol):
    """One initiation's replies: the first decisive one wins, invalid ones
    are counted, anything after the decision is ignored."""

    def __init__(self, keys: noise.Keys, monotonic: Callable[[], float]) -> None:
        self.keys = keys
        # Set just before the initiation leaves; anything earlier cannot
        # be an answer to it.
        self.handshake: noise.Handshake | None = None
        self.monotonic = monotonic
        self.invalid = 0
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[tuple[noise.Result | OSError, float]] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.done.done():
            return
        if self.handshake is None:
            self.invalid += 1
            return
        now = self.monotonic()
        result = noise.consume(self.handshake, self.keys, data, now)
        if isinstance(result, noise.Ignored):
            self.invalid += 1
            return
        self.done.set_result((result, now))

    def error_received(self, exc: Exception) -> None:
        if not self.done.done() and isinstance(exc, OSError):
            self.done.set_result((exc, self.monotonic()))


class UdpProbeTransport:
    """ProbeTransport over real UDP sockets."""

    def __init__(
        self,
        clock: TimestampClock,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._monotonic = monotonic
        # A cookie is bound to the source address and port it was sent to,
        # so the next probe must leave from the same local port to use it.
        self._cookies: dict[tuple[bytes, Endpoint], tuple[noise.Cookie, tuple[str, int]]] = {}
        self._last_sent: dict[Endpoint, float] = {}

    async def _wait_for_slot(self, target: Endpoint) -> float:
        """Return once an initiation to `target` may leave, with the time.

        The caller must send without awaiting in between: the gap is kept
        between actual sends, and concurrent probes that wake together
        simply wait again for the next slot."""
        while True:
            now = self._monotonic()
            last = self._last_sent.get(target)
            if last is None or now >= last + MIN_INITIATION_GAP:
                return now
            await asyncio.sleep(last + MIN_INITIATION_GAP - now)

    def _fresh_cookie(
        self, key: tuple[bytes, Endpoint], now: float
    ) -> tuple[noise.Cookie | None, tuple[str, int] | None]:
        held = self._cookies.get(key)
        if held is None:
            return None, None
        if not held[0].fresh(now):
            del self._cookies[key]
            return None, None
        return held

    async def probe(self, keys: noise.Keys, target: Endpoint, timeout: float) -> ProbeResult:
        cookie_key = (keys.server_public_key, target)
        cookie, local = self._fresh_cookie(cookie_key, self._monotonic())
        loop = asyncio.get_running_loop()

        def exchange_factory() -> _Exchange:
            return _Exchange(keys, self._monotonic)

        remote = (str(target.ip), target.port)
        try:
            try:
                transport, exchange = await loop.create_datagram_endpoint(
                    exchange_factory, local_addr=local, remote_addr=remote
                )
            except OSError:
                if local is None:
                    raise
                # The cookie's port is taken: a cookie reply will come again.
                self._cookies.pop(cookie_key, None)
                cookie = None
                transport, exchange = await loop.create_datagram_endpoint(
                    exchange_factory, remote_addr=remote
                )
        except OSError as exc:
            return ProbeResult(False, _classify_oserror(exc), detail=exc.strerror or "")
        try:
            slot = await self._wait_for_slot(target)
            # No await from here to sendto: this initiation's timestamp must
            # be the newest one sent to the backend, and its send time the
            # one the next probe's gap is measured from.
            message, exchange.handshake = noise.new_initiation(
                keys, timestamp=self._clock.next(), cookie=cookie, now=slot
            )
            sent_at = self._monotonic()
            self._last_sent[target] = sent_at
            transport.sendto(message)
            try:
                outcome, at = await asyncio.wait_for(asyncio.shield(exchange.done), timeout)
            except asyncio.TimeoutError:
                reason = INVALID if exchange.invalid else TIMEOUT
                return ProbeResult(
                    False, reason, invalid_replies=exchange.invalid, sent_at=sent_at
                )
        finally:
            transport.close()
            # asyncio closes the socket a loop turn later; wait for it, so
            # that a cookie's port is free again for the next probe.
            await asyncio.shield(exchange.closed)
        if isinstance(outcome, OSError):
            return ProbeResult(
                False, _classify_oserror(outcome), invalid_replies=exchange.invalid,
                detail=outcome.strerror or "", sent_at=sent_at,
            )
        rtt = at - sent_at
        if isinstance(outcome, noise.CookieReceived):
            sockname = transport.get_extra_info("sockname")
            self._cookies[cookie_key] = (outcome.cookie, (str(sockname[0]), int(sockname[1])))
            return ProbeResult(True, UNDER_LOAD, rtt, exchange.invalid, sent_at=sent_at)
        return ProbeResult(True, UP, rtt, exchange.invalid, sent_at=sent_at)
