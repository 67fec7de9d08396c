"""natfail.core.agent_channel: the gateway <-> agent Noise IK exchange over bytes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natfail.core import agent_channel as ch
from natfail.core import noise, tai64n
from natfail.core.agent_channel import (
    AgentIdentity,
    Ignored,
    Pending,
    ReplayGuard,
    Request,
    build_reply,
    build_request,
    open_reply,
    open_request,
)

GATEWAY = bytes.fromhex("a8" * 31 + "48")
OTHER_GATEWAY = bytes.fromhex("98" * 31 + "58")
AGENT = bytes.fromhex("b0" * 31 + "50")
AGENT_2 = bytes.fromhex("c0" * 31 + "60")
AGENT_3 = bytes.fromhex("d8" * 31 + "68")
EPHEMERAL = bytes.fromhex("e0" * 31 + "41")
EPHEMERAL_2 = bytes.fromhex("f0" * 31 + "43")
REPLY_EPHEMERAL = bytes.fromhex("d0" * 31 + "42")
TS = bytes.fromhex("400000006553f1000a0b0c00")
INDEX = 0x01020304
REPLY_INDEX = 0x0A0B0C0D

GATEWAY_PUB = noise.public_key(GATEWAY)
OTHER_GATEWAY_PUB = noise.public_key(OTHER_GATEWAY)
AGENT_PUB = noise.public_key(AGENT)
AGENT_2_PUB = noise.public_key(AGENT_2)
IDENTITY = AgentIdentity.from_private(AGENT)
GATEWAYS = frozenset({GATEWAY_PUB})

# Known answer for the inputs above with payloads b"poll me please" and
# b"here is a report". Checked when written against an independent Noise
# implementation (the noiseprotocol package, 0.3.1, not a dependency): its
# IK initiator, given the prologue IDENTIFIER + the 8 header bytes and our
# fixed ephemeral, wrote bytes [8:-16] of the request (payload encrypted by
# a second EncryptAndHash); its responder, after MixHash of the 12 reply
# header bytes, wrote bytes [12:-16] of the reply, and its initiator opened
# ours. A change here breaks every deployed agent.
KNOWN_REQUEST = bytes.fromhex(
    "6e000000040302010c6da94dc74230a2a56e2840038059fc40c00e147fbcf4db7ee2f4d51ed8844d"
    "3b68e87ba1691304dc759d4c33a12951d41559a7c957aacac9e300db4c43eb4f6d8d99066124924b"
    "5896579d083174d8f971ae9f95ab13cfb72c12e4fb090312d9c61f253fe7b767c09d934bc0e4a05e"
    "da93f6b6e98b033465ec21a81dfcddfa534262820a57f02ca762ca3a9bf62afc3728c927d0cc0dd8"
    "a044"
)
KNOWN_REPLY = bytes.fromhex(
    "6f0000000d0c0b0a040302011cc0fca0473a725ed075528592c2bef6305e6dc99ba05462051473905c"
    "14081a863587ba3a0b6489e86810b5f580d30888ce299621a6dd81dc75da263e8137b91c78bffa80ee"
    "08db4ee795ca04fdaa7d"
)


def request(
    payload: bytes = b"poll me please",
    *,
    gateway: bytes = GATEWAY,
    agent_public: bytes = AGENT_PUB,
    timestamp: bytes = TS,
    ephemeral: bytes = EPHEMERAL,
    index: int = INDEX,
) -> tuple[bytes, Pending]:
    return build_request(
        gateway,
        agent_public,
        payload,
        timestamp=timestamp,
        ephemeral_private=ephemeral,
        sender_index=index,
    )


def opened(datagram: bytes, identities: tuple[AgentIdentity, ...] = (IDENTITY,)) -> Request:
    result = open_request(datagram, identities, GATEWAYS)
    assert isinstance(result, Request), result
    return result


def reply(req: Request, payload: bytes = b"here is a report") -> bytes:
    return build_reply(req, payload, ephemeral_private=REPLY_EPHEMERAL, sender_index=REPLY_INDEX)


def remac(datagram: bytes, receiver_public: bytes) -> bytes:
    """The datagram with a valid mac1 again: anyone can compute one, since
    its key derives from a public key."""
    body = datagram[: -ch.MAC_SIZE]
    return body + noise.mac(ch._mac1_key(receiver_public), body)


def flipped(datagram: bytes, position: int) -> bytes:
    out = bytearray(datagram)
    out[position] ^= 0x01
    return bytes(out)


# --- the exchange -----------------------------------------------------------------------


def test_known_answer() -> None:
    datagram, pending = request()
    assert datagram == KNOWN_REQUEST
    assert reply(opened(datagram)) == KNOWN_REPLY
    assert open_reply(pending, KNOWN_REPLY) == b"here is a report"


def test_full_exchange() -> None:
    datagram, pending = request(b"x" * 300)
    assert len(datagram) == ch.REQUEST_OVERHEAD + 300
    assert datagram[0] == ch.MESSAGE_REQUEST == ord("n")
    req = opened(datagram)
    assert req.gateway_public == GATEWAY_PUB
    assert req.agent_public == AGENT_PUB
    assert req.timestamp == TS
    assert req.payload == b"x" * 300
    assert req.sender_index == INDEX == pending.sender_index
    answer = reply(req, b"y" * 500)
    assert len(answer) == ch.REPLY_OVERHEAD + 500
    assert answer[0] == ch.MESSAGE_REPLY == ord("o")
    assert int.from_bytes(answer[8:12], "little") == INDEX
    assert open_reply(pending, answer) == b"y" * 500


def test_empty_payloads() -> None:
    datagram, pending = request(b"")
    assert len(datagram) == ch.REQUEST_OVERHEAD
    req = opened(datagram)
    assert req.payload == b""
    assert open_reply(pending, reply(req, b"")) == b""


def test_bytes_like_datagrams() -> None:
    datagram, pending = request()
    req = open_request(memoryview(datagram), [IDENTITY], GATEWAYS)
    assert isinstance(req, Request)
    assert open_reply(pending, bytearray(reply(req))) == b"here is a report"


def test_new_request_and_new_reply_draw_fresh_randomness() -> None:
    first, pending_1 = ch.new_request(GATEWAY, AGENT_PUB, b"p", TS)
    second, pending_2 = ch.new_request(GATEWAY, AGENT_PUB, b"p", TS)
    assert first[8:40] != second[8:40]  # ephemeral keys
    req = opened(first)
    answers = ch.new_reply(req, b"r"), ch.new_reply(req, b"r")
    assert answers[0] != answers[1]
    assert all(open_reply(pending_1, a) == b"r" for a in answers)
    assert isinstance(open_reply(pending_2, answers[0]), Ignored)


# --- which key, which gateway ---------------------------------------------------------------


def count_dh(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real: Callable[[bytes, bytes], bytes | None] = noise.dh  # what agent_channel imported

    def counting(private: bytes, public: bytes) -> bytes | None:
        calls[0] += 1
        return real(private, public)

    monkeypatch.setattr(ch, "dh", counting)
    return calls


def test_agent_picks_its_identity_by_mac1() -> None:
    identities = tuple(AgentIdentity.from_private(k) for k in (AGENT, AGENT_2, AGENT_3))
    for identity in identities:
        datagram, pending = request(agent_public=identity.public_key)
        for order in (identities, identities[::-1]):
            req = opened(datagram, order)
            assert req.agent_public == identity.public_key
        assert open_reply(pending, reply(req)) == b"here is a report"


def test_request_for_none_of_our_keys_costs_no_dh(monkeypatch: pytest.MonkeyPatch) -> None:
    datagram, _ = request(agent_public=AGENT_2_PUB)
    calls = count_dh(monkeypatch)
    assert open_request(datagram, [IDENTITY], GATEWAYS) == Ignored("mac1")
    assert open_request(datagram, [], GATEWAYS) == Ignored("mac1")
    assert calls == [0]


def test_unknown_gateway_is_ignored_after_one_dh(monkeypatch: pytest.MonkeyPatch) -> None:
    datagram, _ = request(gateway=OTHER_GATEWAY)
    calls = count_dh(monkeypatch)
    assert open_request(datagram, [IDENTITY], GATEWAYS) == Ignored("gateway")
    assert calls == [1]
    assert isinstance(open_request(datagram, [IDENTITY], {OTHER_GATEWAY_PUB}), Request)
    assert open_request(datagram, [IDENTITY], ()) == Ignored("gateway")


def forge_request(claimed_public: bytes, real_private: bytes) -> bytes:
    """A request that names ``claimed_public`` as its static key but was made
    with ``real_private``: what someone without the gateway's key can do."""
    header = bytes((ch.MESSAGE_REQUEST, 0, 0, 0)) + INDEX.to_bytes(4, "little")
    e_pub = noise.public_key(EPHEMERAL)
    h = noise.hash_(ch._initial_hash(header, AGENT_PUB) + e_pub)
    es = noise.dh(EPHEMERAL, AGENT_PUB)
    assert es is not None
    ck, key = noise.kdf2(ch._CK0, es)
    static = ch._seal(key, 0, claimed_public, h)
    h = noise.hash_(h + static)
    guessed = noise.dh(real_private, AGENT_PUB)
    assert guessed is not None
    ck, key = noise.kdf2(ck, guessed)
    stamp = ch._seal(key, 0, TS, h)
    h = noise.hash_(h + stamp)
    body = header + e_pub + static + stamp + ch._seal(key, 1, b"activate!", h)
    return body + noise.mac(ch._mac1_key(AGENT_PUB), body)


