"""TAI64N timestamps for WireGuard handshake initiations.

A responder accepts an initiation only if its timestamp is strictly greater,
byte for byte, than the last one it accepted from that peer (wireguard-go:
``bytes.Compare(t1[:], t2[:]) > 0``; Linux: ``memcmp``). The layout follows
wireguard-go's ``tai64n.go``: 8 bytes big-endian seconds ``0x400000000000000a
+ unix_seconds`` (2**62 plus the 10 s TAI offset of 1972, exactly as
wireguard-go and the kernel write it), then 4 bytes big-endian nanoseconds.
Both fields are big-endian and fixed width, so byte order is numeric order.

wireguard-go and the kernel "whiten" their own timestamps: they clear the
low 24 bits of the nanoseconds (``whitenerMask = 0x1000000 - 1``, steps of
about 16.8 ms) so a peer cannot read the sender's precise clock. We do the
same by default. The responder side never whitens; it compares bytes.

``next_timestamp`` never goes backwards: it returns the later of the clock's
stamp and the last stamp sent plus one nanosecond, so restarts and clock
steps cannot make a backend silently drop our probes. Keeping ``last_sent``
across restarts (in the state directory) is the caller's I/O; this module is
pure.
"""

from __future__ import annotations

import struct

TAI64N_SIZE = 12
TAI64_BASE = 0x400000000000000A
WHITENER_MASK = 0x1000000 - 1
NS_PER_SECOND = 1_000_000_000

_STRUCT = struct.Struct(">QI")
_MAX_SECONDS = 2**64 - 1

MAX_UNIX_SECONDS = 2**34
"""No clock natfail runs on can read this far (about the year 2514): Linux
keeps time in signed 64-bit nanoseconds, which end in 2262. A stamp beyond it
can only be corruption, never one that was sent."""


def encode(tai_seconds: int, nanoseconds: int) -> bytes:
    """Raw TAI64N label: 8-byte big-endian TAI seconds (already offset), 4-byte ns."""
    if not 0 <= tai_seconds <= _MAX_SECONDS:
        raise ValueError("TAI64 seconds out of range")
    if not 0 <= nanoseconds < NS_PER_SECOND:
        raise ValueError("TAI64N nanoseconds out of range")
    return _STRUCT.pack(tai_seconds, nanoseconds)


def tai64n(unix_ns: int, *, whiten: bool = False) -> bytes:
    """TAI64N of a Unix time in nanoseconds (e.g. ``time.time_ns()``)."""
    seconds, nanoseconds = divmod(unix_ns, NS_PER_SECOND)
    if whiten:
        nanoseconds &= ~WHITENER_MASK
    return encode(TAI64_BASE + seconds, nanoseconds)


def decode(stamp: bytes) -> tuple[int, int]:
    """``(unix_seconds, nanoseconds)`` of a 12-byte TAI64N stamp."""
    if len(stamp) != TAI64N_SIZE:
        raise ValueError("a TAI64N stamp is 12 bytes")
    tai_seconds, nanoseconds = _STRUCT.unpack(stamp)
    return tai_seconds - TAI64_BASE, nanoseconds


def problem(stamp: bytes) -> str | None:
    """Why ``stamp`` cannot be a stamp natfail sent, or None when it can be.

    A stamp natfail sent is 12 bytes, its nanoseconds below 10**9, its
    seconds between 1970 (Linux refuses to set the clock earlier) and
    ``MAX_UNIX_SECONDS``."""
    if len(stamp) != TAI64N_SIZE:
        return f"{len(stamp)} bytes, not {TAI64N_SIZE}"
    unix_seconds, nanoseconds = decode(stamp)
    if nanoseconds >= NS_PER_SECOND:
        return f"nanoseconds {nanoseconds} out of range"
    if unix_seconds < 0:
        return "a time before 1970"
    if unix_seconds >= MAX_UNIX_SECONDS:
        return "a time beyond any clock"
    return None


def seconds_ahead(stamp: bytes, unix_ns: int) -> float:
    """How many seconds ``stamp`` lies after the Unix time ``unix_ns`` (negative: before)."""
    unix_seconds, nanoseconds = decode(stamp)
    return (unix_seconds * NS_PER_SECOND + nanoseconds - unix_ns) / NS_PER_SECOND


def successor(stamp: bytes) -> bytes:
    """The smallest valid stamp strictly greater (byte-wise) than ``stamp``: +1 ns.

    A non-canonical input (nanoseconds >= 10**9) rolls over to the next second,
    which is still strictly greater byte-wise.
    """
    if len(stamp) != TAI64N_SIZE:
        raise ValueError("a TAI64N stamp is 12 bytes")
    tai_seconds, nanoseconds = _STRUCT.unpack(stamp)
    if nanoseconds + 1 < NS_PER_SECOND:
        return _STRUCT.pack(tai_seconds, nanoseconds + 1)
    if tai_seconds >= _MAX_SECONDS:
        raise ValueError("TAI64N stamp has no successor")
    return _STRUCT.pack(tai_seconds + 1, 0)


def next_timestamp(unix_ns: int, last_sent: bytes | None, *, whiten: bool = True) -> bytes:
    """The stamp for the next initiation: ``max(tai64n(now), last_sent + 1 ns)``.

    Strictly greater, byte-wise, than ``last_sent`` whatever the clock says.
    Raises ``ValueError`` only if ``last_sent`` is not 12 bytes (a corrupt
    state file: the caller decides what to do with it).
    """
    now = tai64n(unix_ns, whiten=whiten)
    if last_sent is None:
        return now
    floor = successor(last_sent)
    return now if now > floor else floor
