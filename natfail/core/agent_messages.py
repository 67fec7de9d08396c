"""The messages a gateway and a ``natfail agent`` exchange, as bytes.

These are the payloads that ``natfail.core.agent_channel`` encrypts and
authenticates; this module only lays them out. Every exchange pairs one
request with one reply:

- ``Poll(version, page)`` -> ``Report``: "send me page ``page`` of your peers,
  unless your report is still at ``version``";
- ``Activate(epoch, peers, page, pages)`` -> ``Activated``: "you are active
  now; bring these clients over".

Layout: big-endian (network order), fixed-width fields, every message
starting with the format byte ``FORMAT`` (1) and a kind byte. The request
and reply kinds differ, so a reply is never taken for a request or back::

    Poll       01 01  version u64  page u32                               14 bytes
    Activate   01 02  epoch u64  page u32  pages u32  count u16  Target * count
    Report     01 03  version u64  clock_ns i64  epoch u64  page u32  pages u32
                      count u16  ReportedPeer * count
    Activated  01 04  epoch u64  page u32  known u32  initiated u32
                      elapsed_us u64                                     30 bytes

    Target        public_key(32)  family u8 (4 or 6)  address(4 or 16)  port u16
    ReportedPeer  Target's fields, then handshake_age_ms u32

Decoding is strict: the exact length the counts imply (no trailing byte),
known format and kind, family 4 or 6, port 1..65535, ``page < pages``, at
most ``PAGE_PEERS`` entries. ``decode_request`` and ``decode_reply`` return
the message or None and never raise, whatever the bytes. ``encode`` raises
``ValueError`` on values the layout cannot carry (an IPv6 scope id), and
the message classes refuse out-of-range fields when built.

No message carries a private or preshared key: no type here has a field
for one.

Paging. A page holds at most ``PAGE_PEERS`` = 1000 peers: a full page of
IPv6 peers is 36 + 1000 * 55 = 55036 bytes (a report) or 20 + 1000 * 51 =
51020 bytes (an activation), under the channel's limit (``MAX_DATAGRAM``
less the channel's 76 or 148 bytes); the module checks this on import. A
service's thousand clients therefore fit in one exchange, and more take one
exchange per page. How the pages are meant to be used:

- ``Report.version`` names the agent's current report (it changes whenever
  the set of peers or their endpoints does); the gateway assembles pages
  ``0 .. pages-1`` of one version and starts over when the version changes
  under it. An agent should start its versions from something that does not
  repeat across restarts (its clock at the change, say), so that a restart
  never presents a different report under a version a gateway already has.
- An agent whose report is still at the polled ``version`` answers with one
  empty page of that version (``paginate_report(version, clock_ns, ())``):
  a gateway that sees its own version back keeps what it has. The reply
  still carries the agent's clock, so reachability and skew stay measured
  without resending the peers.
- ``clock_ns`` is the agent's wall clock (Unix ns) when it built the reply;
  signed, so a clock set before 1970 still reports as the skew it is.
- ``Report.epoch`` is the highest activation epoch the interface has
  recorded (0: none): the backend whose agent holds the highest epoch of a
  service is the one the deciding gateway made active last, which a
  following gateway of a pair reads.
- Every page of an activation carries the same ``epoch``; ``Activated``
  answers one page (``known``: how many of its peers the agent has on its
  interfaces, ``initiated``: how many handshakes it started,
  ``elapsed_us``: how long that took).
- A gateway matches a reply to its request: ``Poll`` -> ``Report``,
  ``Activate`` -> ``Activated`` with the same epoch and page.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from natfail.core.agent_channel import MAX_REPLY_PAYLOAD, MAX_REQUEST_PAYLOAD
from natfail.core.model import Endpoint

__all__ = [
    "FORMAT",
    "PAGE_PEERS",
    "Activate",
    "Activated",
    "Poll",
    "Report",
    "ReportedPeer",
    "Target",
    "decode_reply",
    "decode_request",
    "encode",
    "paginate_activate",
    "paginate_report",
]

FORMAT: Final = 1
KIND_POLL: Final = 1
KIND_ACTIVATE: Final = 2
KIND_REPORT: Final = 3
KIND_ACTIVATED: Final = 4

PAGE_PEERS: Final = 1000
KEY_SIZE: Final = 32

_U16: Final = 0xFFFF
_U32: Final = 0xFFFFFFFF
_U64: Final = 2**64 - 1
_I64_MIN: Final = -(2**63)
_I64_MAX: Final = 2**63 - 1

_POLL = struct.Struct(">BBQI")
_ACTIVATE = struct.Struct(">BBQIIH")
_REPORT = struct.Struct(">BBQqQIIH")
_ACTIVATED = struct.Struct(">BBQIIIQ")
_PORT = struct.Struct(">H")
_AGE = struct.Struct(">I")
_ADDRESS_SIZE: Final = {4: 4, 6: 16}

TARGET_MAX: Final = KEY_SIZE + 1 + 16 + _PORT.size  # 51
REPORTED_PEER_MAX: Final = TARGET_MAX + _AGE.size  # 55

if _REPORT.size + PAGE_PEERS * REPORTED_PEER_MAX > MAX_REPLY_PAYLOAD:  # pragma: no cover
    raise AssertionError("a full report page does not fit in one reply")
if _ACTIVATE.size + PAGE_PEERS * TARGET_MAX > MAX_REQUEST_PAYLOAD:  # pragma: no cover
    raise AssertionError("a full activation page does not fit in one request")


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in {low}..{high}")


def _check_key(value: bytes) -> None:
    if not isinstance(value, bytes) or len(value) != KEY_SIZE:
        raise ValueError(f"public_key must be {KEY_SIZE} bytes")


def _check_page(page: int, pages: int, count: int) -> None:
    _check_int("page", page, 0, _U32)
    _check_int("pages", pages, 1, _U32)
    if page >= pages:
        raise ValueError(f"page {page} is not below pages {pages}")
    if count > PAGE_PEERS:
        raise ValueError(f"{count} peers exceed a page's {PAGE_PEERS}")


# --- the messages -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """A client to bring over: its WireGuard public key and where it is."""

    public_key: bytes
    endpoint: Endpoint

    def __post_init__(self) -> None:
        _check_key(self.public_key)
        if not isinstance(self.endpoint, Endpoint):
            raise ValueError("endpoint must be an Endpoint")


@dataclass(frozen=True, slots=True)
class ReportedPeer:
    """A peer with a recent handshake on one of the agent's interfaces."""

    public_key: bytes
    endpoint: Endpoint
    handshake_age_ms: int

    def __post_init__(self) -> None:
        _check_key(self.public_key)
        if not isinstance(self.endpoint, Endpoint):
            raise ValueError("endpoint must be an Endpoint")
        _check_int("handshake_age_ms", self.handshake_age_ms, 0, _U32)


