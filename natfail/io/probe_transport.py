"""The probe transport: WireGuard handshake initiations over UDP, with
asyncio. Every probe has its own connected socket, so replies and ICMP
errors reach the probe they belong to and many probes can be in flight.

The handshake itself (what to send, whether a reply is valid, whether an
ICMP error quotes our initiation) is decided in `natfail.core.noise`; this
module only moves bytes and measures time.

What counts, within the probe's timeout:
- A handshake response that decrypts: up, and it wins over anything else
  that arrived before or after it.
- A cookie reply is answered at once (after WireGuard's per-peer gap) with
  a new initiation carrying mac2, from the same socket. It proves nothing by
  itself, since anyone who knows the server's public key can make one: a
  probe that gets only cookie replies fails, "cookie-only".
- An ICMP error counts only when it quotes one of this probe's initiations
  (read from the socket's error queue, IP_RECVERR); it is the result only if
  no response came by the timeout. Others are counted as invalid replies,
  so three forged port-unreachables cannot beat the real response.
- Errors of our own making (no file descriptors, no buffers, a local
  firewall refusing the send) are `local`: not the backend's fault.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from natfail.config import Endpoint
from natfail.core import noise
from natfail.io.timestamps import TimestampClock

# WireGuard drops initiations from one peer that come faster than this
# (wireguard-go HandshakeInitationRate).
MIN_INITIATION_GAP = 0.020

MAX_COOKIE_ANSWERS = 2
"""Cookie replies one probe answers with mac2. One is enough for a real
backend (its cookie secret changes every two minutes); the second covers a
change just between the reply and our answer."""

# Failure reasons, stable words for logs, status and metrics.
UP = "ok"
UNDER_LOAD = "under-load"
TIMEOUT = "timeout"
INVALID = "invalid-replies"
UNREACHABLE = "port-unreachable"
NO_ROUTE = "no-route"
SEND_ERROR = "send-error"
COOKIE_ONLY = "cookie-only"
"""Only cookie replies, even to an initiation with mac2: not proof of the key."""
LOCAL_ERROR = "local-error"
"""The gateway's own trouble (ProbeResult.local): says nothing of the backend."""

LOCAL_ERRNOS = frozenset(
    {
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOBUFS,
        errno.ENOMEM,
        errno.ENOSPC,
        # EACCES/EPERM on socket, bind or send: a local firewall or policy. A
        # pending ICMP error (ICMPv6 "administratively prohibited" is EACCES)
        # is told apart by the error queue before this set is consulted.
        errno.EACCES,
        errno.EPERM,
        # A full send buffer, or no ephemeral port left to bind.
        errno.EAGAIN,
        errno.EADDRINUSE,
    }
)

# Linux <linux/in.h>, <linux/in6.h>, <linux/errqueue.h>; Python 3.11's socket
# module lacks the first two.
_IP_RECVERR = 11
_IPV6_RECVERR = 25
_SO_EE_ORIGIN_ICMP = 2
_SO_EE_ORIGIN_ICMP6 = 3
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # errno, origin, type, code, pad, info, data
_RECVERR = {(socket.IPPROTO_IP, _IP_RECVERR), (socket.IPPROTO_IPV6, _IPV6_RECVERR)}

_BUFSIZE = 2048
_ANCILLARY = 512
_READ_BATCH = 64
"""Datagrams (and queued errors) read per wake-up, so a flood cannot hold
the event loop; the rest wait for the next turn."""
_SEND_ATTEMPTS = 4


@dataclass(frozen=True, slots=True)
class ProbeResult:
    up: bool
    reason: str
    rtt: float | None = None
    """Seconds from the initiation to the reply that decided, when one did."""
    invalid_replies: int = 0
    detail: str = ""
    sent_at: float | None = None
    """The transport's monotonic clock when the first initiation left, if it did."""
    local: bool = False
    """The probe failed on our side (reason LOCAL_ERROR): it says nothing
    about the backend, and must not count against it."""

    @property
    def rtt_ms(self) -> float | None:
        return None if self.rtt is None else self.rtt * 1000.0


class ProbeTransport(Protocol):
    async def probe(self, keys: noise.Keys, target: Endpoint, timeout: float) -> ProbeResult: ...


def _classify_errno(number: int | None) -> str:
    """The reason for an error that is the network's or the backend's."""
    if number in (errno.ECONNREFUSED, errno.ENOPROTOOPT):
        return UNREACHABLE
    if number in (
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EADDRNOTAVAIL,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EACCES,
    ):
        return NO_ROUTE
    return SEND_ERROR


def _failure(exc: OSError, sent_at: float | None = None, invalid: int = 0) -> ProbeResult:
    """The result of a socket call that failed before anything decided."""
    detail = exc.strerror or str(exc)
    if exc.errno in LOCAL_ERRNOS:
        return ProbeResult(
            False, LOCAL_ERROR, invalid_replies=invalid, detail=detail, sent_at=sent_at, local=True
        )
    return ProbeResult(
        False, _classify_errno(exc.errno), invalid_replies=invalid, detail=detail, sent_at=sent_at
    )


