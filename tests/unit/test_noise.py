"""natfail.core.noise and tai64n: the WireGuard initiator over bytes."""

from __future__ import annotations

import hashlib
import hmac as std_hmac
import subprocess
import sys
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from natfail.core import noise, tai64n
from natfail.core.noise import (
    Accepted,
    Cookie,
    CookieReceived,
    Handshake,
    Ignored,
    Keys,
    build_initiation,
    consume,
    consume_cookie_reply,
    consume_response,
)
from tests.unit.wg_responder import Rejected, Responder, with_mac1

PROBE_PRIVATE = bytes.fromhex("a8" * 31 + "48")
SERVER_PRIVATE = bytes.fromhex("b0" * 31 + "50")
OTHER_PRIVATE = bytes.fromhex("c0" * 31 + "60")
EPHEMERAL = bytes.fromhex("e0" * 31 + "41")
PSK = bytes(range(32))
TS0 = tai64n.tai64n(1_700_000_000 * 10**9)
NOW = 1000.0  # monotonic seconds


def server_public() -> bytes:
    return noise.public_key(SERVER_PRIVATE)


def make_keys(psk: bytes = bytes(32)) -> Keys:
    return Keys(PROBE_PRIVATE, server_public(), psk)


def make_responder(keys: Keys, psk: bytes | None = None) -> Responder:
    responder = Responder(SERVER_PRIVATE, cookie_secret=b"\x42" * 32)
    responder.add_peer(keys.public_key, keys.preshared_key if psk is None else psk)
    return responder


def initiate(
    keys: Keys,
    index: int = 0x01020304,
    timestamp: bytes = TS0,
    cookie: Cookie | None = None,
    now: float | None = None,
) -> tuple[bytes, Handshake]:
    return build_initiation(
        keys,
        sender_index=index,
        timestamp=timestamp,
        ephemeral_private=EPHEMERAL,
        cookie=cookie,
        now=now,
    )


@pytest.fixture(scope="module")
def exchange() -> tuple[Keys, Handshake, bytes, bytes]:
    """keys, handshake, initiation and a valid response to it."""
    keys = make_keys()
    message, handshake = initiate(keys)
    response = make_responder(keys).respond(message, sender_index=0xA1B2C3D4)
    return keys, handshake, message, response


# --- constants and layout ---------------------------------------------------


def test_constants_match_wireguard() -> None:
    assert noise.CONSTRUCTION == b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
    assert noise.IDENTIFIER == b"WireGuard v1 zx2c4 Jason@zx2c4.com"
    assert (noise.LABEL_MAC1, noise.LABEL_COOKIE) == (b"mac1----", b"cookie--")
    assert (noise.INITIATION_SIZE, noise.RESPONSE_SIZE, noise.COOKIE_REPLY_SIZE) == (148, 92, 64)
    assert (noise.MESSAGE_INITIATION, noise.MESSAGE_RESPONSE) == (1, 2)
    assert (noise.MESSAGE_COOKIE_REPLY, noise.MESSAGE_TRANSPORT) == (3, 4)


def test_layout_matches_scapy() -> None:
    noise.verify_scapy_layout()


def test_hot_path_offsets_match_layout() -> None:
    def offset(message_type: int, name: str) -> int:
        return {n: o for n, o, _ in noise.LAYOUTS[message_type][1]}[name]

    init, resp, cookie = (
        noise.MESSAGE_INITIATION,
        noise.MESSAGE_RESPONSE,
        noise.MESSAGE_COOKIE_REPLY,
    )
    assert offset(init, "mac1") == noise.INIT_MAC1
    assert offset(init, "mac2") == noise.INIT_MAC2
    assert offset(resp, "sender_index") == noise.RESP_SENDER
    assert offset(resp, "receiver_index") == noise.RESP_RECEIVER
    assert offset(resp, "unencrypted_ephemeral") == noise.RESP_EPHEMERAL
    assert offset(resp, "encrypted_nothing") == noise.RESP_EMPTY
    assert offset(resp, "mac1") == noise.RESP_MAC1
    assert offset(cookie, "receiver_index") == noise.COOKIE_RECEIVER
    assert offset(cookie, "nonce") == noise.COOKIE_NONCE
    assert offset(cookie, "encrypted_cookie") == noise.COOKIE_ENCRYPTED


def test_scapy_dissects_our_initiation(exchange: tuple[Keys, Handshake, bytes, bytes]) -> None:
    from scapy.contrib.wireguard import WireguardInitiation

    _, handshake, message, _ = exchange
    packet = noise.to_scapy(message)
    assert packet.message_type == 1 and packet.reserved_zero == 0
    init = packet[WireguardInitiation]
    assert init.sender_index == handshake.sender_index == 0x01020304
    assert init.unencrypted_ephemeral == handshake.ephemeral_public
    assert init.unencrypted_ephemeral == noise.public_key(EPHEMERAL)
    assert len(init.encrypted_static) == 48 and len(init.encrypted_timestamp) == 28
    assert init.mac1 == handshake.mac1
    assert init.mac2 == bytes(16)
    assert bytes(packet) == message


def test_the_initiation_template_is_scapys() -> None:
    """The hot path fills scapy's packet at the positions scapy reports;
    they are those of LAYOUTS, and the constant fields are scapy's."""
    from scapy.contrib.wireguard import Wireguard, WireguardInitiation

    template = noise.initiation_template()
    assert template is noise.initiation_template()  # built once
    assert template.packet == bytes(Wireguard(message_type=1) / WireguardInitiation())
    layout = {n: slice(o, o + size) for n, o, size in noise.LAYOUTS[noise.MESSAGE_INITIATION][1]}
    assert template.sender_index == layout["sender_index"]
    assert template.ephemeral == layout["unencrypted_ephemeral"]
    assert template.static == layout["encrypted_static"]
    assert template.timestamp == layout["encrypted_timestamp"]
    assert (template.mac1, template.mac2) == (layout["mac1"], layout["mac2"])


