"""The probe transport: WireGuard handshake initiations over UDP, with
asyncio.

One long-lived connected UDP socket per backend, reused by every probe of
that backend: one conntrack entry on the gateway per backend (not one per
probe), and the local port a cookie is bound to stays the same. Its reader
stays registered for the socket's life (no epoll change per probe). One
probe per backend is in flight at a time: the daemon never overlaps them,
and a second probe for the same backend waits until the first is done. A
reply or ICMP error counts only for the probe whose initiation it names
(receiver index) or quotes; one that names an earlier probe's initiation
(late, after that probe's timeout) is dropped, counted for nobody. A socket
whose send fails with an error that is neither the network's answer nor a
passing shortage of ours is closed and opened again at once, so an address
change under a long-lived socket costs no probe. `retain` closes the
sockets of backends no longer probed, `close` all of them.

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
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from natfail.config import Endpoint
from natfail.core import noise
from natfail.io.timestamps import TimestampClock

MIN_INITIATION_GAP = 0.030
"""Seconds between one initiation reaching a backend and the next one
leaving for it. WireGuard silently drops ("handshake flood") an initiation
from a peer that it handles within 20 ms of the last one it accepted from
that peer (wireguard-go HandshakeInitationRate, the kernel's
INITIATIONS_PER_SECOND); the kernel reads a coarse clock for it, one tick
(up to 10 ms) apart from the real time. So the gap is counted from the
arrival of the reply to the previous initiation when one came (the backend
handled it before it answered, however long it held it): counted from the
send, an initiation the backend handled late, on a busy host, was followed
too soon by the next one, which it dropped (a probe "timeout" of a healthy
backend). Without a reply, from the send, which is all we know."""

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
_RECENT = 8
"""Initiations of a backend's earlier probes that are remembered (their
first `noise.QUOTE_MIN` bytes: type, sender index, ephemeral key), so that
their late replies and ICMP errors are told from forgeries and dropped."""

# Send errors that leave the socket as good as it was: the network's answer
# (often an earlier ICMP error reported once), or a passing shortage or a
# firewall of ours. Any other one (EINVAL or EADDRNOTAVAIL when the source
# address the socket was connected from is gone, ENOTCONN, EBADF...) gets
# the backend a new socket.
_SOCKET_STAYS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.ENOPROTOOPT,
        errno.ENOBUFS,
        errno.ENOMEM,
        errno.EAGAIN,
        errno.EPERM,
        errno.EACCES,
        errno.EINTR,
    }
)


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

    def retain(self, targets: Iterable[Endpoint]) -> None:
        """Close what is held for every target not in `targets` (after a reload)."""
        ...

    def close(self) -> None: ...


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
    """One probe: what it sent and what arrived for it. Nothing here decides
    the result; `UdpProbeTransport._run` does, at the end."""

    __slots__ = (
        "_cookie_for",
        "accepted",
        "cookie",
        "cookie_pending",
        "cookies",
        "icmp",
        "invalid",
        "keys",
        "monotonic",
        "replied_at",
        "sent",
        "waiter",
    )

    def __init__(self, keys: noise.Keys, monotonic: Callable[[], float]) -> None:
        self.keys = keys
        self.monotonic = monotonic
        self.sent: dict[int, _Sent] = {}
        """By sender index: a reply names the initiation it answers."""
        self.invalid = 0
        self.accepted: tuple[float, float] | None = None
        """(arrival, send time of the initiation it answers)."""
        self.replied_at: float | None = None
        """When the latest valid reply (response or cookie reply) arrived."""
        self.cookie: noise.Cookie | None = None
        self.cookies = 0
        self.cookie_pending = False
        """A cookie reply arrived that no initiation with mac2 has answered yet."""
        self._cookie_for: set[int] = set()
        self.icmp: int | None = None
        """The errno of the first ICMP error that quoted one of our initiations."""
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def datagram(self, data: bytes, recent: deque[bytes]) -> None:
        if self.accepted is not None:
            return
        index = noise.receiver_index(data)
        sent = None if index is None else self.sent.get(index)
        if sent is None:
            if index is not None:
                named = index.to_bytes(4, "little")
                if any(r[4:8] == named for r in recent):
                    return  # late, for an earlier probe
            self.invalid += 1
            return
        now = self.monotonic()
        result = noise.consume(sent.handshake, self.keys, data, now)
        if isinstance(result, noise.Accepted):
            self.accepted = (now, sent.at)
            self.replied_at = now
            self.wake()
            return
        if isinstance(result, noise.CookieReceived) and index not in self._cookie_for:
            # (A second cookie reply to one initiation is a replay: a real
            # backend sends one.)
            self._cookie_for.add(sent.handshake.sender_index)
            self.replied_at = now
            self.cookie = result.cookie
            self.cookies += 1
            self.cookie_pending = True
            self.wake()
            return
        self.invalid += 1

    def icmp_error(self, number: int, quoted: bytes, recent: deque[bytes]) -> None:
        if any(noise.quotes_initiation(s.message, quoted) for s in self.sent.values()):
            if self.icmp is None:
                self.icmp = number
        elif not any(noise.quotes_initiation(r, quoted) for r in recent):
            self.invalid += 1


class _Channel:
    """One backend's long-lived socket, and the probe using it."""

    def __init__(self, target: Endpoint) -> None:
        self.target = target
        self.sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.lock = asyncio.Lock()
        self.exchange: _Exchange | None = None
        self.recent: deque[bytes] = deque(maxlen=_RECENT)
        self.cookie: tuple[bytes, noise.Cookie] | None = None
        """(server public key, cookie): bound to this socket's address and port."""
        self.last_sent: float | None = None
        """When the latest initiation left."""
        self.last_reply: float | None = None
        """When the latest valid reply (a handshake response or a cookie
        reply) to one of this channel's initiations arrived."""
        self.retired = False

    def quiet_since(self) -> float | None:
        """Since when the backend has handled no initiation of ours, as far
        as we can know (see MIN_INITIATION_GAP): the later of the last send
        and the last valid reply, the current probe's included."""
        times = [self.last_sent, self.last_reply]
        if self.exchange is not None:
            times.append(self.exchange.replied_at)
        known = [t for t in times if t is not None]
        return max(known) if known else None

    def open(
        self, opener: Callable[[Endpoint, tuple[Any, ...] | None], socket.socket]
    ) -> socket.socket:
        """The socket, opened if there is none; OSError when it cannot be."""
        if self.sock is not None:
            return self.sock
        loop = asyncio.get_running_loop()
        sock = opener(self.target, None)
        try:
            loop.add_reader(sock.fileno(), self.readable)
        except BaseException:
            sock.close()
            raise
        self.sock, self._loop = sock, loop
        return sock

    def close(self) -> None:
        sock, self.sock = self.sock, None
        self.cookie = None
        self.recent.clear()
        if sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        sock.close()

    def readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for n in range(_READ_BATCH):
            try:
                data = sock.recv(_BUFSIZE)
            except BlockingIOError:
                if n == 0:
                    # Woken with nothing to read: an error without sk_err (a
                    # local one) waits on the error queue.
                    self.drain_errors()
                return
            except OSError:
                # An ICMP error pending on the socket (sk_err), reported once
                # and then cleared; its copy on the error queue is what counts.
                # Read only then: one syscall less for every reply.
                self.drain_errors()
                continue
            exchange = self.exchange
            if exchange is not None:
                exchange.datagram(data, self.recent)
            # else: between probes, late for an earlier one; dropped

    def drain_errors(self) -> int:
        """Read the error queue; return how many errors on it came by ICMP."""
        sock = self.sock
        if sock is None:
            return 0
        seen = 0
        for _ in range(_READ_BATCH):
            try:
                data, ancillary, _, _ = sock.recvmsg(_BUFSIZE, _ANCILLARY, socket.MSG_ERRQUEUE)
            except OSError:  # BlockingIOError: the queue is empty
                break
            number = _icmp_errno(ancillary)
            if number is None:
                continue  # a local error: the send that caused it failed too
            seen += 1
            exchange = self.exchange
            if exchange is not None:
                exchange.icmp_error(number, data, self.recent)
        return seen


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
    """ProbeTransport over real UDP sockets, one per backend."""

    def __init__(
        self,
        clock: TimestampClock,
        monotonic: Callable[[], float] = time.monotonic,
        open_socket: Callable[[Endpoint, tuple[Any, ...] | None], socket.socket] = _open,
    ) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self._open = open_socket
        self._channels: dict[Endpoint, _Channel] = {}
        # Built now, not in the first probe round: it imports scapy.
        noise.initiation_template()

    @property
    def sockets(self) -> int:
        """Sockets open now (one per backend probed)."""
        return sum(c.sock is not None for c in self._channels.values())

    def retain(self, targets: Iterable[Endpoint]) -> None:
        keep = set(targets)
        for target in [t for t in self._channels if t not in keep]:
            self._retire(target)

    def close(self) -> None:
        for target in list(self._channels):
            self._retire(target)

    def _retire(self, target: Endpoint) -> None:
        channel = self._channels.pop(target)
        channel.retired = True
        # A probe running on it closes it when done (see probe).
        if not channel.lock.locked():
            channel.close()

    async def probe(self, keys: noise.Keys, target: Endpoint, timeout: float) -> ProbeResult:
        while True:
            channel = self._channels.get(target)
            if channel is None:
                channel = self._channels[target] = _Channel(target)
            # A second probe of the same backend waits for the first: one
            # exchange per socket, so nothing is counted for the wrong one.
            async with channel.lock:
                if channel.retired:
                    continue  # retired while this probe waited: a new channel
                try:
                    return await self._run(channel, keys, timeout)
                finally:
                    if channel.retired:
                        channel.close()

    async def _wait_for_slot(self, channel: _Channel, deadline: float | None) -> float | None:
        """Return once an initiation to the channel's backend may leave, with
        the time; None if that is after `deadline`. The caller must send
        without awaiting in between: the gap is kept from the actual send
        (or the reply to it) to the next actual send."""
        while True:
            now = self._monotonic()
            last = channel.quiet_since()
            if last is None or now >= last + MIN_INITIATION_GAP:
                return now
            if deadline is not None and last + MIN_INITIATION_GAP > deadline:
                return None
            await asyncio.sleep(last + MIN_INITIATION_GAP - now)

    def _send(
        self,
        channel: _Channel,
        exchange: _Exchange,
        cookie: noise.Cookie | None,
        slot: float,
    ) -> OSError | None:
        """Send one initiation now; the error if it could not leave."""
        # No await from here to the send: this initiation's timestamp must
        # be the newest one sent to the backend, and its send time the one
        # the next initiation's gap is measured from (or its reply's arrival).
        message, handshake = noise.new_initiation(
            exchange.keys, timestamp=self._clock.next(), cookie=cookie, now=slot
        )
        error: OSError | None = None
        reopened = False
        for _ in range(_SEND_ATTEMPTS):
            try:
                sock = channel.open(self._open)
            except OSError as exc:
                return exc
            sent_at = self._monotonic()
            try:
                sock.send(message)
            except OSError as exc:
                error = exc
                # An ICMP error that arrived earlier fails the next send
                # once (ECONNREFUSED, or EACCES for an ICMPv6 "prohibited");
                # it is no verdict on this initiation, so send it again.
                if channel.drain_errors() or exc.errno == errno.ECONNREFUSED:
                    continue
                if exc.errno in _SOCKET_STAYS:
                    return exc
                # The socket itself is broken (its source address gone, say):
                # a new one, once. A cookie's mac2 was for the old port; the
                # backend answers it with a new cookie reply.
                channel.close()
                if reopened:
                    return exc
                reopened = True
                continue
            channel.last_sent = sent_at
            sent = _Sent(handshake, message, sent_at)
            exchange.sent[handshake.sender_index] = sent
            channel.recent.append(message[: noise.QUOTE_MIN])
            return None
        return error

    async def _run(self, channel: _Channel, keys: noise.Keys, timeout: float) -> ProbeResult:
        exchange = _Exchange(keys, self._monotonic)
        cookie: noise.Cookie | None = None
        if channel.cookie is not None:
            server_key, held = channel.cookie
            if server_key == keys.server_public_key and held.fresh(self._monotonic()):
                cookie = held
            else:
                channel.cookie = None
        channel.exchange = exchange
        try:
            return await self._exchange(channel, exchange, timeout, cookie)
        finally:
            channel.exchange = None
            if exchange.replied_at is not None:
                channel.last_reply = exchange.replied_at
            if exchange.cookie is not None and channel.sock is not None:
                channel.cookie = (keys.server_public_key, exchange.cookie)

    async def _wait(self, exchange: _Exchange, remaining: float) -> None:
        """Until something arrives for the exchange, or `remaining` seconds."""
        loop = asyncio.get_running_loop()
        exchange.waiter = loop.create_future()
        timer = loop.call_later(remaining, exchange.wake)
        try:
            await exchange.waiter
        finally:
            timer.cancel()
            exchange.waiter = None

    async def _exchange(
        self,
        channel: _Channel,
        exchange: _Exchange,
        timeout: float,
        cookie: noise.Cookie | None,
    ) -> ProbeResult:
        slot = await self._wait_for_slot(channel, None)
        assert slot is not None
        error = self._send(channel, exchange, cookie, slot)
        if error is not None:
            return _failure(error, invalid=exchange.invalid)
        sent_at = min(s.at for s in exchange.sent.values())
        deadline = sent_at + timeout
        answered = 0
        late_error: OSError | None = None
        while exchange.accepted is None:
            if exchange.cookie_pending and answered < MAX_COOKIE_ANSWERS and late_error is None:
                exchange.cookie_pending = False
                answered += 1
                slot = await self._wait_for_slot(channel, deadline)
                if slot is None:
                    break
                if exchange.accepted is None:
                    late_error = self._send(channel, exchange, exchange.cookie, slot)
                continue
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                break
            await self._wait(exchange, remaining)

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
