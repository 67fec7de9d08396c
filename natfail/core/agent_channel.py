"""The channel between a natfail gateway and a ``natfail agent``, over bytes.

Every exchange is one UDP datagram from the gateway (the *request*) and one
back from the agent (the *reply*), and every exchange is a complete, one-shot
Noise handshake, ``Noise_IK_25519_ChaChaPoly_BLAKE2s`` (the pattern of
WireGuard's own handshake, without its PSK)::

    IK:
      <- s                          the gateway knows the interface's key
      ...
      -> e, es, s, ss   [timestamp] [payload]      the request
      <- e, ee, se      [payload]                  the reply

The initiator is the gateway, its static key the probe key it already has;
the responder is the agent, its static key the private key of one of its
WireGuard interfaces, whose public half the gateway knows as the service's
``server_public_key``. Nothing new has to be distributed: the agent lists the
gateways' probe public keys it obeys.

Why UDP and one handshake per exchange: there is no session to set up,
keep alive, time out or resynchronise after a restart of either side, no
per-agent connection state on a gateway serving thousands of backends, and
the exchange costs exactly the one round trip the activation has to pay
anyway. The price is CPU: an exchange costs the gateway four X25519
operations (it caches the static-static DH) and the agent five; measured on
a loaded 2-core test machine, about 0.3 ms of gateway CPU per exchange
(build 0.15, open 0.17) and 0.4 ms of agent CPU. At the design's scale
(3000 backends) a poll of every backend each second would cost a gateway
about one core, so polls should come every few seconds; activations are
rare. A lost datagram is a lost exchange: the gateway asks again with a new
request (new ephemeral, new timestamp).

Layout (integers little-endian as in WireGuard; ``mac1`` keyed by
``HASH(LABEL_MAC1 || receiver's static public key)``, over every byte
before it)::

    request  0x6E  reserved(3)=0  sender_index(4)  ephemeral(32)
             encrypted_static(32+16)  encrypted_timestamp(12+16)
             encrypted_payload(n+16)  mac1(16)                  148 + n bytes
    reply    0x6F  reserved(3)=0  sender_index(4)  receiver_index(4)
             ephemeral(32)  encrypted_payload(n+16)  mac1(16)    76 + n bytes

The type bytes are ASCII ``n`` and ``o``, never one of WireGuard's 1..4, so
neither side can mistake one protocol's datagram for the other's. No
datagram exceeds ``MAX_DATAGRAM`` (65000) bytes.

The hash chain. ``CONSTRUCTION`` is the Noise protocol name (33 bytes, so
``h = ck = HASH(CONSTRUCTION)``); the Noise prologue is ``IDENTIFIER`` followed
by the request's 8 header bytes (type, reserved, sender index), so tampering
with the header makes the request fail to decrypt; then the pre-message
``MixHash(agent public key)``. Tokens are processed exactly as the Noise
specification says (``e`` is MixHash only: without a PSK Noise does not
MixKey it, unlike WireGuard's psk2 variant); every MixKey is
``ck, k = KDF2(ck, DH(...))`` with WireGuard's HMAC-BLAKE2s KDF. The request
carries two AEAD payloads under the key after ``ss``: the 12-byte TAI64N
timestamp at nonce 0, then the message payload at nonce 1, each with the
running hash as associated data and each hashed in afterwards (this is
exactly what a Noise CipherState does for two consecutive EncryptAndHash
calls; a single Noise payload ``timestamp || payload`` would differ only by
one tag). The timestamp has its own AEAD so it is fixed in size and position.
The reply first mixes its own 12 header bytes into the hash (a per-message
prologue, our one addition to Noise, so its sender and receiver indices are
authenticated too), then ``e``, ``ee``, ``se``, and its payload at nonce 0
under the key after ``se``. Nonces are Noise's: 4 zero bytes, then the
counter as 8 bytes little-endian. The unit tests pin the construction with a
known-answer vector that was cross-checked against an independent Noise
implementation.

Security.

- The agent answers only a request whose sender proved it holds a listed
  gateway's private key: the timestamp and payload are encrypted under a key
  that depends on ``DH(gateway static, agent static)``, which nobody else can
  compute. The encrypted static key is checked against ``gateways`` before
  that DH, so an unlisted gateway costs the agent one DH, and a request not
  addressed to one of its keys (mac1) costs it none.
- The gateway accepts only a reply made by the holder of the interface's
  private key: the reply's key depends on ``DH(gateway ephemeral, agent
  static)`` (through ``es``) and on the reply's ephemeral DHs, and only the
  agent can open the request to reach that chain.
- A reply cannot be replayed: its key is bound to this request's ephemeral
  key through ``es`` and ``ee`` (and the whole transcript through the hash),
  so a reply to an earlier request never opens with a new ``Pending``, even
  when an attacker copies the new request's sender index into it.
- Requests can be replayed on the wire, so the agent keeps, per (gateway,
  interface), the highest TAI64N timestamp it accepted and refuses anything
  not strictly newer (``ReplayGuard``; the gateway's timestamps come from its
  persistent monotonic TAI64N source). The limit: the guard is in memory, so
  after an agent restart a captured request can be carried out once more
  (and a captured sequence once, in increasing order), until the gateway's
  next real request, stamped later than all of them, closes the window. That
  is bounded: a replayed poll only re-sends a report encrypted for the
  gateway (nobody else can read it), and a replayed activation only makes
  the backend initiate handshakes towards endpoints it had already been
  told; if that backend is not the active one, the gateway's fence drops
  what it sends towards clients; and an old activation's epoch is below the
  one the agent already recorded, so where the highest epoch wins it
  changes nothing. ``ReplayGuard(floor=...)`` lets an agent close
  even that window if it wishes, at the cost of refusing a gateway whose
  clock lags behind the floor.
- Payloads are confidential, so client endpoints are not shown to an
  eavesdropper. A reply opens only with both sides' ephemeral keys (``ee``),
  so it stays secret even if a static key leaks later. A request's payload,
  as in any IK first message, is encrypted to the static keys only: whoever
  later steals the interface's (or the gateway's) private key can read
  recorded requests, including the endpoints an activation listed.
- The agent answers nothing it did not authenticate, so it cannot be used
  to reflect or amplify traffic towards a spoofed source, except by a
  replay within the window above.

Pure: no sockets, no clock, no randomness. Randomness (ephemeral keys,
sender indices) and the timestamp are parameters; ``new_request`` and
``new_reply`` are the only functions that draw randomness. Datagram content
never makes a function raise: ``open_request`` and ``open_reply`` return a
value or ``Ignored``. Our own misuse (wrong key sizes, a payload over the
limit) raises ``ValueError``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Final

from natfail.core.noise import (
    KEY_SIZE,
    TIMESTAMP_SIZE,
    Ignored,
    aead_open,
    aead_seal,
    dh,
    hash_,
    kdf2,
    mac,
    public_key,
)

__all__ = [
    "CONSTRUCTION",
    "IDENTIFIER",
    "LABEL_MAC1",
    "MAX_DATAGRAM",
    "MAX_REPLY_PAYLOAD",
    "MAX_REQUEST_PAYLOAD",
    "MESSAGE_REPLY",
    "MESSAGE_REQUEST",
    "REPLY_OVERHEAD",
    "REQUEST_OVERHEAD",
    "AgentIdentity",
    "Datagram",
    "Ignored",
    "Pending",
    "ReplayGuard",
    "Request",
    "build_reply",
    "build_request",
    "new_reply",
    "new_request",
    "open_reply",
    "open_request",
]

# --- constants ------------------------------------------------------------------

CONSTRUCTION: Final = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER: Final = b"natfail agent v1"
LABEL_MAC1: Final = b"natfail agent mac1"
"""Not WireGuard's ``mac1----``: a separate label keeps the two protocols'
mac1 keys apart although both derive from the same interface key."""

MESSAGE_REQUEST: Final = 0x6E
MESSAGE_REPLY: Final = 0x6F

MAX_DATAGRAM: Final = 65000
MAC_SIZE: Final = 16
TAG_SIZE: Final = 16
INDEX_MAX: Final = 0xFFFFFFFF

# Request offsets.
REQ_SENDER: Final = 4
REQ_EPHEMERAL: Final = 8
REQ_STATIC: Final = 40
REQ_TIMESTAMP: Final = REQ_STATIC + KEY_SIZE + TAG_SIZE  # 88
REQ_PAYLOAD: Final = REQ_TIMESTAMP + TIMESTAMP_SIZE + TAG_SIZE  # 116
REQUEST_OVERHEAD: Final = REQ_PAYLOAD + TAG_SIZE + MAC_SIZE  # 148
# Reply offsets.
REP_SENDER: Final = 4
REP_RECEIVER: Final = 8
REP_EPHEMERAL: Final = 12
REP_PAYLOAD: Final = REP_EPHEMERAL + KEY_SIZE  # 44
REPLY_OVERHEAD: Final = REP_PAYLOAD + TAG_SIZE + MAC_SIZE  # 76

MAX_REQUEST_PAYLOAD: Final = MAX_DATAGRAM - REQUEST_OVERHEAD
MAX_REPLY_PAYLOAD: Final = MAX_DATAGRAM - REPLY_OVERHEAD

_REQUEST_TYPE: Final = bytes((MESSAGE_REQUEST, 0, 0, 0))
_REPLY_TYPE: Final = bytes((MESSAGE_REPLY, 0, 0, 0))

_CK0: Final = hash_(CONSTRUCTION)
"""Noise's InitializeSymmetric: the name is longer than the hash, so both
the chaining key and the hash start as HASH(name)."""

# Reasons, stable for logs and metrics.
IGNORED_SIZE: Final = "size"
IGNORED_TYPE: Final = "type"
IGNORED_INDEX: Final = "index"
IGNORED_MAC1: Final = "mac1"
IGNORED_EPHEMERAL: Final = "ephemeral"
IGNORED_DECRYPT: Final = "decrypt"
IGNORED_GATEWAY: Final = "gateway"
IGNORED_REPLAY: Final = "replay"
"""Not returned here: the reason an agent logs when ``ReplayGuard`` refuses."""

_SIZE = Ignored(IGNORED_SIZE)
_TYPE = Ignored(IGNORED_TYPE)
_INDEX = Ignored(IGNORED_INDEX)
_MAC1 = Ignored(IGNORED_MAC1)
_EPHEMERAL = Ignored(IGNORED_EPHEMERAL)
_DECRYPT = Ignored(IGNORED_DECRYPT)
_GATEWAY = Ignored(IGNORED_GATEWAY)

Datagram = bytes | bytearray | memoryview

_blake2s = hashlib.blake2s


# --- AEAD: libsodium's ChaCha20-Poly1305 with a Noise nonce (natfail.core.noise) ---

_seal = aead_seal
"""ChaCha20-Poly1305 with a Noise nonce: ciphertext and 16-byte tag."""
_open = aead_open
"""The plaintext, or None when the tag does not verify."""


# --- values -------------------------------------------------------------------------


def _check_bytes(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")


def _check_index(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INDEX_MAX:
        raise ValueError(f"{name} must fit in 32 bits")


def _check_payload(payload: object, limit: int) -> None:
    if not isinstance(payload, bytes):
        raise ValueError("payload must be bytes")
    if len(payload) > limit:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {limit}")


def _mac1_key(public: bytes) -> bytes:
    return hash_(LABEL_MAC1 + public)


def _initial_hash(header: bytes, responder_public: bytes) -> bytes:
    """MixHash(prologue = IDENTIFIER || request header); MixHash(responder static)."""
    return hash_(hash_(_CK0 + IDENTIFIER + header) + responder_public)


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """One WireGuard interface key of the agent, with what every request
    addressed to it needs precomputed (its public key and mac1 key)."""

    private_key: bytes = field(repr=False)
    public_key: bytes = field(init=False)
    _mac1_key: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_bytes("private_key", self.private_key, KEY_SIZE)
        own_public = public_key(self.private_key)
        object.__setattr__(self, "public_key", own_public)
        object.__setattr__(self, "_mac1_key", _mac1_key(own_public))

    @classmethod
    def from_private(cls, private_key: bytes) -> AgentIdentity:
        return cls(private_key)


@dataclass(frozen=True, slots=True)
class Pending:
    """The gateway's state after sending a request: what opens its reply.
    Use it for one reply; drop it when that arrives or the request times out."""

    sender_index: int
    agent_public: bytes
    _gateway_private: bytes = field(repr=False, compare=False)
    _ephemeral_private: bytes = field(repr=False, compare=False)
    _chaining_key: bytes = field(repr=False, compare=False)
    _hash: bytes = field(repr=False, compare=False)
    _mac1_key: bytes = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Request:
    """A request that authenticated: from a listed gateway, to one of our keys.

    Its timestamp has not been checked for freshness: pass the request to
    ``ReplayGuard.accept`` before acting on it."""

    gateway_public: bytes
    agent_public: bytes
    """Which of the agent's interface keys it was addressed to."""
    timestamp: bytes
    """The gateway's 12-byte TAI64N stamp."""
    payload: bytes = field(repr=False)
    sender_index: int
    """The gateway's index, echoed in the reply."""
    _chaining_key: bytes = field(repr=False, compare=False)
    _hash: bytes = field(repr=False, compare=False)
    _gateway_ephemeral: bytes = field(repr=False, compare=False)


