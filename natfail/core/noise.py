"""The WireGuard Noise_IKpsk2 initiator over bytes (whitepaper section 5.4).

natfail's probe: build a handshake initiation for the service's
``server_public_key``, then consume what the backend sends back. A backend is
up only if its handshake response decrypts, which proves the WireGuard
process there holds the server's private key. A cookie reply (the backend is
under load) yields a cookie that the next initiation uses for mac2.

Pure: no sockets, no clock, no randomness, no file I/O. Time (``now``, any
monotonic seconds) and randomness (ephemeral key, sender index) are
parameters; ``new_initiation`` is the one convenience that draws randomness
from the OS. Peer misbehaviour is a value (``Ignored``), never an exception:
``consume``/``consume_response``/``consume_cookie_reply`` never raise on any
datagram content. Caller mistakes (a 13-byte timestamp, a sender index over
32 bits) raise ``ValueError``.

Byte layout and scapy. Packets are laid out by ``scapy.contrib.wireguard``
(``Wireguard`` header, then ``WireguardInitiation``, ``WireguardResponse``
or ``WireguardCookieReply``), without scapy's cost on the hot path: scapy
takes about 110 us to build one initiation and 33 us to dissect one
response, most of the probe's CPU budget before any cryptography. So scapy
builds the initiation once per process (``initiation_template``: the
packet with its constant fields, and where each field lies in it, as
scapy's own field code writes them), and each probe fills its own fields
(sender index, ephemeral, encrypted static and timestamp, mac1, mac2) into
a copy at those positions. Replies are read at the offsets of ``LAYOUTS``,
which names every field by its scapy field name; ``verify_scapy_layout()``
checks that table against scapy field by field (dissect and build), and the
unit tests run it, check that scapy dissects our packets into the right
field values, and feed scapy-built packets to ``consume``. ``import scapy``
costs a few tenths of a second, so it is imported lazily, only by
``initiation_template``, ``to_scapy`` and ``verify_scapy_layout``;
``import natfail.core.noise`` stays fast and pulls no scapy.

Cost. Everything that depends only on the keys is computed once in ``Keys``:
the initial chaining key and hash mixed with the server key, the three
MAC/cookie keys, and the static-static DH (as wireguard-go's
``precomputedStaticStatic``). A probe then costs one X25519 fixed-base
multiplication (the ephemeral public key) and three X25519 DHs, three
ChaCha20-Poly1305 calls, 18 HMAC-BLAKE2s and a handful of BLAKE2s. All the
cryptography is libsodium's, through PyNaCl's low-level ``nacl.bindings``
(X25519, ChaCha20-Poly1305 and, for cookies, XChaCha20-Poly1305), and
``hashlib``'s BLAKE2s. X25519's fixed-base multiplication takes about 14 us
here and a DH about 32; a ChaCha20-Poly1305 call about 3 us, most of it
PyNaCl's argument checks. libsodium raises where WireGuard's code returns a
value: an all-zero DH (``dh`` returns None) and a tag that does not verify
(``aead_open``/``xaead_open`` return None, ``consume_*`` ``Ignored``).
HMAC-BLAKE2s is written out over ``hashlib`` (pads by ``bytes.translate``)
because ``hmac.new`` costs about 3 us per call here and
``hmac.digest(..., "blake2s")`` about 4. ``bench/bench_probe.py`` measures
the whole probe at about 144 us (build ~63 + consume ~79), of which X25519 is
about 111 us; see bench/results/probe.json.

Cookies. A backend under load answers with a cookie reply; the cookie is
MAC(secret, source IP and port of the initiation), so a mac2 made with it is
only valid on initiations sent from the same local address *and port*. A
cookie reply proves nothing about the backend: its key derives from the
server's *public* key, so anyone can make one. The caller answers it with a
new initiation carrying mac2 and counts the backend up only on ``Accepted``.

ICMP errors. Anyone can also forge an ICMP error; ``quotes_initiation``
tells whether the datagram an error quotes is one we sent: it must repeat
at least the type, sender index and ephemeral key, random per initiation.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Final

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError
from nacl.exceptions import RuntimeError as SodiumError

# --- constants (wireguard-go device/noise-protocol.go, cookie.go) -----------

CONSTRUCTION: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"

MESSAGE_INITIATION: Final = 1
MESSAGE_RESPONSE: Final = 2
MESSAGE_COOKIE_REPLY: Final = 3
MESSAGE_TRANSPORT: Final = 4

INITIATION_SIZE: Final = 148
RESPONSE_SIZE: Final = 92
COOKIE_REPLY_SIZE: Final = 64

KEY_SIZE: Final = 32
TIMESTAMP_SIZE: Final = 12
MAC_SIZE: Final = 16
COOKIE_SIZE: Final = 16
AEAD_TAG_SIZE: Final = 16

COOKIE_REFRESH_TIME: Final = 120.0
"""A cookie is used for mac2 for this many seconds after its receipt."""

# --- byte layout --------------------------------------------------------------
#
# (scapy layer, ((scapy field name, offset, size), ...)) per message type. The
# first two rows are scapy's ``Wireguard`` header layer; integers are little
# endian (XLEIntField) except the three reserved bytes, which must be zero.

Field = tuple[str, int, int]
LAYOUTS: Final[dict[int, tuple[str, tuple[Field, ...]]]] = {
    MESSAGE_INITIATION: (
        "WireguardInitiation",
        (
            ("message_type", 0, 1),
            ("reserved_zero", 1, 3),
            ("sender_index", 4, 4),
            ("unencrypted_ephemeral", 8, 32),
            ("encrypted_static", 40, 48),
            ("encrypted_timestamp", 88, 28),
            ("mac1", 116, 16),
            ("mac2", 132, 16),
        ),
    ),
    MESSAGE_RESPONSE: (
        "WireguardResponse",
        (
            ("message_type", 0, 1),
            ("reserved_zero", 1, 3),
            ("sender_index", 4, 4),
            ("receiver_index", 8, 4),
            ("unencrypted_ephemeral", 12, 32),
            ("encrypted_nothing", 44, 16),
            ("mac1", 60, 16),
            ("mac2", 76, 16),
        ),
    ),
    MESSAGE_COOKIE_REPLY: (
        "WireguardCookieReply",
        (
            ("message_type", 0, 1),
            ("reserved_zero", 1, 3),
            ("receiver_index", 4, 4),
            ("nonce", 8, 24),
            ("encrypted_cookie", 32, 32),
        ),
    ),
}
MESSAGE_SIZES: Final = {
    MESSAGE_INITIATION: INITIATION_SIZE,
    MESSAGE_RESPONSE: RESPONSE_SIZE,
    MESSAGE_COOKIE_REPLY: COOKIE_REPLY_SIZE,
}

# Offsets the hot path uses; tests check them against LAYOUTS.
INIT_MAC1: Final = 116  # initiation: mac1 covers [0:116], mac2 covers [0:132]
INIT_MAC2: Final = 132
RESP_SENDER: Final = 4
RESP_RECEIVER: Final = 8
RESP_EPHEMERAL: Final = 12
RESP_EMPTY: Final = 44
RESP_MAC1: Final = 60
COOKIE_RECEIVER: Final = 4
COOKIE_NONCE: Final = 8
COOKIE_ENCRYPTED: Final = 32

_HEADER_RESPONSE: Final = bytes((MESSAGE_RESPONSE, 0, 0, 0))
_HEADER_COOKIE_REPLY: Final = bytes((MESSAGE_COOKIE_REPLY, 0, 0, 0))

_ZERO_NONCE: Final = bytes(12)
# The hot path calls libsodium's AEAD directly (message, aad, nonce, key).
_seal: Final = crypto_aead_chacha20poly1305_ietf_encrypt
_open: Final = crypto_aead_chacha20poly1305_ietf_decrypt
_ZERO_KEY: Final = bytes(KEY_SIZE)

# --- primitives ---------------------------------------------------------------

_blake2s = hashlib.blake2s
_IPAD: Final = bytes(x ^ 0x36 for x in range(256))
_OPAD: Final = bytes(x ^ 0x5C for x in range(256))


def hash_(data: bytes) -> bytes:
    """HASH: BLAKE2s-256."""
    return _blake2s(data).digest()


def mac(key: bytes, data: bytes) -> bytes:
    """MAC: keyed BLAKE2s with a 16-byte digest."""
    return _blake2s(data, digest_size=MAC_SIZE, key=key).digest()


def hmac(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s (RFC 2104, 64-byte block) for keys of at most 64 bytes."""
    block = key + bytes(64 - len(key))
    inner = _blake2s(block.translate(_IPAD) + data).digest()
    return _blake2s(block.translate(_OPAD) + inner).digest()