def test_scapy_builds_the_same_initiation_from_its_fields() -> None:
    from scapy.contrib.wireguard import Wireguard, WireguardInitiation

    keys = Keys(bytes(range(32)), noise.public_key(bytes(range(1, 33))))
    cookie = noise.Cookie(bytes(range(16)), 0.0)
    message, handshake = noise.build_initiation(
        keys,
        sender_index=0xA1B2C3D4,
        timestamp=tai64n.tai64n(1_700_000_000 * 10**9),
        ephemeral_private=bytes(range(2, 34)),
        cookie=cookie,
        now=1.0,
    )
    init = noise.to_scapy(message)[WireguardInitiation]
    rebuilt = Wireguard(message_type=1) / WireguardInitiation(
        sender_index=0xA1B2C3D4,
        unencrypted_ephemeral=handshake.ephemeral_public,
        encrypted_static=init.encrypted_static,
        encrypted_timestamp=init.encrypted_timestamp,
        mac1=handshake.mac1,
        mac2=noise.mac(cookie.value, message[:132]),
    )
    assert bytes(rebuilt) == message


def test_keys_and_replies_do_not_pull_scapy() -> None:
    """Only building an initiation does: the agent's side of the Noise core
    (keys, replies) must work without it."""
    code = (
        "import sys\n"
        "from natfail.core import noise\n"
        "k = noise.Keys(bytes(32), noise.public_key(bytes(range(32))))\n"
        "noise.quotes_initiation(bytes(148), bytes(40))\n"
        "sys.exit('scapy' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_import_does_not_pull_scapy() -> None:
    code = "import sys, natfail.core.noise, natfail.core.tai64n; sys.exit('scapy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- primitives ---------------------------------------------------------------


@given(st.binary(min_size=0, max_size=64), st.binary(max_size=200))
def test_hmac_is_rfc2104_blake2s(key: bytes, data: bytes) -> None:
    assert noise.hmac(key, data) == std_hmac.new(key, data, hashlib.blake2s).digest()


@given(st.binary(min_size=32, max_size=32), st.binary(max_size=100))
def test_kdf_is_hkdf_as_whitepaper(key: bytes, data: bytes) -> None:
    def ref(n: int) -> list[bytes]:
        t0 = std_hmac.new(key, data, hashlib.blake2s).digest()
        out, prev = [], b""
        for i in range(1, n + 1):
            prev = std_hmac.new(t0, prev + bytes([i]), hashlib.blake2s).digest()
            out.append(prev)
        return out

    assert [noise.kdf1(key, data)] == ref(1)
    assert list(noise.kdf2(key, data)) == ref(2)
    assert list(noise.kdf3(key, data)) == ref(3)


def test_x25519_rfc7748_vector() -> None:
    # RFC 7748, section 6.1
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    alice_public = noise.public_key(alice)
    bob_public = noise.public_key(bob)
    assert alice_public.hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    assert bob_public.hex() == "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert noise.dh(alice, bob_public) == noise.dh(bob, alice_public) == bytes.fromhex(shared)


def test_x25519_low_order_is_a_failed_dh_not_an_exception() -> None:
    # libsodium refuses an all-zero result; noise.dh turns that into None.
    assert noise.dh(PROBE_PRIVATE, bytes(32)) is None
    assert noise.dh(PROBE_PRIVATE, (1).to_bytes(32, "little")) is None


# RFC 8439, appendix A.5: its nonce 00000000 || 0102030405060708 is a Noise
# nonce (32 zero bits, then a 64-bit little-endian counter).
A5_KEY = bytes.fromhex("1c9240a5eb55d38af333888604f6b5f0473917c1402b80099dca5cbc207075c0")
A5_COUNTER = 0x0807060504030201
A5_AAD = bytes.fromhex("f33388860000000000004e91")
A5_PLAINTEXT = (
    b"Internet-Drafts are draft documents valid for a maximum of six months and may be"
    b" updated, replaced, or obsoleted by other documents at any time. It is inappropriate"
    b" to use Internet-Drafts as reference material or to cite them other than as"
    b" /\xe2\x80\x9cwork in progress./\xe2\x80\x9d"
)
A5_SEALED = bytes.fromhex(
    "64a0861575861af460f062c79be643bd5e805cfd345cf389f108670ac76c8cb2"
    "4c6cfc18755d43eea09ee94e382d26b0bdb7b73c321b0100d4f03b7f355894cf"
    "332f830e710b97ce98c8a84abd0b948114ad176e008d33bd60f982b1ff37c855"
    "9797a06ef4f0ef61c186324e2b3506383606907b6a7c02b0f9f6157b53c867e4"
    "b9166c767b804d46a59b5216cde7a4e99040c5a40433225ee282a1b0a06c523e"
    "af4534d7f83fa1155b0047718cbc546a0d072b04b3564eea1b422273f548271a"
    "0bb2316053fa76991955ebd63159434ecebb4e466dae5a1073a6727627097a10"
    "49e617d91d361094fa68f0ff77987130305beaba2eda04df997b714d6c6f2c29"
    "a6ad5cb4022b02709b"
    "eead9d67890cbb22392336fea1851f38"  # tag
)


def test_chacha20poly1305_rfc8439_vector() -> None:
    assert noise.aead_seal(A5_KEY, A5_COUNTER, A5_PLAINTEXT, A5_AAD) == A5_SEALED
    assert noise.aead_open(A5_KEY, A5_COUNTER, A5_SEALED, A5_AAD) == A5_PLAINTEXT


# draft-irtf-cfrg-xchacha-03, appendix A.3.1
XC_KEY = bytes(range(0x80, 0xA0))
XC_NONCE = bytes(range(0x40, 0x58))
XC_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
XC_PLAINTEXT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip"
    b" for the future, sunscreen would be it."
)
XC_SEALED = bytes.fromhex(
    "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb"
    "731c7f1b0b4aa6440bf3a82f4eda7e39ae64c6708c54c216cb96b72e1213b452"
    "2f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc369488f76b2383565d3fff9"
    "21f9664c97637da9768812f615c68b13b52e"
    "c0875924c1c7987947deafd8780acf49"  # tag
)


