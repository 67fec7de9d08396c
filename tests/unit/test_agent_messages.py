"""The agent channel's payloads: round trips, and no input that makes a decoder raise."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from natfail.core import agent_messages as msg
from natfail.core.model import Endpoint

V4 = Endpoint(ipaddress.ip_address("198.51.100.7"), 40000)
V6 = Endpoint(ipaddress.ip_address("2001:db8::7"), 1)

endpoints = st.builds(
    Endpoint,
    st.one_of(
        st.ip_addresses(v=4).filter(lambda a: not a.is_unspecified),
        st.ip_addresses(v=6),
    ),
    st.integers(1, 65535),
)
keys = st.binary(min_size=32, max_size=32)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
reported = st.builds(msg.ReportedPeer, keys, endpoints, u32)
targets = st.builds(msg.Target, keys, endpoints)
messages = st.one_of(
    st.builds(msg.Poll, u64, u32),
    st.builds(
        lambda v, c, p: msg.Report(v, c, tuple(p), 0, 1), u64, u64, st.lists(reported, max_size=5)
    ),
    st.builds(lambda e, t: msg.Activate(e, tuple(t), 0, 1), u64, st.lists(targets, max_size=5)),
    st.builds(msg.Activated, u64, u32, u32, u32, u32),
)


def _decode(data: bytes) -> object:
    return msg.decode_request(data) or msg.decode_reply(data)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_round_trip(message: msg.Message) -> None:
    assert _decode(msg.encode(message)) == message


@settings(max_examples=200, deadline=None)
@given(messages, st.data())
def test_truncated_or_extended_is_refused(message: msg.Message, data: st.DataObject) -> None:
    raw = msg.encode(message)
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert _decode(raw[:cut]) is None
    assert _decode(raw + data.draw(st.binary(min_size=1, max_size=8))) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    msg.decode_request(data)
    msg.decode_reply(data)


def test_requests_and_replies_do_not_mix() -> None:
    poll = msg.encode(msg.Poll(1, 0))
    done = msg.encode(msg.Activated(1, 0, 2, 2, 10))
    assert msg.decode_reply(poll) is None and msg.decode_request(done) is None


def test_bad_version_family_and_page_are_refused() -> None:
    raw = bytearray(msg.encode(msg.Activate(3, (msg.Target(bytes(32), V4),), 0, 1)))
    assert msg.decode_request(bytes(raw)) is not None
    bad_version = bytes([9]) + bytes(raw[1:])
    assert msg.decode_request(bad_version) is None
    family_at = 2 + 20 + 32
    raw[family_at] = 5
    assert msg.decode_request(bytes(raw)) is None
    report = msg.encode(msg.Report(1, 2, (), 3, 2))  # page beyond pages
    assert msg.decode_reply(report) is None


def test_pages() -> None:
    many = tuple(msg.Target(i.to_bytes(32, "big"), V6) for i in range(msg.PAGE_PEERS * 2 + 1))
    pages = msg.paginate_activate(4, many)
    assert [len(p.peers) for p in pages] == [msg.PAGE_PEERS, msg.PAGE_PEERS, 1]
    assert [p.page for p in pages] == [0, 1, 2] and {p.pages for p in pages} == {3}
    assert sum((p.peers for p in pages), ()) == many
    assert len(msg.encode(pages[0])) < 65000 - 200
    assert msg.paginate_report(1, 2, ()) == [msg.Report(1, 2, (), 0, 1)]
    full = msg.paginate_report(
        1, 2, tuple(msg.ReportedPeer(bytes(32), V6, 2**32 - 1) for _ in range(msg.PAGE_PEERS))
    )
    assert len(full) == 1 and len(msg.encode(full[0])) < 65000 - 200