def _icmp_errno(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The errno of a queued error that came by ICMP; None for a local one."""
    for level, kind, data in ancillary:
        if (level, kind) in _RECVERR and len(data) >= _EXTENDED_ERR.size:
            number, origin, *_ = _EXTENDED_ERR.unpack_from(data)
            if origin in (_SO_EE_ORIGIN_ICMP, _SO_EE_ORIGIN_ICMP6):
                return int(number)
    return None


@dataclass(frozen=True, slots=True)
class _Sent:
    handshake: noise.Handshake
    message: bytes
    at: float


class _Exchange:
    """One probe's socket and what arrived on it. Nothing here decides
    the result; `UdpProbeTransport.probe` does, at the end."""

    def __init__(
        self, sock: socket.socket, keys: noise.Keys, monotonic: Callable[[], float]
    ) -> None:
        self.sock = sock
        self.keys = keys
        self.monotonic = monotonic
        self.sent: list[_Sent] = []
        self.invalid = 0
        self.accepted: tuple[float, float] | None = None
        """(arrival, send time of the initiation it answers)."""
        self.cookie: noise.Cookie | None = None
        self.cookies = 0
        self.cookie_pending = False
        """A cookie reply arrived that no initiation with mac2 has answered yet."""
        self._cookie_for: set[int] = set()
        self.icmp: int | None = None
        """The errno of the first ICMP error that quoted one of our initiations."""
        self.changed = asyncio.Event()

    def readable(self) -> None:
        self.drain_errors()
        for _ in range(_READ_BATCH):
            try:
                data = self.sock.recv(_BUFSIZE)
            except BlockingIOError:
                return
            except OSError:
                # An ICMP error pending on the socket, reported once and
                # then cleared; its copy on the error queue is what counts.
                continue
            self._datagram(data)

    def drain_errors(self) -> int:
        """Read the error queue; return how many errors on it came by ICMP."""
        seen = 0
        for _ in range(_READ_BATCH):
            try:
                data, ancillary, _, _ = self.sock.recvmsg(_BUFSIZE, _ANCILLARY, socket.MSG_ERRQUEUE)
            except OSError:  # BlockingIOError: the queue is empty
                break
            number = _icmp_errno(ancillary)
            if number is None:
                continue  # a local error: the send that caused it failed too
            seen += 1
            if any(noise.quotes_initiation(sent.message, data) for sent in self.sent):
                if self.icmp is None:
                    self.icmp = number
            else:
                self.invalid += 1
        return seen

    def _datagram(self, data: bytes) -> None:
        if self.accepted is not None:
            return
        now = self.monotonic()
        # Newest first: after a cookie reply, the answer to the initiation
        # with mac2 is the one expected. Each check starts with the index,
        # so the other initiations cost nothing.
        for sent in reversed(self.sent):
            result = noise.consume(sent.handshake, self.keys, data, now)
            if isinstance(result, noise.Accepted):
                self.accepted = (now, sent.at)
                self.changed.set()
                return
            if isinstance(result, noise.CookieReceived):
                if sent.handshake.sender_index in self._cookie_for:
                    break  # a replayed cookie reply: a real backend sends one
                self._cookie_for.add(sent.handshake.sender_index)
                self.cookie = result.cookie
                self.cookies += 1
                self.cookie_pending = True
                self.changed.set()
                return
        self.invalid += 1


def _open(target: Endpoint, local: tuple[Any, ...] | None) -> socket.socket:
    family = socket.AF_INET6 if target.ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
        if local is not None:
            sock.bind(local)
        sock.connect(target.sockaddr())
    except BaseException:
        sock.close()
        raise
    return sock


class UdpProbeTransport:
    """ProbeTransport over real UDP sockets."""

    def __init__(
        self,
        clock: TimestampClock,
        monotonic: Callable[[], float] = time.monotonic,
        open_socket: Callable[[Endpoint, tuple[Any, ...] | None], socket.socket] = _open,
    ) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self._open = open_socket
        # A cookie is bound to the source address and port it was sent to,
        # so the next probe must leave from the same local port to use it.
        self._cookies: dict[tuple[bytes, Endpoint], tuple[noise.Cookie, tuple[Any, ...]]] = {}
        self._last_sent: dict[Endpoint, float] = {}

    async def _wait_for_slot(self, target: Endpoint, deadline: float | None) -> float | None:
        """Return once an initiation to `target` may leave, with the time;
        None if that is after `deadline`.

        The caller must send without awaiting in between: the gap is kept
        between actual sends, and concurrent probes that wake together
        simply wait again for the next slot."""
        while True:
            now = self._monotonic()
            last = self._last_sent.get(target)
            if last is None or now >= last + MIN_INITIATION_GAP:
                return now
            if deadline is not None and last + MIN_INITIATION_GAP > deadline:
                return None
            await asyncio.sleep(last + MIN_INITIATION_GAP - now)

    def _fresh_cookie(
        self, key: tuple[bytes, Endpoint], now: float
    ) -> tuple[noise.Cookie | None, tuple[Any, ...] | None]:
        held = self._cookies.get(key)
        if held is None:
            return None, None
        if not held[0].fresh(now):
            del self._cookies[key]
            return None, None
        return held

    def _send(
        self,
        exchange: _Exchange,
        keys: noise.Keys,
        target: Endpoint,
        cookie: noise.Cookie | None,
        slot: float,
    ) -> OSError | None:
        """Send one initiation now; the error if it could not leave."""
        # No await from here to the send: this initiation's timestamp must
        # be the newest one sent to the backend, and its send time the one
        # the next initiation's gap is measured from.
        message, handshake = noise.new_initiation(
            keys, timestamp=self._clock.next(), cookie=cookie, now=slot
        )
        error: OSError | None = None
        for _ in range(_SEND_ATTEMPTS):
            sent_at = self._monotonic()
            try:
                exchange.sock.send(message)
            except OSError as exc:
                error = exc
                # An ICMP error that arrived earlier fails the next send
                # once (ECONNREFUSED, or EACCES for an ICMPv6 "prohibited");
                # it is no verdict on this initiation, so send it again.
                if exchange.drain_errors() or exc.errno == errno.ECONNREFUSED:
                    continue
                return exc
            self._last_sent[target] = sent_at
            exchange.sent.append(_Sent(handshake, message, sent_at))
            return None
        return error

    async def probe(self, keys: noise.Keys, target: Endpoint, timeout: float) -> ProbeResult:
        cookie_key = (keys.server_public_key, target)
        cookie, local = self._fresh_cookie(cookie_key, self._monotonic())
        try:
            try:
                sock = self._open(target, local)
            except OSError:
                if local is None:
                    raise
                # The cookie's port is taken: a cookie reply will come again.
                self._cookies.pop(cookie_key, None)
                cookie = None
                sock = self._open(target, None)
        except OSError as exc:
            return _failure(exc)
        exchange = _Exchange(sock, keys, self._monotonic)
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        try:
            try:
                loop.add_reader(fd, exchange.readable)
            except OSError as exc:
                return _failure(exc)
            try:
                return await self._run(exchange, keys, target, timeout, cookie)
            finally:
                loop.remove_reader(fd)
                if exchange.cookie is not None:
                    self._cookies[cookie_key] = (exchange.cookie, sock.getsockname())
        finally:
            # Closed at once (no asyncio transport), so a cookie's port is
            # free again for the next probe.
            sock.close()

    async def _run(
        self,
        exchange: _Exchange,
        keys: noise.Keys,
        target: Endpoint,
        timeout: float,
        cookie: noise.Cookie | None,
    ) -> ProbeResult:
        slot = await self._wait_for_slot(target, None)
        assert slot is not None
        error = self._send(exchange, keys, target, cookie, slot)
        if error is not None:
            return _failure(error, invalid=exchange.invalid)
        sent_at = exchange.sent[0].at
        deadline = sent_at + timeout
        answered = 0
        late_error: OSError | None = None
        while exchange.accepted is None:
            if exchange.cookie_pending and answered < MAX_COOKIE_ANSWERS and late_error is None:
                exchange.cookie_pending = False
                answered += 1
                slot = await self._wait_for_slot(target, deadline)
                if slot is None:
                    break
                if exchange.accepted is None:
                    late_error = self._send(exchange, keys, target, exchange.cookie, slot)
                continue
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                break
            exchange.changed.clear()
            try:
                await asyncio.wait_for(exchange.changed.wait(), remaining)
            except TimeoutError:
                break

        invalid = exchange.invalid
        if exchange.accepted is not None:
            at, answered_at = exchange.accepted
            reason = UNDER_LOAD if exchange.cookies else UP
            return ProbeResult(True, reason, at - answered_at, invalid, sent_at=sent_at)
        if exchange.icmp is not None:
            return ProbeResult(
                False,
                _classify_errno(exchange.icmp),
                invalid_replies=invalid,
                detail=os.strerror(exchange.icmp),
                sent_at=sent_at,
            )
        if late_error is not None:
            return _failure(late_error, sent_at, invalid)
        if exchange.cookies:
            return ProbeResult(
                False,
                COOKIE_ONLY,
                invalid_replies=invalid,
                detail="only cookie replies, no handshake response",
                sent_at=sent_at,
            )
        return ProbeResult(
            False, INVALID if invalid else TIMEOUT, invalid_replies=invalid, sent_at=sent_at
        )