def test_xchacha20poly1305_draft_vector() -> None:
    assert noise.xaead_seal(XC_KEY, XC_NONCE, XC_PLAINTEXT, XC_AAD) == XC_SEALED
    assert noise.xaead_open(XC_KEY, XC_NONCE, XC_SEALED, XC_AAD) == XC_PLAINTEXT


@pytest.mark.parametrize("x", [False, True], ids=["chacha", "xchacha"])
def test_aead_open_returns_none_never_raises(x: bool) -> None:
    """A bad tag, a changed byte or AAD, the wrong nonce, a short ciphertext:
    None, as callers expect (libsodium raises CryptoError)."""
    if x:
        key, nonce, sealed, aad = XC_KEY, XC_NONCE, XC_SEALED, XC_AAD

        def open_(k: bytes, n: bytes, c: bytes, a: bytes) -> bytes | None:
            return noise.xaead_open(k, n, c, a)

        other_nonce = bytes(24)
    else:
        key, sealed, aad = A5_KEY, A5_SEALED, A5_AAD
        nonce = A5_COUNTER.to_bytes(8, "little")

        def open_(k: bytes, n: bytes, c: bytes, a: bytes) -> bytes | None:
            return noise.aead_open(k, int.from_bytes(n, "little"), c, a)

        other_nonce = bytes(8)
    flipped = bytes([sealed[0] ^ 1]) + sealed[1:]
    bad_tag = sealed[:-1] + bytes([sealed[-1] ^ 0x80])
    assert open_(key, nonce, flipped, aad) is None
    assert open_(key, nonce, bad_tag, aad) is None
    assert open_(key, nonce, sealed, aad + b"x") is None
    assert open_(key, other_nonce, sealed, aad) is None
    assert open_(bytes(32), nonce, sealed, aad) is None
    for size in (0, 1, 15, 16):
        assert open_(key, nonce, sealed[:size], aad) is None


@given(
    st.binary(min_size=32, max_size=32),
    st.integers(0, 2**64 - 1),
    st.binary(min_size=24, max_size=24),
    st.binary(max_size=300),
    st.binary(max_size=64),
)
@settings(max_examples=50)
def test_aead_round_trip(
    key: bytes, counter: int, nonce: bytes, plaintext: bytes, aad: bytes
) -> None:
    sealed = noise.aead_seal(key, counter, plaintext, aad)
    assert len(sealed) == len(plaintext) + noise.AEAD_TAG_SIZE
    assert noise.aead_open(key, counter, sealed, aad) == plaintext
    xsealed = noise.xaead_seal(key, nonce, plaintext, aad)
    assert len(xsealed) == len(plaintext) + noise.AEAD_TAG_SIZE
    assert noise.xaead_open(key, nonce, xsealed, aad) == plaintext


# --- keys ---------------------------------------------------------------------


def test_keys_derive_public_and_hide_secrets() -> None:
    keys = make_keys(PSK)
    assert keys.public_key == noise.public_key(PROBE_PRIVATE)
    assert PROBE_PRIVATE.hex() not in repr(keys) and repr(PROBE_PRIVATE) not in repr(keys)
    assert repr(PSK) not in repr(keys)
    assert keys == make_keys(PSK)


@pytest.mark.parametrize(
    ("private", "server", "psk"),
    [
        (bytes(31), bytes(32), bytes(32)),
        (PROBE_PRIVATE, bytes(33), bytes(32)),
        (PROBE_PRIVATE, bytes(32), bytes(16)),
        (PROBE_PRIVATE, bytes(32), bytes(32)),  # the zero point: low order
        (PROBE_PRIVATE, (1).to_bytes(32, "little"), bytes(32)),  # low order
    ],
)
def test_keys_refuse_bad_input(private: bytes, server: bytes, psk: bytes) -> None:
    with pytest.raises(ValueError):
        Keys(private, server, psk)


def test_build_refuses_caller_mistakes() -> None:
    keys = make_keys()
    with pytest.raises(ValueError):
        build_initiation(keys, sender_index=2**32, timestamp=TS0, ephemeral_private=EPHEMERAL)
    with pytest.raises(ValueError):
        build_initiation(keys, sender_index=-1, timestamp=TS0, ephemeral_private=EPHEMERAL)
    with pytest.raises(ValueError):
        build_initiation(keys, sender_index=1, timestamp=TS0[:11], ephemeral_private=EPHEMERAL)
    with pytest.raises(ValueError):
        build_initiation(keys, sender_index=1, timestamp=TS0, ephemeral_private=EPHEMERAL[:31])
    with pytest.raises(ValueError):
        build_initiation(
            keys,
            sender_index=1,
            timestamp=TS0,
            ephemeral_private=EPHEMERAL,
            cookie=Cookie(bytes(16), NOW),
        )


def test_cookie_must_be_16_bytes() -> None:
    with pytest.raises(ValueError):
        Cookie(bytes(32), NOW)


def test_build_is_deterministic() -> None:
    keys = make_keys()
    assert initiate(keys)[0] == initiate(keys)[0]
    assert initiate(keys)[0] != initiate(keys, index=2)[0]
    assert initiate(keys)[0] != initiate(keys, timestamp=tai64n.successor(TS0))[0]