# --- the gateway: requests out, replies in --------------------------------------------


@functools.lru_cache(maxsize=4096)
def _initiator_statics(gateway_private: bytes, agent_public: bytes) -> tuple[bytes, bytes] | None:
    """(gateway public key, DH(gateway static, agent static)), or None for a
    low-order agent key: the part of a request that depends on the keys only,
    cached because a gateway sends to the same backends again and again (as
    wireguard-go precomputes its static-static DH)."""
    static_static = dh(gateway_private, agent_public)
    if static_static is None:
        return None
    return public_key(gateway_private), static_static


def build_request(
    gateway_private: bytes,
    agent_public: bytes,
    payload: bytes,
    *,
    timestamp: bytes,
    ephemeral_private: bytes,
    sender_index: int,
) -> tuple[bytes, Pending]:
    """The request datagram (``REQUEST_OVERHEAD + len(payload)`` bytes) and the
    state that opens its reply.

    ``timestamp`` is a 12-byte TAI64N stamp from the gateway's monotonic
    source, ``ephemeral_private`` 32 random bytes, ``sender_index`` a random
    32-bit index. Raises ``ValueError`` on wrong sizes, a payload over
    ``MAX_REQUEST_PAYLOAD`` or a low-order ``agent_public``.
    """
    _check_bytes("gateway_private", gateway_private, KEY_SIZE)
    _check_bytes("agent_public", agent_public, KEY_SIZE)
    _check_bytes("timestamp", timestamp, TIMESTAMP_SIZE)
    _check_bytes("ephemeral_private", ephemeral_private, KEY_SIZE)
    _check_index("sender_index", sender_index)
    _check_payload(payload, MAX_REQUEST_PAYLOAD)
    statics = _initiator_statics(gateway_private, agent_public)
    es = dh(ephemeral_private, agent_public)
    if statics is None or es is None:
        raise ValueError("agent_public is a low-order point")
    gateway_public, ss = statics

    header = _REQUEST_TYPE + sender_index.to_bytes(4, "little")
    e_pub = public_key(ephemeral_private)
    h = _blake2s(_initial_hash(header, agent_public) + e_pub).digest()
    chaining_key, key = kdf2(_CK0, es)
    encrypted_static = _seal(key, 0, gateway_public, h)
    h = _blake2s(h + encrypted_static).digest()
    chaining_key, key = kdf2(chaining_key, ss)
    encrypted_timestamp = _seal(key, 0, timestamp, h)
    h = _blake2s(h + encrypted_timestamp).digest()
    encrypted_payload = _seal(key, 1, payload, h)
    h = _blake2s(h + encrypted_payload).digest()

    body = header + e_pub + encrypted_static + encrypted_timestamp + encrypted_payload
    datagram = body + mac(_mac1_key(agent_public), body)
    pending = Pending(
        sender_index,
        agent_public,
        gateway_private,
        ephemeral_private,
        chaining_key,
        h,
        _mac1_key(gateway_public),
    )
    return datagram, pending