def test_forge_helper_matches_the_real_construction() -> None:
    datagram, _ = request(b"activate!")
    assert forge_request(GATEWAY_PUB, GATEWAY) == datagram


def test_claiming_a_listed_gateway_without_its_key_fails() -> None:
    forged = forge_request(GATEWAY_PUB, OTHER_GATEWAY)
    assert open_request(forged, [IDENTITY], GATEWAYS) == Ignored("decrypt")


def test_forged_mac1() -> None:
    datagram, pending = request()
    forged = datagram[:-16] + bytes(16)
    assert open_request(forged, [IDENTITY], GATEWAYS) == Ignored("mac1")
    answer = reply(opened(datagram))
    assert open_reply(pending, answer[:-16] + bytes(16)) == Ignored("mac1")


def test_low_order_ephemeral() -> None:
    datagram, pending = request()
    zero = datagram[:8] + bytes(32) + datagram[40:]
    assert open_request(remac(zero, AGENT_PUB), [IDENTITY], GATEWAYS) == Ignored("ephemeral")
    answer = reply(opened(datagram))
    zero = answer[:12] + bytes(32) + answer[44:]
    assert open_reply(pending, remac(zero, GATEWAY_PUB)) == Ignored("ephemeral")


# --- tampering -----------------------------------------------------------------------------


