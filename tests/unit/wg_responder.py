"""A minimal WireGuard Noise_IKpsk2 RESPONDER, for tests and benchmarks only.

Written from the whitepaper (section 5.4) and wireguard-go's noise-protocol.go
and cookie.go, independently of ``natfail.core.noise``: it shares only the
primitives (libsodium's X25519, ChaCha20-Poly1305 and XChaCha20-Poly1305
through PyNaCl's ``nacl.bindings``, ``hashlib`` BLAKE2s and the stdlib
``hmac`` module). It parses initiations and builds responses and cookie replies
with scapy's ``scapy.contrib.wireguard`` layers, so the tests also show that
scapy-built packets are consumed correctly by the initiator.

Slow (scapy), and it raises ``Rejected`` on anything wrong: it is a test
oracle, not a server.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field

from nacl.bindings import (
    crypto_aead_chacha20poly1305_ietf_decrypt,
    crypto_aead_chacha20poly1305_ietf_encrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError
from nacl.exceptions import RuntimeError as SodiumError
from scapy.contrib.wireguard import (
    Wireguard,
    WireguardCookieReply,
    WireguardInitiation,
    WireguardResponse,
)

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"
ZERO12 = bytes(12)
# 198.51.100.7:51820 as wireguard-go feeds it to the cookie MAC: IP, then port little-endian.
DEFAULT_SOURCE = b"\xc6\x33\x64\x07\x6c\xca"


class Rejected(Exception):
    """The responder drops the packet; ``args[0]`` says why."""


def HASH(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def MAC(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def HMAC(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.blake2s).digest()


def KDF(n: int, key: bytes, data: bytes) -> list[bytes]:
    t0 = HMAC(key, data)
    out: list[bytes] = []
    prev = b""
    for i in range(1, n + 1):
        prev = HMAC(t0, prev + bytes([i]))
        out.append(prev)
    return out


def DH(private: bytes, public: bytes) -> bytes:
    try:
        return crypto_scalarmult(private, public)
    except SodiumError:  # libsodium refuses an all-zero result (a low-order point)
        raise Rejected("low-order point") from None


def DH_PUB(private: bytes) -> bytes:
    return crypto_scalarmult_base(private)


def AEAD(key: bytes, counter: int, plaintext: bytes, aad: bytes) -> bytes:
    nonce = b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")
    return crypto_aead_chacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def AEAD_OPEN(key: bytes, counter: int, ciphertext: bytes, aad: bytes) -> bytes:
    nonce = b"\x00\x00\x00\x00" + counter.to_bytes(8, "little")
    try:
        return crypto_aead_chacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key)
    except CryptoError:
        raise Rejected("aead") from None


def XAEAD(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


@dataclass
class Peer:
    public_key: bytes
    preshared_key: bytes = bytes(32)
    last_timestamp: bytes = b""  # any 12-byte stamp is greater


@dataclass
class Consumed:
    """A verified initiation: what the responder needs to answer it."""

    peer: Peer
    sender_index: int
    ephemeral_public: bytes
    timestamp: bytes
    chaining_key: bytes
    hash: bytes


@dataclass
class Responder:
    private_key: bytes
    peers: dict[bytes, Peer] = field(default_factory=dict)
    under_load: bool = False
    cookie_secret: bytes = field(default_factory=lambda: os.urandom(32))

    @property
    def public_key(self) -> bytes:
        return DH_PUB(self.private_key)

    def add_peer(self, public_key: bytes, preshared_key: bytes = bytes(32)) -> Peer:
        peer = Peer(public_key, preshared_key)
        self.peers[public_key] = peer
        return peer

    # -- cookies (whitepaper 5.4.7; wireguard-go cookie.go) --

    def cookie_for(self, source: bytes = DEFAULT_SOURCE) -> bytes:
        return MAC(self.cookie_secret, source)

    def mac1_valid(self, datagram: bytes) -> bool:
        return hmac.compare_digest(
            MAC(HASH(LABEL_MAC1 + self.public_key), datagram[:-32]), datagram[-32:-16]
        )

    def mac2_valid(self, datagram: bytes, source: bytes = DEFAULT_SOURCE) -> bool:
        return hmac.compare_digest(MAC(self.cookie_for(source), datagram[:-16]), datagram[-16:])

    def cookie_reply(
        self, initiation: bytes, source: bytes = DEFAULT_SOURCE, nonce: bytes | None = None
    ) -> bytes:
        packet = Wireguard(initiation)
        nonce = os.urandom(24) if nonce is None else nonce
        sealed = XAEAD(
            HASH(LABEL_COOKIE + self.public_key),
            nonce,
            self.cookie_for(source),
            packet[WireguardInitiation].mac1,
        )
        reply = Wireguard(message_type=3) / WireguardCookieReply(
            receiver_index=packet[WireguardInitiation].sender_index,
            nonce=nonce,
            encrypted_cookie=sealed,
        )
        return bytes(reply)

    # -- the handshake (whitepaper 5.4.2 and 5.4.3, responder's side) --

    def consume_initiation(
        self, datagram: bytes, source: bytes = DEFAULT_SOURCE, *, impostor: bytes | None = None
    ) -> Consumed:
        """Verify an initiation; ``Rejected`` if the real responder would drop it.

        ``impostor``: the static public key of the peer to pretend the
        initiation came from; the chain is then computed with our (wrong)
        private key and AEAD failures are ignored, to forge a response that
        is right in every public part.
        """
        if len(datagram) != 148:
            raise Rejected("size")
        packet = Wireguard(datagram)
        if packet.message_type != 1 or packet.reserved_zero != 0:
            raise Rejected("type")
        init = packet[WireguardInitiation]
        if impostor is None:
            if not self.mac1_valid(datagram):
                raise Rejected("mac1")
            if self.under_load and not self.mac2_valid(datagram, source):
                raise Rejected("cookie needed")
        s_pub_r = self.public_key
        c = HASH(CONSTRUCTION)
        h = HASH(HASH(c + IDENTIFIER) + s_pub_r)
        e_pub_i = init.unencrypted_ephemeral
        (c,) = KDF(1, c, e_pub_i)
        h = HASH(h + e_pub_i)
        c, k = KDF(2, c, DH(self.private_key, e_pub_i))
        s_pub_i = AEAD_OPEN(k, 0, init.encrypted_static, h) if impostor is None else impostor
        h = HASH(h + init.encrypted_static)
        peer = self.peers.get(s_pub_i) if impostor is None else Peer(impostor)
        if peer is None:
            raise Rejected("unknown peer")
        c, k = KDF(2, c, DH(self.private_key, s_pub_i))
        if impostor is None:
            timestamp = AEAD_OPEN(k, 0, init.encrypted_timestamp, h)
            if not timestamp > peer.last_timestamp:  # bytes.Compare(...) > 0
                raise Rejected("replay")
            peer.last_timestamp = timestamp
        else:
            timestamp = b""
        h = HASH(h + init.encrypted_timestamp)
        return Consumed(peer, init.sender_index, e_pub_i, timestamp, c, h)

    def create_response(
        self,
        consumed: Consumed,
        *,
        sender_index: int = 0x11223344,
        ephemeral_private: bytes | None = None,
        preshared_key: bytes | None = None,
        mac1_key: bytes | None = None,
    ) -> bytes:
        """The handshake response. The keyword overrides exist to build bad ones."""
        e_priv = os.urandom(32) if ephemeral_private is None else ephemeral_private
        e_pub_r = DH_PUB(e_priv)
        c, h = consumed.chaining_key, consumed.hash
        (c,) = KDF(1, c, e_pub_r)
        h = HASH(h + e_pub_r)
        (c,) = KDF(1, c, DH(e_priv, consumed.ephemeral_public))
        (c,) = KDF(1, c, DH(e_priv, consumed.peer.public_key))
        psk = consumed.peer.preshared_key if preshared_key is None else preshared_key
        c, tau, k = KDF(3, c, psk)
        h = HASH(h + tau)
        empty = AEAD(k, 0, b"", h)
        response = Wireguard(message_type=2) / WireguardResponse(
            sender_index=sender_index,
            receiver_index=consumed.sender_index,
            unencrypted_ephemeral=e_pub_r,
            encrypted_nothing=empty,
            mac1=bytes(16),
            mac2=bytes(16),
        )
        raw = bytes(response)
        key = HASH(LABEL_MAC1 + consumed.peer.public_key) if mac1_key is None else mac1_key
        return raw[:60] + MAC(key, raw[:60]) + bytes(16)

    def respond(
        self,
        initiation: bytes,
        source: bytes = DEFAULT_SOURCE,
        *,
        sender_index: int = 0x11223344,
        ephemeral_private: bytes | None = None,
    ) -> bytes:
        """What a WireGuard server sends back: a cookie reply when under load
        and mac2 is not valid, else the response."""
        if not self.mac1_valid(initiation):
            raise Rejected("mac1")
        if self.under_load and not self.mac2_valid(initiation, source):
            return self.cookie_reply(initiation, source)
        consumed = self.consume_initiation(initiation, source)
        return self.create_response(
            consumed, sender_index=sender_index, ephemeral_private=ephemeral_private
        )


def forge_cookie_reply(
    server_public_key: bytes, initiation: bytes, cookie: bytes, nonce: bytes | None = None
) -> bytes:
    """A valid cookie reply to ``initiation``, made from the server's PUBLIC
    key alone (as anyone can): ``cookie`` is any 16 bytes the forger likes."""
    packet = Wireguard(initiation)
    nonce = os.urandom(24) if nonce is None else nonce
    sealed = XAEAD(
        HASH(LABEL_COOKIE + server_public_key), nonce, cookie, packet[WireguardInitiation].mac1
    )
    reply = Wireguard(message_type=3) / WireguardCookieReply(
        receiver_index=packet[WireguardInitiation].sender_index,
        nonce=nonce,
        encrypted_cookie=sealed,
    )
    return bytes(reply)


def with_mac1(datagram: bytes, key: bytes) -> bytes:
    """A response with its mac1 recomputed under ``key`` (to get past mac1)."""
    return datagram[:60] + MAC(key, datagram[:60]) + datagram[76:]