def new_request(
    gateway_private: bytes, agent_public: bytes, payload: bytes, timestamp: bytes
) -> tuple[bytes, Pending]:
    """``build_request`` with a fresh random ephemeral key and sender index."""
    return build_request(
        gateway_private,
        agent_public,
        payload,
        timestamp=timestamp,
        ephemeral_private=os.urandom(KEY_SIZE),
        sender_index=secrets.randbits(32),
    )


def open_reply(pending: Pending, datagram: Datagram) -> bytes | Ignored:
    """The payload of the agent's reply to ``pending``'s request, or ``Ignored``.

    Checks, cheapest first: size, type with zero reserved bytes, receiver
    index == our sender index, mac1 keyed by the gateway's public key; then
    the DHs and the AEAD. Never raises on datagram content.
    """
    datagram = bytes(datagram)
    if not REPLY_OVERHEAD <= len(datagram) <= MAX_DATAGRAM:
        return _SIZE
    if datagram[:4] != _REPLY_TYPE:
        return _TYPE
    if datagram[REP_RECEIVER:REP_EPHEMERAL] != pending.sender_index.to_bytes(4, "little"):
        return _INDEX
    body, tag = datagram[:-MAC_SIZE], datagram[-MAC_SIZE:]
    if not secrets.compare_digest(mac(pending._mac1_key, body), tag):
        return _MAC1

    e_pub = body[REP_EPHEMERAL:REP_PAYLOAD]
    h = _blake2s(_blake2s(pending._hash + body[:REP_EPHEMERAL]).digest() + e_pub).digest()
    ee = dh(pending._ephemeral_private, e_pub)
    if ee is None:
        return _EPHEMERAL
    chaining_key, _ = kdf2(pending._chaining_key, ee)
    se = dh(pending._gateway_private, e_pub)
    if se is None:  # pragma: no cover - a low-order point fails ee already
        return _EPHEMERAL
    _, key = kdf2(chaining_key, se)
    payload = _open(key, 0, body[REP_PAYLOAD:], h)
    if payload is None:
        return _DECRYPT
    return payload