def test_every_flipped_request_byte_is_ignored() -> None:
    datagram, _ = request(b"tiny")
    for position in range(len(datagram)):
        tampered = flipped(datagram, position)
        assert isinstance(open_request(tampered, [IDENTITY], GATEWAYS), Ignored), position
        # With mac1 made valid again (anyone can), the AEADs and the bound
        # header must still refuse it.
        fixed = remac(tampered, AGENT_PUB)
        result = open_request(fixed, [IDENTITY], GATEWAYS)
        if position < len(datagram) - ch.MAC_SIZE:
            expected = {"type"} if position < 4 else {"decrypt", "ephemeral"}
            assert isinstance(result, Ignored) and result.reason in expected, position
        else:
            assert isinstance(result, Request)  # mac1 recomputed over the untouched body


def test_every_flipped_reply_byte_is_ignored() -> None:
    datagram, pending = request(b"tiny")
    answer = reply(opened(datagram), b"tiny")
    for position in range(len(answer)):
        tampered = flipped(answer, position)
        assert isinstance(open_reply(pending, tampered), Ignored), position
        result = open_reply(pending, remac(tampered, GATEWAY_PUB))
        if position < 4:
            assert result == Ignored("type"), position
        elif 8 <= position < 12:
            assert result == Ignored("index"), position
        elif position < len(answer) - ch.MAC_SIZE:
            assert isinstance(result, Ignored) and result.reason in {"decrypt", "ephemeral"}
        else:
            assert result == b"tiny"