# The KDFs write HMAC out inline: on the probe's hot path (14 KDF calls per
# probe) the helper calls alone cost a few microseconds.


def kdf1(key: bytes, data: bytes) -> bytes:
    """KDF1 of the whitepaper (HKDF with HMAC-BLAKE2s), 32-byte keys."""
    b2s, ipad, opad, zero = _blake2s, _IPAD, _OPAD, _ZERO_KEY
    block = key + zero
    t0 = b2s(block.translate(opad) + b2s(block.translate(ipad) + data).digest()).digest()
    block = t0 + zero
    return b2s(block.translate(opad) + b2s(block.translate(ipad) + b"\x01").digest()).digest()


def kdf2(key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """KDF2 of the whitepaper."""
    b2s, zero = _blake2s, _ZERO_KEY
    block = key + zero
    t0 = b2s(block.translate(_OPAD) + b2s(block.translate(_IPAD) + data).digest()).digest()
    block = t0 + zero
    inner, outer = block.translate(_IPAD), block.translate(_OPAD)
    t1 = b2s(outer + b2s(inner + b"\x01").digest()).digest()
    t2 = b2s(outer + b2s(inner + t1 + b"\x02").digest()).digest()
    return t1, t2


def kdf3(key: bytes, data: bytes) -> tuple[bytes, bytes, bytes]:
    """KDF3 of the whitepaper."""
    b2s, zero = _blake2s, _ZERO_KEY
    block = key + zero
    t0 = b2s(block.translate(_OPAD) + b2s(block.translate(_IPAD) + data).digest()).digest()
    block = t0 + zero
    inner, outer = block.translate(_IPAD), block.translate(_OPAD)
    t1 = b2s(outer + b2s(inner + b"\x01").digest()).digest()
    t2 = b2s(outer + b2s(inner + t1 + b"\x02").digest()).digest()
    t3 = b2s(outer + b2s(inner + t2 + b"\x03").digest()).digest()
    return t1, t2, t3


def aead_seal(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    """AEAD of the whitepaper: ChaCha20-Poly1305 (RFC 8439) under the nonce
    ``0x00000000 || counter`` (64-bit little endian); ciphertext || 16-byte tag."""
    return crypto_aead_chacha20poly1305_ietf_encrypt(
        plaintext, aad, bytes(4) + counter.to_bytes(8, "little"), key
    )


def aead_open(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes | None:
    """The plaintext of ``aead_seal``, or None when the tag does not verify."""
    if len(ciphertext) < AEAD_TAG_SIZE:
        return None
    try:
        return crypto_aead_chacha20poly1305_ietf_decrypt(
            ciphertext, aad, bytes(4) + counter.to_bytes(8, "little"), key
        )
    except CryptoError:
        return None


def xaead_seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """XAEAD of the whitepaper (the cookie's): XChaCha20-Poly1305 with a
    24-byte nonce; ciphertext || 16-byte tag."""
    return crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def xaead_open(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
    """The plaintext of ``xaead_seal``, or None when the tag does not verify."""
    if len(ciphertext) < AEAD_TAG_SIZE:
        return None
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key)
    except CryptoError:
        return None


def public_key(private_key: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (clamped as X25519 does)."""
    _check_len("private_key", private_key, KEY_SIZE)
    return crypto_scalarmult_base(private_key)


def dh(private_key: bytes, public: bytes) -> bytes | None:
    """X25519(private_key, public), or None when the result is all zeros
    (a low-order point), which WireGuard refuses."""
    try:
        return crypto_scalarmult(private_key, public)
    except SodiumError:
        return None


# --- values -------------------------------------------------------------------


def _check_len(name: str, value: bytes, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")


@dataclass(frozen=True, slots=True)
class Keys:
    """The probe's identity towards one service.

    ``private_key`` is the probe's static X25519 key, ``server_public_key``
    the service's (shared by all its backends), ``preshared_key`` the PSK of
    the probe peer (32 zero bytes when none, as in WireGuard). Raises
    ``ValueError`` on wrong sizes or when the static-static DH is all zeros
    (a low-order server key), which wireguard-go refuses as well.
    """

    private_key: bytes = field(repr=False)
    server_public_key: bytes
    preshared_key: bytes = field(default=_ZERO_KEY, repr=False)
    public_key: bytes = field(init=False)
    # Derived once; the hot path reads these.
    _static_static: bytes = field(init=False, repr=False, compare=False)
    _chaining_key: bytes = field(init=False, repr=False, compare=False)
    _hash: bytes = field(init=False, repr=False, compare=False)
    _mac1_key_out: bytes = field(init=False, repr=False, compare=False)
    _mac1_key_in: bytes = field(init=False, repr=False, compare=False)
    _cookie_key: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_len("private_key", self.private_key, KEY_SIZE)
        _check_len("server_public_key", self.server_public_key, KEY_SIZE)
        _check_len("preshared_key", self.preshared_key, KEY_SIZE)
        own_public = public_key(self.private_key)
        static_static = dh(self.private_key, self.server_public_key)
        if static_static is None:
            raise ValueError("server_public_key is a low-order point")
        chaining_key = hash_(CONSTRUCTION)
        setattr_ = object.__setattr__
        setattr_(self, "public_key", own_public)
        setattr_(self, "_static_static", static_static)
        setattr_(self, "_chaining_key", chaining_key)
        setattr_(
            self,
            "_hash",
            hash_(hash_(chaining_key + IDENTIFIER) + self.server_public_key),
        )
        # mac1 of what we send is keyed by the server's public key; mac1 of
        # what the server sends us, by ours.
        setattr_(self, "_mac1_key_out", hash_(LABEL_MAC1 + self.server_public_key))
        setattr_(self, "_mac1_key_in", hash_(LABEL_MAC1 + own_public))
        setattr_(self, "_cookie_key", hash_(LABEL_COOKIE + self.server_public_key))


@dataclass(frozen=True, slots=True)
class Cookie:
    """A cookie from a cookie reply, and when it arrived (monotonic seconds)."""

    value: bytes = field(repr=False)
    received_at: float

    def __post_init__(self) -> None:
        _check_len("cookie", self.value, COOKIE_SIZE)

    def fresh(self, now: float) -> bool:
        """Usable for mac2: at most ``COOKIE_REFRESH_TIME`` seconds old."""
        return 0.0 <= now - self.received_at <= COOKIE_REFRESH_TIME


@dataclass(frozen=True, slots=True)
class Handshake:
    """Initiator state after sending an initiation, needed to consume replies."""

    sender_index: int
    chaining_key: bytes = field(repr=False)
    hash: bytes = field(repr=False)
    ephemeral: bytes = field(repr=False, compare=False)
    """The ephemeral private key."""
    ephemeral_public: bytes
    mac1: bytes
    """The mac1 we sent: the AAD of a cookie reply to this initiation."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """A handshake response that verified and decrypted: the backend is up."""

    peer_index: int
    """The responder's sender index."""


@dataclass(frozen=True, slots=True)
class CookieReceived:
    """A valid cookie reply: the backend is alive but under load."""

    cookie: Cookie


@dataclass(frozen=True, slots=True)
class Ignored:
    """Anything else; counts as no reply. ``reason`` is a short stable word."""

    reason: str


Result = Accepted | CookieReceived | Ignored
Datagram = bytes | bytearray | memoryview

# Reasons, stable for logs and metrics.
IGNORED_SIZE: Final = "size"
IGNORED_TYPE: Final = "type"
IGNORED_INDEX: Final = "index"
IGNORED_MAC1: Final = "mac1"
IGNORED_DECRYPT: Final = "decrypt"
IGNORED_EPHEMERAL: Final = "ephemeral"

_SIZE = Ignored(IGNORED_SIZE)
_TYPE = Ignored(IGNORED_TYPE)
_INDEX = Ignored(IGNORED_INDEX)
_MAC1 = Ignored(IGNORED_MAC1)
_DECRYPT = Ignored(IGNORED_DECRYPT)
_EPHEMERAL = Ignored(IGNORED_EPHEMERAL)


# --- the initiation's template, from scapy -------------------------------------


@dataclass(frozen=True, slots=True)
class InitiationTemplate:
    """The handshake initiation as scapy lays it out: the packet scapy built
    once with its constant fields (message type, reserved bytes) and every
    per-probe field zero, and where each per-probe field lies in it."""

    packet: bytes
    sender_index: slice
    ephemeral: slice
    static: slice
    timestamp: slice
    mac1: slice
    mac2: slice

    def to_json(self) -> dict[str, Any]:
        spans = {
            name: [getattr(self, name).start, getattr(self, name).stop]
            for name in ("sender_index", "ephemeral", "static", "timestamp", "mac1", "mac2")
        }
        return {"packet": self.packet.hex(), **spans}

    @classmethod
    def from_json(cls, data: Any) -> InitiationTemplate:
        """The template :meth:`to_json` wrote (in another process); ValueError
        when it is not one: the fields must lie where WireGuard has them."""
        try:
            packet = bytes.fromhex(data["packet"])
            spans = {
                name: slice(int(data[name][0]), int(data[name][1]))
                for name in ("sender_index", "ephemeral", "static", "timestamp", "mac1", "mac2")
            }
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"not an initiation template: {exc!r}") from None
        template = cls(packet, **spans)
        if template != _layout_template(packet):
            raise ValueError("the template's fields are not where WireGuard has them")
        return template


def _layout_template(packet: bytes) -> InitiationTemplate:
    """``packet`` with the field positions of LAYOUTS (to check a template)."""
    fields = {name: (offset, size) for name, offset, size in LAYOUTS[MESSAGE_INITIATION][1]}
    spans = {
        attr: slice(fields[name][0], fields[name][0] + fields[name][1])
        for attr, name in (
            ("sender_index", "sender_index"),
            ("ephemeral", "unencrypted_ephemeral"),
            ("static", "encrypted_static"),
            ("timestamp", "encrypted_timestamp"),
            ("mac1", "mac1"),
            ("mac2", "mac2"),
        )
    }
    return InitiationTemplate(packet, **spans)


def use_template(template: InitiationTemplate) -> None:
    """Use a template built elsewhere (the daemon builds it in a child
    process, so scapy's memory never stays in the daemon)."""
    global _INITIATION
    _INITIATION = template


_INITIATION: InitiationTemplate | None = None
_PER_PROBE: Final = {
    "sender_index": 4,
    "unencrypted_ephemeral": KEY_SIZE,
    "encrypted_static": KEY_SIZE + AEAD_TAG_SIZE,
    "encrypted_timestamp": TIMESTAMP_SIZE + AEAD_TAG_SIZE,
    "mac1": MAC_SIZE,
    "mac2": MAC_SIZE,
}


def initiation_template() -> InitiationTemplate:
    """The initiation's template, built with ``scapy.contrib.wireguard`` on
    the first call (which imports scapy, about 0.2 s) and kept for the
    process: nothing in it depends on the keys. Raises ``RuntimeError`` if
    scapy's layout lacks a field or gives it another size than WireGuard's."""
    global _INITIATION
    if _INITIATION is not None:
        return _INITIATION
    from scapy.contrib.wireguard import Wireguard, WireguardInitiation

    built = Wireguard(message_type=MESSAGE_INITIATION, reserved_zero=0) / WireguardInitiation()
    packet = bytes(built)
    # Each field's position in the built packet: the bytes scapy's own
    # field code writes for it, one after the other, layer by layer.
    where: dict[str, slice] = {}
    offset = 0
    for layer in (built, built[WireguardInitiation]):
        for fld in layer.fields_desc:
            size = len(fld.addfield(layer, b"", layer.getfieldval(fld.name)))
            where[fld.name] = slice(offset, offset + size)
            offset += size
    if offset != len(packet) or len(packet) != INITIATION_SIZE:
        raise RuntimeError(f"scapy builds a {len(packet)}-byte initiation, not {INITIATION_SIZE}")
    for name, size in _PER_PROBE.items():
        found = where.get(name)
        if found is None or found.stop - found.start != size:
            raise RuntimeError(f"scapy's initiation has no {size}-byte field {name}")
    if packet[where["mac1"].start :] != bytes(2 * MAC_SIZE) or where["mac2"].stop != len(packet):
        raise RuntimeError("scapy's initiation does not end with mac1 and mac2")
    _INITIATION = InitiationTemplate(
        packet,
        where["sender_index"],
        where["unencrypted_ephemeral"],
        where["encrypted_static"],
        where["encrypted_timestamp"],
        where["mac1"],
        where["mac2"],
    )
    return _INITIATION


# --- the initiator ------------------------------------------------------------


def build_initiation(
    keys: Keys,
    *,
    sender_index: int,
    timestamp: bytes,
    ephemeral_private: bytes,
    cookie: Cookie | None = None,
    now: float | None = None,
) -> tuple[bytes, Handshake]:
    """The 148-byte handshake initiation and the state to consume its reply.

    ``timestamp`` is a 12-byte TAI64N stamp (``tai64n.next_timestamp``),
    ``ephemeral_private`` 32 random bytes, ``sender_index`` a random 32-bit
    index. mac2 is ``MAC(cookie, msg[:132])`` when ``cookie`` is given and
    fresh at ``now`` (required with a cookie), else zeros.
    """
    if not 0 <= sender_index <= 0xFFFFFFFF:
        raise ValueError("sender_index must fit in 32 bits")
    _check_len("timestamp", timestamp, TIMESTAMP_SIZE)
    _check_len("ephemeral_private", ephemeral_private, KEY_SIZE)
    if cookie is not None and now is None:
        raise ValueError("now is required with a cookie")

    e_pub = crypto_scalarmult_base(ephemeral_private)
    shared = dh(ephemeral_private, keys.server_public_key)
    assert shared is not None, "Keys refuses a low-order server key"
    # C = KDF1(C, E_pub); H = HASH(H || E_pub); (C, k) = KDF2(C, DH(E_priv, S_pub_r))
    chaining_key = kdf1(keys._chaining_key, e_pub)
    h = _blake2s(keys._hash + e_pub).digest()
    chaining_key, key = kdf2(chaining_key, shared)
    encrypted_static = _seal(keys.public_key, h, _ZERO_NONCE, key)
    h = _blake2s(h + encrypted_static).digest()
    # (C, k) = KDF2(C, DH(S_priv_i, S_pub_r)), precomputed in Keys
    chaining_key, key = kdf2(chaining_key, keys._static_static)
    encrypted_timestamp = _seal(timestamp, h, _ZERO_NONCE, key)
    h = _blake2s(h + encrypted_timestamp).digest()

    template = _INITIATION or initiation_template()
    packet = bytearray(template.packet)
    packet[template.sender_index] = sender_index.to_bytes(4, "little")
    packet[template.ephemeral] = e_pub
    packet[template.static] = encrypted_static
    packet[template.timestamp] = encrypted_timestamp
    mac1 = _blake2s(
        packet[: template.mac1.start], digest_size=MAC_SIZE, key=keys._mac1_key_out
    ).digest()
    packet[template.mac1] = mac1
    if cookie is not None and now is not None and cookie.fresh(now):
        packet[template.mac2] = _blake2s(
            packet[: template.mac2.start], digest_size=MAC_SIZE, key=cookie.value
        ).digest()
    message = bytes(packet)
    return message, Handshake(sender_index, chaining_key, h, ephemeral_private, e_pub, mac1)


def new_initiation(
    keys: Keys,
    *,
    timestamp: bytes,
    cookie: Cookie | None = None,
    now: float | None = None,
) -> tuple[bytes, Handshake]:
    """``build_initiation`` with a fresh random ephemeral key and sender index."""
    random = os.urandom(KEY_SIZE + 4)  # one getrandom() for both
    return build_initiation(
        keys,
        sender_index=int.from_bytes(random[KEY_SIZE:], "little"),
        timestamp=timestamp,
        ephemeral_private=random[:KEY_SIZE],
        cookie=cookie,
        now=now,
    )


def consume_response(handshake: Handshake, keys: Keys, datagram: Datagram) -> Result:
    """``Accepted`` iff ``datagram`` is the verified response to ``handshake``.

    Checks, cheapest first: size 92, type 2 with zero reserved bytes,
    receiver index == our sender index, mac1 keyed by HASH(LABEL_MAC1 ||
    probe public key); then the DH/PSK mixing and the empty payload's AEAD.
    mac2 is not checked (the initiator never asks for one). A handshake
    should be consumed into ``Accepted`` once; drop it afterwards.
    """
    datagram = bytes(datagram)
    if len(datagram) != RESPONSE_SIZE:
        return _SIZE
    if datagram[:4] != _HEADER_RESPONSE:
        return _TYPE
    if datagram[RESP_RECEIVER:RESP_EPHEMERAL] != handshake.sender_index.to_bytes(4, "little"):
        return _INDEX
    expected_mac1 = _blake2s(
        datagram[:RESP_MAC1], digest_size=MAC_SIZE, key=keys._mac1_key_in
    ).digest()
    if not secrets.compare_digest(expected_mac1, datagram[RESP_MAC1 : RESP_MAC1 + MAC_SIZE]):
        return _MAC1

    e_pub_r = datagram[RESP_EPHEMERAL:RESP_EMPTY]
    # C = KDF1(C, E_pub_r); H = HASH(H || E_pub_r)
    chaining_key = kdf1(handshake.chaining_key, e_pub_r)
    h = _blake2s(handshake.hash + e_pub_r).digest()
    # C = KDF1(C, DH(E_priv_i, E_pub_r)); C = KDF1(C, DH(S_priv_i, E_pub_r))
    ee = dh(handshake.ephemeral, e_pub_r)
    if ee is None:  # a low-order ephemeral
        return _EPHEMERAL
    chaining_key = kdf1(chaining_key, ee)
    se = dh(keys.private_key, e_pub_r)
    if se is None:  # pragma: no cover - low order already caught by ee
        return _EPHEMERAL
    chaining_key = kdf1(chaining_key, se)
    # (C, tau, k) = KDF3(C, Q); H = HASH(H || tau); empty = AEAD(k, 0, e, H)
    _, tau, key = kdf3(chaining_key, keys.preshared_key)
    h = _blake2s(h + tau).digest()
    try:
        _open(datagram[RESP_EMPTY:RESP_MAC1], h, _ZERO_NONCE, key)
    except CryptoError:
        return _DECRYPT
    return Accepted(int.from_bytes(datagram[RESP_SENDER:RESP_RECEIVER], "little"))


def consume_cookie_reply(
    handshake: Handshake, keys: Keys, datagram: Datagram, now: float
) -> Result:
    """``CookieReceived`` iff ``datagram`` is a valid cookie reply to ``handshake``.

    Size 64, type 3 with zero reserved bytes, receiver index == our sender
    index, and the cookie opens with XChaCha20-Poly1305 under
    HASH(LABEL_COOKIE || server public key), the packet's nonce, and the
    mac1 we sent as AAD. The cookie's receipt time is ``now``.
    """
    datagram = bytes(datagram)
    if len(datagram) != COOKIE_REPLY_SIZE:
        return _SIZE
    if datagram[:4] != _HEADER_COOKIE_REPLY:
        return _TYPE
    if datagram[COOKIE_RECEIVER:COOKIE_NONCE] != handshake.sender_index.to_bytes(4, "little"):
        return _INDEX
    value = xaead_open(
        keys._cookie_key,
        datagram[COOKIE_NONCE:COOKIE_ENCRYPTED],
        datagram[COOKIE_ENCRYPTED:],
        handshake.mac1,
    )
    if value is None:
        return _DECRYPT
    return CookieReceived(Cookie(value, now))


def receiver_index(datagram: Datagram) -> int | None:
    """The receiver index of what has the size and header of a handshake
    response or a cookie reply, else None. Nothing is verified: it only
    says which initiation the datagram claims to answer (``consume`` then
    decides), so a caller holding several can pick the one to try."""
    size = len(datagram)
    if size == RESPONSE_SIZE and datagram[:4] == _HEADER_RESPONSE:
        return int.from_bytes(datagram[RESP_RECEIVER:RESP_EPHEMERAL], "little")
    if size == COOKIE_REPLY_SIZE and datagram[:4] == _HEADER_COOKIE_REPLY:
        return int.from_bytes(datagram[COOKIE_RECEIVER:COOKIE_NONCE], "little")
    return None


def consume(handshake: Handshake, keys: Keys, datagram: Datagram, now: float) -> Result:
    """Dispatch on the message type: a response or a cookie reply; else ``Ignored``."""
    datagram = bytes(datagram)
    if len(datagram) == RESPONSE_SIZE:
        return consume_response(handshake, keys, datagram)
    if len(datagram) == COOKIE_REPLY_SIZE:
        return consume_cookie_reply(handshake, keys, datagram, now)
    if datagram[:4] in (_HEADER_RESPONSE, _HEADER_COOKIE_REPLY):
        return _SIZE
    return _TYPE


QUOTE_MIN: Final = 40
"""Bytes of an initiation an ICMP error must quote to be ours: the header,
the random sender index and the ephemeral key. Linux quotes the whole
datagram (up to 576 bytes of IPv4 packet, 1280 of IPv6); an error quoting
only the UDP header (all RFC 792 demands) cannot be told from a forgery."""


def quotes_initiation(initiation: Datagram, quoted: Datagram) -> bool:
    """True iff ``quoted`` (the UDP payload an ICMP error quotes) is the
    start of ``initiation``, at least ``QUOTE_MIN`` bytes of it."""
    initiation, quoted = bytes(initiation), bytes(quoted)
    length = min(len(initiation), len(quoted))
    return length >= QUOTE_MIN and secrets.compare_digest(initiation[:length], quoted[:length])


# --- scapy, off the hot path --------------------------------------------------


def to_scapy(datagram: Datagram) -> Any:
    """The datagram dissected by scapy's ``Wireguard`` layer (for debugging)."""
    from scapy.contrib.wireguard import Wireguard

    return Wireguard(bytes(datagram))


def verify_scapy_layout() -> None:
    """Check ``LAYOUTS`` against ``scapy.contrib.wireguard``; raise ``AssertionError``.

    For each message type: a datagram whose every byte differs from its
    neighbours must dissect into exactly the fields of ``LAYOUTS`` (names,
    order, values at our offsets, nothing left over), and scapy must build
    the same bytes back from those field values.
    """
    from scapy.contrib import wireguard as wg
    from scapy.packet import Raw

    for message_type, (layer_name, fields) in LAYOUTS.items():
        layer = getattr(wg, layer_name)
        size = MESSAGE_SIZES[message_type]
        end = fields[-1][1] + fields[-1][2]
        if end != size:
            raise AssertionError(f"{layer_name}: fields end at {end}, message is {size}")
        for (_, offset, length), (_, next_offset, _) in itertools.pairwise(fields):
            if offset + length != next_offset:
                raise AssertionError(f"{layer_name}: gap or overlap at {offset}")
        names = [f.name for f in wg.Wireguard.fields_desc] + [f.name for f in layer.fields_desc]
        if names != [name for name, _, _ in fields]:
            raise AssertionError(f"{layer_name}: scapy fields {names}")
        sample = bytes([message_type]) + bytes((7 * i + 3) % 251 for i in range(1, size))
        packet = wg.Wireguard(sample)
        if not isinstance(packet.payload, layer) or Raw in packet:
            raise AssertionError(f"{layer_name}: scapy dissects {packet.summary()}")
        values: dict[str, Any] = {}
        for name, offset, length in fields:
            chunk = sample[offset : offset + length]
            got = packet.getfieldval(name)
            if name == "reserved_zero":
                want: Any = int.from_bytes(chunk, "big")
            elif length == 1:
                want = chunk[0]
            elif name.endswith("_index"):
                want = int.from_bytes(chunk, "little")
            else:
                want = chunk
            if got != want:
                raise AssertionError(f"{layer_name}.{name}: scapy {got!r}, ours {want!r}")
            values[name] = want
        header = {k: values.pop(k) for k in ("message_type", "reserved_zero")}
        if bytes(wg.Wireguard(**header) / layer(**values)) != sample:
            raise AssertionError(f"{layer_name}: scapy builds different bytes")