def test_new_initiation_draws_randomness() -> None:
    keys = make_keys()
    (m1, h1), (m2, h2) = (noise.new_initiation(keys, timestamp=TS0) for _ in range(2))
    assert h1.ephemeral_public != h2.ephemeral_public and m1 != m2
    responder = make_responder(keys)
    assert consume_response(h1, keys, responder.respond(m1)) == Accepted(0x11223344)


# --- the happy paths ----------------------------------------------------------


def test_responder_reads_our_initiation() -> None:
    keys = make_keys()
    message, _ = initiate(keys)
    consumed = make_responder(keys).consume_initiation(message)
    assert consumed.peer.public_key == keys.public_key
    assert consumed.timestamp == TS0
    assert consumed.sender_index == 0x01020304
    assert consumed.ephemeral_public == noise.public_key(EPHEMERAL)


def test_response_accepted(exchange: tuple[Keys, Handshake, bytes, bytes]) -> None:
    keys, handshake, _, response = exchange
    assert consume_response(handshake, keys, response) == Accepted(0xA1B2C3D4)
    assert consume(handshake, keys, response, NOW) == Accepted(0xA1B2C3D4)
    assert consume(handshake, keys, bytearray(response), NOW) == Accepted(0xA1B2C3D4)


def test_response_with_psk_accepted() -> None:
    keys = make_keys(PSK)
    message, handshake = initiate(keys)
    response = make_responder(keys).respond(message)
    assert consume(handshake, keys, response, NOW) == Accepted(0x11223344)


def test_responder_refuses_replayed_timestamp() -> None:
    keys = make_keys()
    responder = make_responder(keys)
    first, _ = initiate(keys)
    responder.consume_initiation(first)
    with pytest.raises(Rejected, match="replay"):
        responder.consume_initiation(first)
    older, _ = initiate(keys, timestamp=tai64n.tai64n(1_600_000_000 * 10**9))
    with pytest.raises(Rejected, match="replay"):
        responder.consume_initiation(older)
    later, handshake = initiate(keys, timestamp=tai64n.next_timestamp(0, TS0))
    assert consume(handshake, keys, responder.respond(later), NOW) == Accepted(0x11223344)


# --- every way to fail is Ignored ------------------------------------------


def test_wrong_psk_ignored() -> None:
    keys = make_keys(PSK)
    message, handshake = initiate(keys)
    responder = make_responder(keys, psk=bytes(32))
    assert consume(handshake, keys, responder.respond(message), NOW) == Ignored("decrypt")
    # and the other way round: the server has a PSK, the probe has none
    keys = make_keys()
    message, handshake = initiate(keys)
    responder = make_responder(keys, psk=PSK)
    assert consume(handshake, keys, responder.respond(message), NOW) == Ignored("decrypt")


def test_response_from_a_different_static_ignored() -> None:
    """An impostor without the server key, right in every public part."""
    keys = make_keys()
    message, handshake = initiate(keys)
    impostor = Responder(OTHER_PRIVATE)
    consumed = impostor.consume_initiation(message, impostor=keys.public_key)
    forged = impostor.create_response(consumed)
    assert consume(handshake, keys, forged, NOW) == Ignored("decrypt")
    # the real server would not even read an initiation meant for another key
    with pytest.raises(Rejected, match="mac1"):
        Responder(OTHER_PRIVATE).consume_initiation(message)


def test_wrong_receiver_index_ignored(exchange: tuple[Keys, Handshake, bytes, bytes]) -> None:
    keys, handshake, _, response = exchange
    moved = response[:8] + (handshake.sender_index + 1).to_bytes(4, "little") + response[12:]
    moved = with_mac1(moved, noise.hash_(noise.LABEL_MAC1 + keys.public_key))
    assert consume(handshake, keys, moved, NOW) == Ignored("index")


def test_response_to_another_handshake_ignored() -> None:
    keys = make_keys()
    message, _ = initiate(keys, index=7)
    response = make_responder(keys).respond(message)
    _, other = initiate(keys, index=8)
    assert consume(other, keys, response, NOW) == Ignored("index")
    # same sender index, other initiation (other timestamp): the transcript differs
    _, same_index = initiate(keys, index=7, timestamp=tai64n.successor(TS0))
    assert consume(same_index, keys, response, NOW) == Ignored("decrypt")


def test_bad_mac1_ignored() -> None:
    keys = make_keys()
    message, handshake = initiate(keys)
    responder = make_responder(keys)
    consumed = responder.consume_initiation(message)
    # keyed by the server's key instead of ours
    wrong_key = noise.hash_(noise.LABEL_MAC1 + server_public())
    response = responder.create_response(consumed, mac1_key=wrong_key)
    assert consume(handshake, keys, response, NOW) == Ignored("mac1")
    good = responder.create_response(consumed)
    zeroed = good[:60] + bytes(16) + good[76:]
    assert consume(handshake, keys, zeroed, NOW) == Ignored("mac1")


def test_tampered_response_ignored(exchange: tuple[Keys, Handshake, bytes, bytes]) -> None:
    """Tampering behind a recomputed mac1 (it is keyed by a public key) fails the AEAD."""
    keys, handshake, _, response = exchange
    mac1_key = noise.hash_(noise.LABEL_MAC1 + keys.public_key)
    for position in range(12, 60):  # the ephemeral and encrypted_nothing
        tampered = bytearray(response)
        tampered[position] ^= 0x01
        result = consume(handshake, keys, with_mac1(bytes(tampered), mac1_key), NOW)
        assert result in (Ignored("decrypt"), Ignored("ephemeral")), position