@dataclass(frozen=True, slots=True)
class Poll:
    """Gateway -> agent: page ``page`` of your report, unless it is at ``version``."""

    version: int
    page: int = 0

    def __post_init__(self) -> None:
        _check_int("version", self.version, 0, _U64)
        _check_int("page", self.page, 0, _U32)


@dataclass(frozen=True, slots=True)
class Report:
    """Agent -> gateway: one page of the peers with a recent handshake."""

    version: int
    clock_ns: int
    peers: tuple[ReportedPeer, ...]
    page: int
    pages: int
    epoch: int = 0
    """The highest activation epoch the interface recorded (0: none)."""

    def __post_init__(self) -> None:
        _check_int("version", self.version, 0, _U64)
        _check_int("clock_ns", self.clock_ns, _I64_MIN, _I64_MAX)
        _check_int("epoch", self.epoch, 0, _U64)
        if not isinstance(self.peers, tuple) or not all(
            isinstance(peer, ReportedPeer) for peer in self.peers
        ):
            raise ValueError("peers must be a tuple of ReportedPeer")
        _check_page(self.page, self.pages, len(self.peers))


@dataclass(frozen=True, slots=True)
class Activate:
    """Gateway -> agent: you are active since ``epoch``; bring these clients over."""

    epoch: int
    peers: tuple[Target, ...]
    page: int
    pages: int

    def __post_init__(self) -> None:
        _check_int("epoch", self.epoch, 0, _U64)
        if not isinstance(self.peers, tuple) or not all(
            isinstance(peer, Target) for peer in self.peers
        ):
            raise ValueError("peers must be a tuple of Target")
        _check_page(self.page, self.pages, len(self.peers))


@dataclass(frozen=True, slots=True)
class Activated:
    """Agent -> gateway: what one page of an activation did."""

    epoch: int
    page: int
    known: int
    initiated: int
    elapsed_us: int

    def __post_init__(self) -> None:
        _check_int("epoch", self.epoch, 0, _U64)
        _check_int("page", self.page, 0, _U32)
        _check_int("known", self.known, 0, _U32)
        _check_int("initiated", self.initiated, 0, _U32)
        _check_int("elapsed_us", self.elapsed_us, 0, _U64)


RequestMessage = Poll | Activate
ReplyMessage = Report | Activated
Message = RequestMessage | ReplyMessage


