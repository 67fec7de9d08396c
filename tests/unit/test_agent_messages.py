"""natfail.core.agent_messages: the agent channel's payloads, laid out and parsed strictly."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natfail.core import agent_channel as ch
from natfail.core import agent_messages as msg
from natfail.core import noise
from natfail.core.agent_messages import (
    PAGE_PEERS,
    Activate,
    Activated,
    Poll,
    Report,
    ReportedPeer,
    Target,
    decode_reply,
    decode_request,
    encode,
)
from natfail.core.model import Endpoint

V4 = Endpoint(ipaddress.IPv4Address("198.51.100.7"), 40000)
V6 = Endpoint(ipaddress.IPv6Address("2001:db8::7"), 1)
KEY = bytes(range(32))

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
endpoints = st.builds(
    Endpoint,
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
    st.integers(1, 65535),
)
keys = st.binary(min_size=32, max_size=32)
reported = st.builds(ReportedPeer, keys, endpoints, U32)
targets = st.builds(Target, keys, endpoints)


@st.composite
def paging(draw: st.DrawFn) -> tuple[int, int]:
    pages = draw(st.integers(1, 2**32 - 1))
    return draw(st.integers(0, pages - 1)), pages


@st.composite
def reports(draw: st.DrawFn) -> Report:
    page, pages = draw(paging())
    peers = tuple(draw(st.lists(reported, max_size=6)))
    return Report(draw(U64), draw(st.integers(-(2**63), 2**63 - 1)), peers, page, pages, draw(U64))


@st.composite
def activations(draw: st.DrawFn) -> Activate:
    page, pages = draw(paging())
    return Activate(draw(U64), tuple(draw(st.lists(targets, max_size=6))), page, pages)


requests_ = st.one_of(st.builds(Poll, U64, U32), activations())
replies = st.one_of(reports(), st.builds(Activated, U64, U32, U32, U32, U64))
FUZZ = settings(max_examples=150, deadline=None)


# --- layouts ---------------------------------------------------------------------------


def hx(*fields: str) -> bytes:
    """Bytes from hex, one argument per field."""
    return bytes.fromhex("".join(fields))


def test_poll_layout() -> None:
    raw = encode(Poll(0x0102030405060708, 9))
    assert raw == hx("01", "01", "0102030405060708", "00000009")
    assert decode_request(raw) == Poll(0x0102030405060708, 9)
    assert Poll(5) == Poll(5, 0)


def test_activated_layout() -> None:
    raw = encode(Activated(7, 1, 1000, 999, 2**40))
    assert raw == hx(
        "01", "04", "0000000000000007", "00000001", "000003e8", "000003e7", "0000010000000000"
    )
    assert decode_reply(raw) == Activated(7, 1, 1000, 999, 2**40)


def test_report_layout() -> None:
    report = Report(3, -1, (ReportedPeer(KEY, V4, 1500), ReportedPeer(KEY, V6, 0)), 1, 2, 9)
    raw = encode(report)
    head = hx(
        "01",
        "03",
        "0000000000000003",
        "ffffffffffffffff",
        "0000000000000009",
        "00000001",
        "00000002",
        "0002",
    )
    v4 = KEY + hx("04", "c6336407", "9c40", "000005dc")
    v6 = KEY + hx("06", "20010db8000000000000000000000007", "0001", "00000000")
    assert raw == head + v4 + v6
    assert decode_reply(raw) == report


def test_activate_layout() -> None:
    activate = Activate(2**64 - 1, (Target(KEY, V4),), 0, 1)
    raw = encode(activate)
    head = hx("01", "02", "ffffffffffffffff", "00000000", "00000001", "0001")
    assert raw == head + KEY + hx("04", "c6336407", "9c40")
    assert decode_request(raw) == activate


# --- strictness ------------------------------------------------------------------------


def test_requests_and_replies_do_not_mix() -> None:
    for request in (Poll(1), Activate(1, (), 0, 1)):
        assert decode_reply(encode(request)) is None
    for reply in (Report(1, 2, (), 0, 1), Activated(1, 0, 2, 2, 10)):
        assert decode_request(encode(reply)) is None


def test_bad_fields_are_refused() -> None:
    good = encode(Activate(3, (Target(KEY, V4),), 0, 1))
    assert decode_request(good) is not None
    family_at = 20 + 32

    def patched(at: int, value: bytes) -> bytes:
        return good[:at] + value + good[at + len(value) :]

    assert decode_request(patched(0, b"\x02")) is None  # another format
    assert decode_request(patched(1, b"\x05")) is None  # unknown kind
    assert decode_request(patched(family_at, b"\x05")) is None  # no such family
    assert decode_request(patched(family_at + 5, b"\0\0")) is None  # port 0
    assert decode_request(patched(10, bytes.fromhex("00000001"))) is None  # page 1 of 1
    assert decode_request(patched(14, bytes(4))) is None  # 0 pages
    assert decode_request(patched(18, b"\0\x02")) is None  # says 2 targets, holds 1
    assert decode_request(patched(18, b"\0\x00")) is None  # says 0, holds 1
    # A v6 family byte on a v4 entry: the lengths no longer add up.
    assert decode_request(patched(family_at, b"\x06")) is None


def test_count_over_a_page_is_refused_before_parsing() -> None:
    one = encode(Report(1, 2, (ReportedPeer(KEY, V4, 0),), 0, 1))
    head = one[:34] + (PAGE_PEERS + 1).to_bytes(2, "big")
    entry = one[36:]
    assert decode_reply(head + entry * (PAGE_PEERS + 1)) is None
    at_limit = one[:34] + PAGE_PEERS.to_bytes(2, "big") + entry * PAGE_PEERS
    decoded = decode_reply(at_limit)
    assert isinstance(decoded, Report) and len(decoded.peers) == PAGE_PEERS


@pytest.mark.parametrize(
    "build",
    [
        lambda: Poll(-1),
        lambda: Poll(2**64),
        lambda: Poll(1, 2**32),
        lambda: Poll(True),
        lambda: Target(KEY[:31], V4),
        lambda: Target(KEY, "1.2.3.4:5"),  # type: ignore[arg-type]
        lambda: ReportedPeer(KEY, V4, -1),
        lambda: ReportedPeer(KEY, V4, 2**32),
        lambda: Report(1, 2**63, (), 0, 1),
        lambda: Report(1, 0, (), 1, 1),
        lambda: Report(1, 0, (), 0, 0),
        lambda: Report(1, 0, (), 0, 1, -1),
        lambda: Report(1, 0, (), 0, 1, 2**64),
        lambda: Report(1, 0, [ReportedPeer(KEY, V4, 0)], 0, 1),  # type: ignore[arg-type]
        lambda: Report(1, 0, (Target(KEY, V4),), 0, 1),  # type: ignore[arg-type]
        lambda: Report(1, 0, (ReportedPeer(KEY, V4, 0),) * (PAGE_PEERS + 1), 0, 1),
        lambda: Activate(1, (ReportedPeer(KEY, V4, 0),), 0, 1),  # type: ignore[arg-type]
        lambda: Activate(1, (Target(KEY, V4),) * (PAGE_PEERS + 1), 0, 1),
        lambda: Activate(1, (), 2, 2),
        lambda: Activated(1, 0, -1, 0, 0),
        lambda: Activated(1, 0, 0, 0, 2**64),
    ],
)
def test_out_of_range_values_are_refused(build: object) -> None:
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]


def test_encode_misuse() -> None:
    scoped = Endpoint(ipaddress.IPv6Address("fe80::1%eth0"), 51820)
    with pytest.raises(ValueError, match="scope"):
        encode(Activate(1, (Target(KEY, scoped),), 0, 1))
    with pytest.raises(TypeError):
        encode("poll")  # type: ignore[arg-type]


def test_no_key_material_but_public_keys() -> None:
    for cls in (Poll, Report, ReportedPeer, Activate, Target, Activated):
        for fld in dataclasses.fields(cls):
            assert "private" not in fld.name and "preshared" not in fld.name


# --- paging ----------------------------------------------------------------------------


def test_paginate_activate() -> None:
    many = tuple(Target(i.to_bytes(32, "big"), V6) for i in range(PAGE_PEERS * 2 + 1))
    pages = msg.paginate_activate(4, many)
    assert [len(p.peers) for p in pages] == [PAGE_PEERS, PAGE_PEERS, 1]
    assert [p.page for p in pages] == [0, 1, 2]
    assert {p.pages for p in pages} == {3} and {p.epoch for p in pages} == {4}
    assert sum((p.peers for p in pages), ()) == many
    assert msg.paginate_activate(4, ()) == [Activate(4, (), 0, 1)]
    assert len(msg.paginate_activate(4, many[:PAGE_PEERS])) == 1


def test_paginate_report() -> None:
    many = [ReportedPeer(i.to_bytes(32, "big"), V4, i) for i in range(PAGE_PEERS + 5)]
    pages = msg.paginate_report(9, -5, many)
    assert [len(p.peers) for p in pages] == [PAGE_PEERS, 5]
    assert [(p.version, p.clock_ns, p.page, p.pages) for p in pages] == [
        (9, -5, 0, 2),
        (9, -5, 1, 2),
    ]
    assert list(sum((p.peers for p in pages), ())) == many
    assert msg.paginate_report(1, 2, ()) == [Report(1, 2, (), 0, 1)]


def test_a_full_page_of_ipv6_peers_fits_the_channel() -> None:
    gateway, agent = bytes([1] * 32), bytes([2] * 32)
    activate = Activate(1, (Target(KEY, V6),) * PAGE_PEERS, 0, 1)
    report = Report(1, 0, (ReportedPeer(KEY, V6, 2**32 - 1),) * PAGE_PEERS, 0, 1)
    assert len(encode(activate)) == 20 + PAGE_PEERS * 51
    assert len(encode(report)) == 36 + PAGE_PEERS * 55
    datagram, pending = ch.new_request(
        gateway, noise.public_key(agent), encode(activate), bytes(12)
    )
    request = ch.open_request(datagram, [ch.AgentIdentity(agent)], {noise.public_key(gateway)})
    assert isinstance(request, ch.Request) and decode_request(request.payload) == activate
    answer = ch.open_reply(pending, ch.new_reply(request, encode(report)))
    assert isinstance(answer, bytes) and decode_reply(answer) == report


# --- fuzzing ---------------------------------------------------------------------------


@FUZZ
@given(requests_)
def test_request_round_trip(message: Poll | Activate) -> None:
    raw = encode(message)
    assert decode_request(raw) == message
    assert decode_request(bytearray(raw)) == message


@FUZZ
@given(replies)
def test_reply_round_trip(message: Report | Activated) -> None:
    assert decode_reply(memoryview(encode(message))) == message


@FUZZ
@given(st.one_of(requests_, replies), st.data())
def test_truncated_or_extended_is_refused(message: msg.Message, data: st.DataObject) -> None:
    raw = encode(message)
    cut = data.draw(st.integers(0, len(raw) - 1))
    extra = data.draw(st.binary(min_size=1, max_size=60))
    for damaged in (raw[:cut], raw + extra):
        assert decode_request(damaged) is None
        assert decode_reply(damaged) is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    decode_request(data)
    decode_reply(data)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([1, 2, 3, 4]), st.binary(max_size=300))
def test_arbitrary_bodies_never_raise(kind: int, body: bytes) -> None:
    # Past the format and kind bytes, to reach the field and entry parsers.
    for data in (bytes((1, kind)) + body, bytes((1, kind)) + body[:24] + b"\0\x01" + body[24:]):
        for decode in (decode_request, decode_reply):
            result = decode(data)
            if result is not None:
                assert encode(result) == data  # only canonical bytes are accepted