def test_responder_index_is_not_in_the_transcript(
    exchange: tuple[Keys, Handshake, bytes, bytes],
) -> None:
    """As in WireGuard, only mac1 covers the responder's index; the AEAD does not.

    A changed index behind a recomputed mac1 is still a response that only the
    real server could make: it proves the backend alive, with another index.
    """
    keys, handshake, _, response = exchange
    mac1_key = noise.hash_(noise.LABEL_MAC1 + keys.public_key)
    changed = with_mac1(response[:4] + b"\x01\x02\x03\x04" + response[8:], mac1_key)
    assert consume(handshake, keys, changed, NOW) == Accepted(0x04030201)


def test_low_order_ephemeral_ignored(exchange: tuple[Keys, Handshake, bytes, bytes]) -> None:
    keys, handshake, _, response = exchange
    mac1_key = noise.hash_(noise.LABEL_MAC1 + keys.public_key)
    for point in (bytes(32), (1).to_bytes(32, "little")):
        forged = with_mac1(response[:12] + point + response[44:], mac1_key)
        assert consume(handshake, keys, forged, NOW) == Ignored("ephemeral")


def test_wrong_psk_on_consume_ignored(exchange: tuple[Keys, Handshake, bytes, bytes]) -> None:
    _, handshake, _, response = exchange
    other = Keys(PROBE_PRIVATE, server_public(), PSK)
    assert consume(handshake, other, response, NOW) == Ignored("decrypt")


@pytest.mark.parametrize("size", [0, 1, 4, 63, 65, 91, 93, 148, 1500])
def test_wrong_sizes_ignored(exchange: tuple[Keys, Handshake, bytes, bytes], size: int) -> None:
    keys, handshake, _, response = exchange
    datagram = (response * 20)[:size]
    assert consume(handshake, keys, datagram, NOW) in (Ignored("size"), Ignored("type"))
    assert consume_response(handshake, keys, datagram) == Ignored("size")
    assert consume_cookie_reply(handshake, keys, datagram, NOW) in (
        Ignored("size"),
        Ignored("type"),
    )


def test_truncated_and_extended_response_ignored(
    exchange: tuple[Keys, Handshake, bytes, bytes],
) -> None:
    keys, handshake, _, response = exchange
    assert consume(handshake, keys, response[:-1], NOW) == Ignored("size")
    assert consume(handshake, keys, response + b"\x00", NOW) == Ignored("size")


@pytest.mark.parametrize("header", ["01000000", "03000000", "04000000", "02000100", "02000001"])
def test_wrong_type_ignored(exchange: tuple[Keys, Handshake, bytes, bytes], header: str) -> None:
    keys, handshake, _, response = exchange
    datagram = bytes.fromhex(header) + response[4:]
    assert consume(handshake, keys, datagram, NOW) == Ignored("type")
    assert consume_cookie_reply(handshake, keys, datagram[:64], NOW) == Ignored(
        "index" if header == "03000000" else "type"
    )


