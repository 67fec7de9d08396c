"""XChaCha20-Poly1305, as WireGuard seals its cookie replies.

``cryptography`` has ChaCha20-Poly1305 (RFC 8439) but no XChaCha. XChaCha is
that AEAD under a subkey: ``HChaCha20(key, nonce[:16])`` with the 12-byte
nonce ``0x00000000 || nonce[16:24]`` (draft-irtf-cfrg-xchacha-03, section
2.3). HChaCha20 is twenty ChaCha rounds without the final addition of the
input state; it runs once per cookie reply, which a backend sends only when
under load, so plain Python is fast enough (a few tens of microseconds).

Pure: no I/O, nothing random. Verified against the draft's test vectors in
``tests/unit/test_noise.py``.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

KEY_SIZE = 32
NONCE_SIZE = 24
TAG_SIZE = 16

_MASK32 = 0xFFFFFFFF
# "expand 32-byte k", little-endian words.
_SIGMA = (0x61707865, 0x3320646E, 0x79622D32, 0x6B206574)
_WORDS8 = struct.Struct("<8I")
_WORDS4 = struct.Struct("<4I")


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20(key, 16-byte nonce) -> 32-byte subkey (draft-irtf-cfrg-xchacha, 2.2)."""
    if len(key) != KEY_SIZE:
        raise ValueError("HChaCha20 key must be 32 bytes")
    if len(nonce16) != 16:
        raise ValueError("HChaCha20 nonce must be 16 bytes")
    x = [*_SIGMA, *_WORDS8.unpack(key), *_WORDS4.unpack(nonce16)]

    def qr(a: int, b: int, c: int, d: int) -> None:
        x[a] = (x[a] + x[b]) & _MASK32
        v = x[d] ^ x[a]
        x[d] = ((v << 16) | (v >> 16)) & _MASK32
        x[c] = (x[c] + x[d]) & _MASK32
        v = x[b] ^ x[c]
        x[b] = ((v << 12) | (v >> 20)) & _MASK32
        x[a] = (x[a] + x[b]) & _MASK32
        v = x[d] ^ x[a]
        x[d] = ((v << 8) | (v >> 24)) & _MASK32
        x[c] = (x[c] + x[d]) & _MASK32
        v = x[b] ^ x[c]
        x[b] = ((v << 7) | (v >> 25)) & _MASK32

    for _ in range(10):
        qr(0, 4, 8, 12)
        qr(1, 5, 9, 13)
        qr(2, 6, 10, 14)
        qr(3, 7, 11, 15)
        qr(0, 5, 10, 15)
        qr(1, 6, 11, 12)
        qr(2, 7, 8, 13)
        qr(3, 4, 9, 14)
    return _WORDS8.pack(x[0], x[1], x[2], x[3], x[12], x[13], x[14], x[15])


def _aead(key: bytes, nonce: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    if len(nonce) != NONCE_SIZE:
        raise ValueError("XChaCha20-Poly1305 nonce must be 24 bytes")
    return ChaCha20Poly1305(hchacha20(key, nonce[:16])), b"\x00\x00\x00\x00" + nonce[16:]


def seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """XChaCha20-Poly1305 encrypt: ciphertext || 16-byte tag."""
    aead, inner_nonce = _aead(key, nonce)
    return aead.encrypt(inner_nonce, plaintext, aad)


def open_(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """XChaCha20-Poly1305 decrypt; raises ``cryptography.exceptions.InvalidTag``."""
    aead, inner_nonce = _aead(key, nonce)
    return aead.decrypt(inner_nonce, ciphertext, aad)