# --- the agent: requests in, replies out -------------------------------------------------


def open_request(
    datagram: Datagram, identities: Sequence[AgentIdentity], gateways: Collection[bytes]
) -> Request | Ignored:
    """The request, if ``datagram`` is one from a gateway in ``gateways`` (their
    static public keys) to one of ``identities``; else ``Ignored``.

    Checks, cheapest first: size, type with zero reserved bytes, mac1 against
    each identity's key (no DH: a datagram for none of them costs a few
    BLAKE2s); then ``es`` and the encrypted static key, which must be in
    ``gateways``; then ``ss``, the timestamp and the payload. Freshness is
    ``ReplayGuard``'s business. Never raises on datagram content.
    """
    datagram = bytes(datagram)
    if not REQUEST_OVERHEAD <= len(datagram) <= MAX_DATAGRAM:
        return _SIZE
    if datagram[:4] != _REQUEST_TYPE:
        return _TYPE
    body, tag = datagram[:-MAC_SIZE], datagram[-MAC_SIZE:]
    for identity in identities:
        if secrets.compare_digest(mac(identity._mac1_key, body), tag):
            break
    else:
        return _MAC1

    header = body[:REQ_EPHEMERAL]
    e_pub = body[REQ_EPHEMERAL:REQ_STATIC]
    encrypted_static = body[REQ_STATIC:REQ_TIMESTAMP]
    encrypted_timestamp = body[REQ_TIMESTAMP:REQ_PAYLOAD]
    encrypted_payload = body[REQ_PAYLOAD:]

    h = _blake2s(_initial_hash(header, identity.public_key) + e_pub).digest()
    es = dh(identity.private_key, e_pub)
    if es is None:
        return _EPHEMERAL
    chaining_key, key = kdf2(_CK0, es)
    gateway_public = _open(key, 0, encrypted_static, h)
    if gateway_public is None:
        return _DECRYPT
    # Before the second DH: an unlisted gateway costs one DH, not two.
    if gateway_public not in gateways:
        return _GATEWAY
    h = _blake2s(h + encrypted_static).digest()
    ss = dh(identity.private_key, gateway_public)
    if ss is None:  # only if a low-order key was listed as a gateway
        return _GATEWAY
    chaining_key, key = kdf2(chaining_key, ss)
    timestamp = _open(key, 0, encrypted_timestamp, h)
    if timestamp is None:
        return _DECRYPT
    h = _blake2s(h + encrypted_timestamp).digest()
    payload = _open(key, 1, encrypted_payload, h)
    if payload is None:
        return _DECRYPT
    h = _blake2s(h + encrypted_payload).digest()
    return Request(
        gateway_public,
        identity.public_key,
        timestamp,
        payload,
        int.from_bytes(header[REQ_SENDER:], "little"),
        chaining_key,
        h,
        e_pub,
    )