def test_reply_from_another_agent_key_is_refused() -> None:
    to_1, pending_1 = request()
    to_2, _ = request(agent_public=AGENT_2_PUB)
    other = AgentIdentity.from_private(AGENT_2)
    answer_2 = reply(opened(to_2, (other,)))
    # Same sender index, same gateway, valid mac1: only the key differs.
    assert open_reply(pending_1, answer_2) == Ignored("decrypt")
    assert open_reply(pending_1, reply(opened(to_1))) == b"here is a report"


def test_replayed_reply_does_not_open_a_new_pending() -> None:
    old, old_pending = request()
    old_answer = reply(opened(old))
    assert open_reply(old_pending, old_answer) == b"here is a report"
    # A new request with the same sender index (the attacker's best case).
    new, new_pending = request(ephemeral=EPHEMERAL_2, timestamp=tai64n.successor(TS))
    assert open_reply(new_pending, old_answer) == Ignored("decrypt")
    assert open_reply(new_pending, reply(opened(new))) == b"here is a report"


def test_other_index_is_refused_before_crypto(monkeypatch: pytest.MonkeyPatch) -> None:
    datagram, _ = request()
    answer = reply(opened(datagram))
    _, other_pending = request(index=INDEX + 1)
    calls = count_dh(monkeypatch)
    assert open_reply(other_pending, answer) == Ignored("index")
    assert calls == [0]


def test_protocols_do_not_mix() -> None:
    datagram, pending = request()
    answer = reply(opened(datagram), bytes(200))  # large enough to pass the size check
    assert open_request(answer, [IDENTITY], GATEWAYS) == Ignored("type")
    assert open_reply(pending, datagram) == Ignored("type")
    keys = noise.Keys(GATEWAY, AGENT_PUB)
    initiation, _ = noise.build_initiation(
        keys, sender_index=INDEX, timestamp=TS, ephemeral_private=EPHEMERAL
    )
    assert len(initiation) == ch.REQUEST_OVERHEAD  # same size, so the type decides
    assert open_request(initiation, [IDENTITY], GATEWAYS) == Ignored("type")
    assert ch.MESSAGE_REQUEST not in range(1, 5) and ch.MESSAGE_REPLY not in range(1, 5)


# --- sizes and misuse ----------------------------------------------------------------------


def test_size_limits() -> None:
    datagram, pending = request(bytes(ch.MAX_REQUEST_PAYLOAD))
    assert len(datagram) == ch.MAX_DATAGRAM
    req = opened(datagram)
    answer = reply(req, bytes(ch.MAX_REPLY_PAYLOAD))
    assert len(answer) == ch.MAX_DATAGRAM
    assert open_reply(pending, answer) == bytes(ch.MAX_REPLY_PAYLOAD)
    with pytest.raises(ValueError, match="exceeds"):
        request(bytes(ch.MAX_REQUEST_PAYLOAD + 1))
    with pytest.raises(ValueError, match="exceeds"):
        reply(req, bytes(ch.MAX_REPLY_PAYLOAD + 1))