def _pages(count: int) -> int:
    return max(1, -(-count // PAGE_PEERS))


def paginate_report(
    version: int, clock_ns: int, peers: Sequence[ReportedPeer], epoch: int = 0
) -> list[Report]:
    """The report in pages of at most ``PAGE_PEERS`` peers, in order; one
    empty page when there are no peers."""
    pages = _pages(len(peers))
    return [
        Report(
            version, clock_ns, tuple(peers[i * PAGE_PEERS : (i + 1) * PAGE_PEERS]), i, pages, epoch
        )
        for i in range(pages)
    ]


def paginate_activate(epoch: int, targets: Sequence[Target]) -> list[Activate]:
    """The activation in pages of at most ``PAGE_PEERS`` targets, in order;
    one empty page when there are none (it still records the epoch)."""
    pages = _pages(len(targets))
    return [
        Activate(epoch, tuple(targets[i * PAGE_PEERS : (i + 1) * PAGE_PEERS]), i, pages)
        for i in range(pages)
    ]


# --- encoding -----------------------------------------------------------------------


def _endpoint_bytes(endpoint: Endpoint) -> bytes:
    ip = endpoint.ip
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise ValueError(f"{endpoint}: an IPv6 scope id cannot be sent")
    return bytes((ip.version,)) + ip.packed + _PORT.pack(endpoint.port)


def encode(message: Message) -> bytes:
    """The message's bytes (at most the channel's payload limit)."""
    if isinstance(message, Poll):
        return _POLL.pack(FORMAT, KIND_POLL, message.version, message.page)
    if isinstance(message, Activate):
        head = _ACTIVATE.pack(
            FORMAT, KIND_ACTIVATE, message.epoch, message.page, message.pages, len(message.peers)
        )
        return head + b"".join(t.public_key + _endpoint_bytes(t.endpoint) for t in message.peers)
    if isinstance(message, Report):
        head = _REPORT.pack(
            FORMAT,
            KIND_REPORT,
            message.version,
            message.clock_ns,
            message.epoch,
            message.page,
            message.pages,
            len(message.peers),
        )
        return head + b"".join(
            p.public_key + _endpoint_bytes(p.endpoint) + _AGE.pack(p.handshake_age_ms)
            for p in message.peers
        )
    if isinstance(message, Activated):
        return _ACTIVATED.pack(
            FORMAT,
            KIND_ACTIVATED,
            message.epoch,
            message.page,
            message.known,
            message.initiated,
            message.elapsed_us,
        )
    raise TypeError(f"not an agent message: {type(message).__name__}")


# --- decoding -----------------------------------------------------------------------


def _read_entries(
    data: bytes, offset: int, count: int, with_age: bool
) -> list[tuple[bytes, Endpoint, int]] | None:
    """``count`` entries from ``offset`` to exactly the end of ``data``, else None."""
    entries: list[tuple[bytes, Endpoint, int]] = []
    end = len(data)
    for _ in range(count):
        family_at = offset + KEY_SIZE
        if family_at >= end:
            return None
        size = _ADDRESS_SIZE.get(data[family_at])
        if size is None:
            return None
        address_at = family_at + 1
        port_at = address_at + size
        stop = port_at + _PORT.size + (_AGE.size if with_age else 0)
        if stop > end:
            return None
        packed = data[address_at:port_at]
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = (
            ipaddress.IPv4Address(packed) if size == 4 else ipaddress.IPv6Address(packed)
        )
        (port,) = _PORT.unpack_from(data, port_at)
        age = _AGE.unpack_from(data, port_at + _PORT.size)[0] if with_age else 0
        try:
            endpoint = Endpoint(ip, port)
        except ValueError:  # port 0
            return None
        entries.append((data[offset:family_at], endpoint, age))
        offset = stop
    return entries if offset == end else None


def decode_request(data: bytes | bytearray | memoryview) -> Poll | Activate | None:
    """The ``Poll`` or ``Activate`` in ``data``, or None. Never raises."""
    data = bytes(data)
    if len(data) < 2 or data[0] != FORMAT:
        return None
    try:
        if data[1] == KIND_POLL:
            if len(data) != _POLL.size:
                return None
            _, _, version, page = _POLL.unpack(data)
            return Poll(version, page)
        if data[1] == KIND_ACTIVATE:
            if len(data) < _ACTIVATE.size:
                return None
            _, _, epoch, page, pages, count = _ACTIVATE.unpack_from(data)
            if count > PAGE_PEERS:
                return None
            entries = _read_entries(data, _ACTIVATE.size, count, with_age=False)
            if entries is None:
                return None
            return Activate(epoch, tuple(Target(k, e) for k, e, _ in entries), page, pages)
    except ValueError:  # a field out of range for its class
        return None
    return None


def decode_reply(data: bytes | bytearray | memoryview) -> Report | Activated | None:
    """The ``Report`` or ``Activated`` in ``data``, or None. Never raises."""
    data = bytes(data)
    if len(data) < 2 or data[0] != FORMAT:
        return None
    try:
        if data[1] == KIND_REPORT:
            if len(data) < _REPORT.size:
                return None
            _, _, version, clock_ns, epoch, page, pages, count = _REPORT.unpack_from(data)
            if count > PAGE_PEERS:
                return None
            entries = _read_entries(data, _REPORT.size, count, with_age=True)
            if entries is None:
                return None
            peers = tuple(ReportedPeer(k, e, age) for k, e, age in entries)
            return Report(version, clock_ns, peers, page, pages, epoch)
        if data[1] == KIND_ACTIVATED:
            if len(data) != _ACTIVATED.size:
                return None
            _, _, epoch, page, known, initiated, elapsed_us = _ACTIVATED.unpack(data)
            return Activated(epoch, page, known, initiated, elapsed_us)
    except ValueError:  # a field out of range for its class
        return None
    return None