def build_reply(
    request: Request, payload: bytes, *, ephemeral_private: bytes, sender_index: int
) -> bytes:
    """The reply datagram (``REPLY_OVERHEAD + len(payload)`` bytes) to ``request``.

    Raises ``ValueError`` on wrong sizes or a payload over ``MAX_REPLY_PAYLOAD``.
    """
    _check_bytes("ephemeral_private", ephemeral_private, KEY_SIZE)
    _check_index("sender_index", sender_index)
    _check_payload(payload, MAX_REPLY_PAYLOAD)
    header = (
        _REPLY_TYPE
        + sender_index.to_bytes(4, "little")
        + request.sender_index.to_bytes(4, "little")
    )
    e_pub = public_key(ephemeral_private)
    h = _blake2s(_blake2s(request._hash + header).digest() + e_pub).digest()
    ee = dh(ephemeral_private, request._gateway_ephemeral)
    se = dh(ephemeral_private, request.gateway_public)
    # open_request got a non-zero DH with both points, so neither is of low order.
    assert ee is not None and se is not None
    chaining_key, _ = kdf2(request._chaining_key, ee)
    _, key = kdf2(chaining_key, se)
    body = header + e_pub + _seal(key, 0, payload, h)
    return body + mac(_mac1_key(request.gateway_public), body)