def test_wrong_sizes_are_ignored() -> None:
    datagram, pending = request()
    answer = reply(opened(datagram))
    for size in (0, 1, ch.REQUEST_OVERHEAD - 1):
        assert open_request(datagram[:size], [IDENTITY], GATEWAYS) == Ignored("size")
    assert open_request(datagram + bytes(ch.MAX_DATAGRAM), [IDENTITY], GATEWAYS) == Ignored("size")
    for size in (0, ch.REPLY_OVERHEAD - 1):
        assert open_reply(pending, answer[:size]) == Ignored("size")
    assert open_reply(pending, answer + bytes(ch.MAX_DATAGRAM)) == Ignored("size")
    # Within the limits, a cut or grown datagram fails mac1.
    assert open_request(datagram[:-1], [IDENTITY], GATEWAYS) == Ignored("mac1")
    assert open_reply(pending, answer + b"\0") == Ignored("mac1")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gateway": GATEWAY[:31]}, "gateway_private"),
        ({"agent_public": AGENT_PUB + b"\0"}, "agent_public"),
        ({"agent_public": bytes(32)}, "low-order"),
        ({"timestamp": TS[:11]}, "timestamp"),
        ({"ephemeral": EPHEMERAL[:16]}, "ephemeral_private"),
        ({"index": -1}, "sender_index"),
        ({"index": 2**32}, "sender_index"),
    ],
)
def test_build_request_misuse(change: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "gateway": GATEWAY,
        "agent_public": AGENT_PUB,
        "timestamp": TS,
        "ephemeral": EPHEMERAL,
        "index": INDEX,
    } | change
    with pytest.raises(ValueError, match=message):
        build_request(
            args["gateway"],  # type: ignore[arg-type]
            args["agent_public"],  # type: ignore[arg-type]
            b"",
            timestamp=args["timestamp"],  # type: ignore[arg-type]
            ephemeral_private=args["ephemeral"],  # type: ignore[arg-type]
            sender_index=args["index"],  # type: ignore[arg-type]
        )


def test_build_reply_and_identity_misuse() -> None:
    req = opened(request()[0])
    with pytest.raises(ValueError, match="ephemeral_private"):
        build_reply(req, b"", ephemeral_private=b"short", sender_index=1)
    with pytest.raises(ValueError, match="sender_index"):
        build_reply(req, b"", ephemeral_private=REPLY_EPHEMERAL, sender_index=2**32)
    with pytest.raises(ValueError, match="payload"):
        build_reply(req, "text", ephemeral_private=REPLY_EPHEMERAL, sender_index=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="private_key"):
        AgentIdentity.from_private(AGENT[:31])


def test_no_secret_in_repr() -> None:
    datagram, pending = request()
    req = opened(datagram)
    shown = repr(IDENTITY) + repr(pending) + repr(req)
    for secret in (AGENT, GATEWAY, EPHEMERAL, pending._chaining_key, req._chaining_key):
        assert repr(secret)[2:-1] not in shown
        assert secret.hex() not in shown
    assert IDENTITY.public_key == AGENT_PUB


# --- the replay guard ---------------------------------------------------------------------


def stamped(timestamp: bytes, gateway: bytes = GATEWAY, agent: bytes = AGENT) -> Request:
    identity = AgentIdentity.from_private(agent)
    datagram, _ = request(gateway=gateway, agent_public=identity.public_key, timestamp=timestamp)
    result = open_request(datagram, [identity], {GATEWAY_PUB, OTHER_GATEWAY_PUB})
    assert isinstance(result, Request)
    return result


def test_replay_guard_accepts_only_newer() -> None:
    guard = ReplayGuard()
    t1 = TS
    t2 = tai64n.successor(t1)
    assert guard.last(GATEWAY_PUB, AGENT_PUB) is None
    assert guard.accept(stamped(t1))
    assert not guard.accept(stamped(t1))  # the same request again
    assert guard.accept(stamped(t2))
    assert not guard.accept(stamped(t1))  # older
    assert guard.last(GATEWAY_PUB, AGENT_PUB) == t2