def test_every_bit_flip_of_a_response_ignored(
    exchange: tuple[Keys, Handshake, bytes, bytes],
) -> None:
    """Every bit flip before mac2 is Ignored.

    mac2 (the last 16 bytes) is not checked: no WireGuard receiver checks it
    unless it is itself under load, and a probe never is. A flip there is
    still the real server's response, so it still proves the backend up.
    """
    keys, handshake, _, response = exchange
    for bit in range(len(response) * 8):
        flipped = bytearray(response)
        flipped[bit // 8] ^= 1 << (bit % 8)
        result = consume(handshake, keys, bytes(flipped), NOW)
        if bit < noise.RESP_MAC1 * 8 + 128:
            assert isinstance(result, Ignored), bit
        else:
            assert result == Accepted(0xA1B2C3D4), bit


def test_every_bit_flip_behind_a_valid_mac1_not_accepted(
    exchange: tuple[Keys, Handshake, bytes, bytes],
) -> None:
    """An attacker can recompute mac1 (it is keyed by a public key): the AEAD must hold."""
    keys, handshake, _, response = exchange
    mac1_key = noise.hash_(noise.LABEL_MAC1 + keys.public_key)
    for bit in range(8 * 8, 60 * 8):  # receiver index, ephemeral and encrypted_nothing
        flipped = bytearray(response)
        flipped[bit // 8] ^= 1 << (bit % 8)
        result = consume(handshake, keys, with_mac1(bytes(flipped), mac1_key), NOW)
        assert isinstance(result, Ignored), bit


# --- cookies ------------------------------------------------------------------


def test_cookie_reply_then_mac2_accepted() -> None:
    keys = make_keys()
    responder = make_responder(keys)
    responder.under_load = True
    message, handshake = initiate(keys)
    reply = responder.respond(message)
    assert len(reply) == 64 and reply[0] == 3
    result = consume(handshake, keys, reply, NOW)
    assert result == CookieReceived(Cookie(responder.cookie_for(), NOW))
    assert isinstance(result, CookieReceived)
    cookie = result.cookie
    assert len(cookie.value) == noise.COOKIE_SIZE

    later = tai64n.successor(TS0)
    message2, handshake2 = initiate(keys, index=9, timestamp=later, cookie=cookie, now=NOW + 1)
    assert message2[-16:] == noise.mac(cookie.value, message2[:-16])
    assert responder.mac2_valid(message2)
    assert consume(handshake2, keys, responder.respond(message2), NOW + 1) == Accepted(0x11223344)


def test_mac2_dissects_with_scapy() -> None:
    from scapy.contrib.wireguard import WireguardInitiation

    keys = make_keys()
    cookie = Cookie(b"\x17" * 16, NOW)
    message, handshake = initiate(keys, cookie=cookie, now=NOW)
    init = noise.to_scapy(message)[WireguardInitiation]
    assert init.mac1 == handshake.mac1
    assert init.mac2 == noise.mac(cookie.value, message[:132]) != bytes(16)


@pytest.mark.parametrize(
    ("age", "fresh"), [(0.0, True), (119.9, True), (120.0, True), (120.001, False), (-1.0, False)]
)
def test_cookie_freshness(age: float, fresh: bool) -> None:
    keys = make_keys()
    cookie = Cookie(b"\x17" * 16, NOW)
    assert cookie.fresh(NOW + age) is fresh
    message, _ = initiate(keys, cookie=cookie, now=NOW + age)
    assert (message[-16:] != bytes(16)) is fresh


def test_stale_cookie_gets_another_cookie_reply() -> None:
    keys = make_keys()
    responder = make_responder(keys)
    responder.under_load = True
    message, handshake = initiate(keys)
    result = consume(handshake, keys, responder.respond(message), NOW)
    assert isinstance(result, CookieReceived)
    stale, handshake2 = initiate(
        keys, timestamp=tai64n.successor(TS0), cookie=result.cookie, now=NOW + 121
    )
    assert stale[-16:] == bytes(16)
    again = consume(handshake2, keys, responder.respond(stale), NOW + 121)
    assert again == CookieReceived(Cookie(responder.cookie_for(), NOW + 121))


def test_bad_cookie_replies_ignored() -> None:
    keys = make_keys()
    responder = make_responder(keys)
    message, handshake = initiate(keys)
    reply = responder.cookie_reply(message, nonce=b"\x05" * 24)
    assert isinstance(consume(handshake, keys, reply, NOW), CookieReceived)
    # to another initiation (other index; same index but other mac1)
    _, other = initiate(keys, index=99)
    assert consume(other, keys, reply, NOW) == Ignored("index")
    _, same_index = initiate(keys, timestamp=tai64n.successor(TS0))
    assert consume(same_index, keys, reply, NOW) == Ignored("decrypt")
    # sealed by another server
    impostor = Responder(OTHER_PRIVATE)
    assert consume(handshake, keys, impostor.cookie_reply(message), NOW) == Ignored("decrypt")
    # every bit flip
    for bit in range(64 * 8):
        flipped = bytearray(reply)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert isinstance(consume(handshake, keys, bytes(flipped), NOW), Ignored), bit
    assert consume_cookie_reply(handshake, keys, reply[:-1], NOW) == Ignored("size")
    assert consume_response(handshake, keys, reply) == Ignored("size")


# --- properties: nothing raises, nothing forged is accepted ----------------


KEYS = make_keys()
_MESSAGE, HANDSHAKE = initiate(KEYS)
_HEADERS = st.sampled_from([b"\x02\x00\x00\x00", b"\x03\x00\x00\x00", b"\x01\x00\x00\x00"])
_INDEX = HANDSHAKE.sender_index.to_bytes(4, "little")


@st.composite
def plausible(draw: st.DrawFn) -> bytes:
    """Datagrams that get past the cheap checks: right header, size, index, mac1."""
    header = draw(_HEADERS)
    if header[0] == 3:
        return header + _INDEX + draw(st.binary(min_size=56, max_size=56))
    body = header + draw(st.binary(min_size=4, max_size=4)) + _INDEX
    body += draw(st.binary(min_size=48, max_size=48))
    return with_mac1(body + bytes(32), noise.hash_(noise.LABEL_MAC1 + KEYS.public_key))


@given(st.one_of(st.binary(max_size=200), plausible()))
@example(b"")
@example(bytes(92))
@example(bytes(64))
@example(b"\x02\x00\x00\x00" + bytes(88))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_no_datagram_raises_or_is_accepted(datagram: bytes) -> None:
    result = consume(HANDSHAKE, KEYS, datagram, NOW)
    assert isinstance(result, Ignored)
    assert isinstance(consume_response(HANDSHAKE, KEYS, datagram), Ignored)
    assert isinstance(consume_cookie_reply(HANDSHAKE, KEYS, datagram, NOW), Ignored)


# --- TAI64N -------------------------------------------------------------------


def test_tai64n_layout() -> None:
    assert tai64n.tai64n(0) == bytes.fromhex("400000000000000a00000000")
    assert tai64n.tai64n(1_700_000_000 * 10**9 + 123_456_789) == (
        (0x400000000000000A + 1_700_000_000).to_bytes(8, "big") + (123_456_789).to_bytes(4, "big")
    )
    assert tai64n.decode(tai64n.tai64n(5 * 10**9 + 7)) == (5, 7)


def test_tai64n_whitening_as_wireguard_go() -> None:
    stamp = tai64n.tai64n(10**9 + 0x1234567, whiten=True)
    assert stamp[8:] == (0x1000000).to_bytes(4, "big")  # low 24 bits cleared
    assert tai64n.next_timestamp(10**9 + 0x1234567, None) == stamp


def test_successor_carries_into_seconds() -> None:
    stamp = tai64n.encode(0x400000000000000A, 999_999_999)
    assert tai64n.successor(stamp) == tai64n.encode(0x400000000000000B, 0)
    assert tai64n.successor(stamp) > stamp
    bogus = (0x400000000000000A).to_bytes(8, "big") + (0xFFFFFFFF).to_bytes(4, "big")
    assert tai64n.successor(bogus) > bogus
    with pytest.raises(ValueError):
        tai64n.successor(bytes(11))
    with pytest.raises(ValueError):
        tai64n.next_timestamp(0, b"short")


def test_next_timestamp_survives_clock_step_back() -> None:
    last = tai64n.tai64n(2_000_000_000 * 10**9)
    stepped = tai64n.next_timestamp(1_000_000_000 * 10**9, last)
    assert stepped == tai64n.successor(last) and stepped > last
    forward = tai64n.next_timestamp(3_000_000_000 * 10**9, last)
    assert forward == tai64n.tai64n(3_000_000_000 * 10**9, whiten=True)


@given(
    st.lists(st.integers(min_value=-(10**18), max_value=4 * 10**18), min_size=1, max_size=60),
    st.booleans(),
    st.one_of(st.none(), st.integers(min_value=0, max_value=4 * 10**18)),
)
def test_timestamps_strictly_increase(
    clock: list[int], whiten: bool, persisted: int | None
) -> None:
    """Any clock readings, backward jumps included, restarts in between: strictly increasing."""
    last = None if persisted is None else tai64n.tai64n(persisted)
    for now in clock:
        stamp = tai64n.next_timestamp(now, last, whiten=whiten)
        assert len(stamp) == 12
        if last is not None:
            assert stamp > last  # bytes.Compare(stamp, last) > 0 in wireguard-go
        _, nanoseconds = tai64n.decode(stamp)
        assert 0 <= nanoseconds < 10**9
        last = stamp


def test_stamp_problems() -> None:
    assert tai64n.problem(tai64n.tai64n(1_700_000_000 * 10**9 + 5)) is None
    assert tai64n.problem(tai64n.tai64n(0)) is None
    assert tai64n.problem(b"\xff" * 12) == "nanoseconds 4294967295 out of range"
    assert tai64n.problem(bytes(12)) == "a time before 1970"
    assert tai64n.problem(tai64n.tai64n(tai64n.MAX_UNIX_SECONDS * 10**9)) == (
        "a time beyond any clock"
    )
    assert tai64n.problem(tai64n.tai64n(tai64n.MAX_UNIX_SECONDS * 10**9 - 1)) is None
    assert tai64n.problem(bytes(11)) == "11 bytes, not 12"
    # Linux keeps time in signed 64-bit nanoseconds: every reading is valid.
    assert tai64n.problem(tai64n.tai64n(2**63 - 1)) is None


def test_seconds_ahead() -> None:
    stamp = tai64n.tai64n(1_000 * 10**9 + 500_000_000)
    assert tai64n.seconds_ahead(stamp, 990 * 10**9) == 10.5
    assert tai64n.seconds_ahead(stamp, 1_001 * 10**9) == -0.5


# --- ICMP quotes --------------------------------------------------------------


def test_an_icmp_quote_must_repeat_the_start_of_our_initiation(
    exchange: tuple[Keys, Handshake, bytes, bytes],
) -> None:
    _, _, message, _ = exchange
    assert noise.quotes_initiation(message, message)
    assert noise.quotes_initiation(message, message[: noise.QUOTE_MIN])
    assert noise.quotes_initiation(message, message + b"padding")
    # Only the UDP header quoted (as RFC 792 allows): cannot be verified.
    assert not noise.quotes_initiation(message, b"")
    assert not noise.quotes_initiation(message, message[: noise.QUOTE_MIN - 1])
    # Right type and size, but another sender index or ephemeral key.
    other, _ = initiate(make_keys(), index=0x0A0B0C0D)
    assert not noise.quotes_initiation(message, other)
    flipped = bytearray(message)
    flipped[20] ^= 1
    assert not noise.quotes_initiation(message, bytes(flipped))


# --- interop: packets exchanged with real wireguard-go ---------------------
#
# Recorded once against wireguard-go (Debian package, userspace, in a network
# namespace): it accepted these initiations and sent these replies, including
# a cookie reply while flooded and then a response to an initiation with mac2.
# Our build is deterministic, so we must produce the same bytes; and the
# replies, made by wireguard-go, must be consumed.


@dataclass(frozen=True)
class WgGoExchange:
    ts: str
    eph: str
    idx: int
    msg: str
    reply: str
    peer_index: int = 0


@dataclass(frozen=True)
class WgGoVector:
    probe_private: str
    server_private: str
    psk: str
    exchanges: dict[str, WgGoExchange]

    def keys(self) -> Keys:
        server = noise.public_key(bytes.fromhex(self.server_private))
        return Keys(bytes.fromhex(self.probe_private), server, bytes.fromhex(self.psk))


WG_GO = WgGoVector(
    probe_private="c608657f2b87352e4e238373e223f1dc4987a01b235ab570ad2347109a8dea58",
    server_private="7353058ddc3709f0738d9a135b232e044e8a0c90ffe55cc46e6a5a3f1a4bf005",
    psk="00" * 32,
    exchanges={
        "plain": WgGoExchange(
            ts="400000006b05d55c39000000",
            eph="053b43dbae4ec28e7836a224d258f36d44016125e0c02d11840ce79a30782618",
            idx=2658864349,
            msg="01000000dd0c7b9e74b12c3851e176b0246da40058532386ba61fbb93cb896bd3bb24c5c"
            "42826f1643bb36774a2f2e85157088d2f72d9acd024dc6f71ccc334a7d5ad29d12b92a936a03"
            "8434516da57afdbfa1c808c33ee27dd8bcf4e6338d47c5717aa17cf9ca1e7f72592271704146"
            "e2379b6aeb645760af0d2290340c23437f3af05f00000000000000000000000000000000",
            reply="02000000a0911d81dd0c7b9e5867ed631739fbe2d442c7ab4fa1a3871043684559f858"
            "8116ef1a7ac7e6a028529876fa55a67c582cab11881f26044e8f559f5c2d411545271083b963"
            "dfcab700000000000000000000000000000000",
            peer_index=2166198688,
        ),
        "cookie_reply": WgGoExchange(
            ts="400000006b05d55d13000000",
            eph="457228dc294897a1d404791576c2eec55fedc0bff021c8a99e03aaaf70ae4658",
            idx=2320494769,
            msg="01000000b1f04f8ab7638617eec690d7e87e0208a66aab8fc04056a28efe4dfe048af0e0"
            "6e1ccd63f6cdd6c8d8f979473713d0eb313a1f7ff2f64e97a97826ec0c882374c9cfd5a7e4a7"
            "163633974a2d1d3eff3a3a86eabd937134dc22d824241707776aeac417f58e0e62cfe45d0c28"
            "5bfae987de18cc4833c2b3ec315d596ea4e75d7900000000000000000000000000000000",
            reply="03000000b1f04f8a24fd20450a56d4a94d17924c77440c9f79dcadfff3f6b4c79b1bd346"
            "51447a6b99d2375253078ee249ccc349547497d5aee544484ebe6f33",
        ),
        "mac2": WgGoExchange(
            ts="400000006b05d55d15000000",
            eph="8f08bda85f89e98f414ec375ed6808e2a69e3a3697c5e6886690efa6132a10ca",
            idx=347547191,
            msg="010000003726b714f8142bdc56c1d8db271816855b0c6c3f21d413375441da14bfd846de"
            "494bed3b516425c681dae70c4649906fcb3cbbe28cb4836b17e381c441849ed8660466e88544"
            "e5f9c2550276cdd4d57729656bbe1c49fe4bc24e9620aefff1a0a11f87beae8fd7124766a7d3"
            "d3f34f5f295e241e3d34a27b64b60cefe013dcfa2c6caad3517e48863e689630b75367bd",
            reply="020000007066344e3726b714f178f40c4305457889970dcb961fd2e8cee5f8b738aa4632"
            "2a4fdf4b0af3f1421aa7a5590b535b76acdc4612a186f160223af0c6f9e73d3d2a22bf75ad43"
            "7e3900000000000000000000000000000000",
            peer_index=1312056944,
        ),
    },
)
WG_GO_PSK = WgGoVector(
    probe_private="2d9b3457d05155eef204bfd2111b180d91a7d5e6412ee1a65e91ede19ac96a7e",
    server_private="30e5bb033046ca203421034adcd12e69c50ac150c57dbdbe0b23cb02e9a80686",
    psk="7f8bd6d6abfac38c0e53638e21a2925197982398c3d25fbb75516e9d9e51ca98",
    exchanges={
        "plain": WgGoExchange(
            ts="400000006b05d5560e000000",
            eph="c1b8956e1d9bb0532a4119f116bfe023a0ca0dc41a4d2a34724aa21c62db9a09",
            idx=1388643452,
            msg="010000007c04c552663cd8bae435cee0effa488a35407cc127c974983beed2d500cb4a60"
            "6449e631150c5bdad346622372a25e69729a3d0c4d5706738b5f03d0b3fa2e9b075583d50271"
            "48f1ff9e4704a61cf15fbf5696018329626b927182ba997d9d4c37080e7a98223439c9e97a59"
            "4b3debe8978f8c71354032394e74a3a8aebe3ae300000000000000000000000000000000",
            reply="020000007fc9b3357c04c5522d68cee75e6bc2ad0926d61bcc5fc8e7ff3919f104680811"
            "77426e02ff212f39e5e10452a1819e76871e9df6e8517cdfd2934c6c8e6e00743fa0d8ea474d"
            "dd5600000000000000000000000000000000",
            peer_index=900974975,
        ),
    },
)


def _wg_go_replay(keys: Keys, record: WgGoExchange, cookie: Cookie | None = None) -> noise.Result:
    """Rebuild the recorded initiation (same bytes), consume wireguard-go's reply."""
    message, handshake = build_initiation(
        keys,
        sender_index=record.idx,
        timestamp=bytes.fromhex(record.ts),
        ephemeral_private=bytes.fromhex(record.eph),
        cookie=cookie,
        now=None if cookie is None else cookie.received_at,
    )
    assert message.hex() == record.msg
    return consume(handshake, keys, bytes.fromhex(record.reply), NOW)


@pytest.mark.parametrize("vector", [WG_GO, WG_GO_PSK], ids=["plain", "psk"])
def test_wireguard_go_response(vector: WgGoVector) -> None:
    record = vector.exchanges["plain"]
    assert _wg_go_replay(vector.keys(), record) == Accepted(record.peer_index)


def test_wireguard_go_cookie_reply_and_mac2() -> None:
    keys = WG_GO.keys()
    result = _wg_go_replay(keys, WG_GO.exchanges["cookie_reply"])
    assert isinstance(result, CookieReceived)
    record = WG_GO.exchanges["mac2"]
    assert _wg_go_replay(keys, record, cookie=result.cookie) == Accepted(record.peer_index)


def test_our_responder_reads_wireguard_go_accepted_initiations() -> None:
    for vector in (WG_GO, WG_GO_PSK):
        keys = vector.keys()
        responder = Responder(bytes.fromhex(vector.server_private))
        responder.add_peer(keys.public_key, keys.preshared_key)
        record = vector.exchanges["plain"]
        assert responder.consume_initiation(bytes.fromhex(record.msg)).timestamp.hex() == record.ts


def test_a_template_built_in_a_child_is_the_one_scapy_builds_here() -> None:
    from natfail.io.template_child import load_template

    here = noise.initiation_template()
    assert load_template() == here
    assert noise.InitiationTemplate.from_json(here.to_json()) == here
    broken = here.to_json()
    broken["mac1"] = [100, 116]
    with pytest.raises(ValueError, match="not where WireGuard"):
        noise.InitiationTemplate.from_json(broken)
    with pytest.raises(ValueError, match="not an initiation template"):
        noise.InitiationTemplate.from_json({"packet": "zz"})