def new_reply(request: Request, payload: bytes) -> bytes:
    """``build_reply`` with a fresh random ephemeral key and sender index."""
    return build_reply(
        request, payload, ephemeral_private=os.urandom(KEY_SIZE), sender_index=secrets.randbits(32)
    )


class ReplayGuard:
    """The agent's replay check: per (gateway, interface key), only a request
    whose TAI64N timestamp is strictly later than the last one accepted.

    Per interface as well as per gateway, because a request is bound to the
    interface it was addressed to (it cannot be replayed to another), and
    requests to two interfaces travel from different gateway sockets and may
    overtake each other. TAI64N is big-endian and fixed width, so byte order
    is time order. In memory only; see the module's docstring for what that
    allows after a restart, and ``floor`` for closing it: a request stamped
    at or before ``floor`` is always refused.
    """

    __slots__ = ("_floor", "_last")

    def __init__(self, floor: bytes = bytes(TIMESTAMP_SIZE)) -> None:
        _check_bytes("floor", floor, TIMESTAMP_SIZE)
        self._floor = floor
        self._last: dict[tuple[bytes, bytes], bytes] = {}

    def accept(self, request: Request) -> bool:
        """True, and remembered, iff ``request`` is newer than any accepted
        from its gateway to its interface (and than ``floor``)."""
        pair = (request.gateway_public, request.agent_public)
        last = self._last.get(pair, self._floor)
        if request.timestamp <= last:
            return False
        self._last[pair] = request.timestamp
        return True

    def last(self, gateway_public: bytes, agent_public: bytes) -> bytes | None:
        """The newest timestamp accepted from that gateway to that interface."""
        return self._last.get((gateway_public, agent_public))