def test_replay_guard_compares_big_endian_bytes() -> None:
    guard = ReplayGuard()
    later_second = tai64n.tai64n(1_700_000_001 * 10**9)
    earlier = tai64n.tai64n(1_700_000_000 * 10**9 + 999_999_999)
    assert guard.accept(stamped(later_second))
    assert not guard.accept(stamped(earlier))


def test_replay_guard_is_per_gateway_and_per_interface() -> None:
    guard = ReplayGuard()
    t1, t2 = TS, tai64n.successor(TS)
    assert guard.accept(stamped(t2))
    assert guard.accept(stamped(t1, gateway=OTHER_GATEWAY))
    assert guard.accept(stamped(t1, agent=AGENT_2))
    assert not guard.accept(stamped(t1, gateway=OTHER_GATEWAY))
    assert not guard.accept(stamped(t2))


def test_replay_guard_floor() -> None:
    floor = tai64n.successor(TS)
    guard = ReplayGuard(floor)
    assert not guard.accept(stamped(TS))
    assert not guard.accept(stamped(floor))
    assert guard.accept(stamped(tai64n.successor(floor)))
    with pytest.raises(ValueError, match="floor"):
        ReplayGuard(b"\0")


# --- fuzzing ---------------------------------------------------------------------------------

FUZZ = settings(max_examples=150, deadline=None)


@FUZZ
@given(st.binary(max_size=400))
def test_open_request_arbitrary_bytes(data: bytes) -> None:
    assert isinstance(open_request(data, [IDENTITY], GATEWAYS), Ignored)
    typed = bytes((ch.MESSAGE_REQUEST, 0, 0, 0)) + data
    assert isinstance(open_request(typed, [IDENTITY], GATEWAYS), Ignored)


@FUZZ
@given(st.binary(min_size=ch.REQUEST_OVERHEAD - 20, max_size=400))
def test_open_request_arbitrary_body_with_valid_mac1(data: bytes) -> None:
    forged = remac(bytes((ch.MESSAGE_REQUEST, 0, 0, 0)) + data, AGENT_PUB)
    result = open_request(forged, [IDENTITY], GATEWAYS)
    assert isinstance(result, Ignored) and result.reason in {"size", "decrypt", "ephemeral"}


@FUZZ
@given(st.binary(max_size=400))
def test_open_reply_arbitrary_bytes(data: bytes) -> None:
    _, pending = request()
    assert isinstance(open_reply(pending, data), Ignored)
    header = bytes((ch.MESSAGE_REPLY, 0, 0, 0)) + bytes(4) + INDEX.to_bytes(4, "little")
    forged = remac(header + data, GATEWAY_PUB)
    result = open_reply(pending, forged)
    assert isinstance(result, Ignored) and result.reason in {"size", "decrypt", "ephemeral"}


@FUZZ
@given(st.data())
def test_mutated_datagrams(data: st.DataObject) -> None:
    datagram, pending = request(b"payload")
    answer = reply(opened(datagram), b"answer")
    for original, receiver, check in (
        (datagram, AGENT_PUB, lambda d: open_request(d, [IDENTITY], GATEWAYS)),
        (answer, GATEWAY_PUB, lambda d: open_reply(pending, d)),
    ):
        changes = data.draw(
            st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(1, 255)), min_size=1)
        )
        out = bytearray(original)
        for position, xor in changes:
            out[position] ^= xor
        mutated = bytes(out)
        if data.draw(st.booleans()):
            mutated = remac(mutated, receiver)
        if mutated[: -ch.MAC_SIZE] != original[: -ch.MAC_SIZE]:
            assert isinstance(check(mutated), Ignored)
