"""The pure parts of the public-endpoint conntrack operations, and their async wrappers.

The kernel side (real entries, real deletes) is in tests/netns/test_conntrack_public.py."""

from __future__ import annotations

import asyncio
import ipaddress
import threading
from collections.abc import Iterable

import pytest

from natfail.config import Endpoint
from natfail.io.conntrack import (
    CleanupResult,
    ConntrackError,
    ConntrackMisuse,
    NetlinkConntrack,
    PublicFlows,
    check_public,
    tally_public_flows,
)
from natfail.io.conntrack_worker import ConntrackWorker

PUBLIC = Endpoint.parse("203.0.113.10:51820")
BACKEND = Endpoint.parse("10.0.0.2:51820")
FOREIGN = Endpoint.parse("10.0.0.9:4000")


def test_tally_counts_by_reply_source() -> None:
    pairs = [
        (PUBLIC, PUBLIC),
        (PUBLIC, BACKEND),
        (PUBLIC, BACKEND),
        (PUBLIC, FOREIGN),
        (PUBLIC, PUBLIC),
    ]
    assert tally_public_flows([PUBLIC], pairs) == {
        PUBLIC: PublicFlows(5, 2, {PUBLIC: 2, BACKEND: 2, FOREIGN: 1})
    }


def test_tally_counts_each_endpoint_of_one_dump() -> None:
    """One dump per public address serves every endpoint on it."""
    second = Endpoint(PUBLIC.ip, PUBLIC.port + 1)
    pairs = [(PUBLIC, BACKEND), (second, second), (second, FOREIGN), (PUBLIC, PUBLIC)]
    assert tally_public_flows([PUBLIC, second], pairs) == {
        PUBLIC: PublicFlows(2, 1, {BACKEND: 1, PUBLIC: 1}),
        second: PublicFlows(2, 1, {second: 1, FOREIGN: 1}),
    }


def test_tally_ignores_other_destinations() -> None:
    """A kernel that ignored or inverted the filter must not change the counts."""
    other_port = Endpoint(PUBLIC.ip, PUBLIC.port + 1)
    other_ip = Endpoint.parse("203.0.113.11:51820")
    pairs = [(other_port, other_port), (other_ip, BACKEND), (PUBLIC, BACKEND)]
    assert tally_public_flows([PUBLIC], pairs) == {PUBLIC: PublicFlows(1, 0, {BACKEND: 1})}
    assert tally_public_flows([PUBLIC], []) == {PUBLIC: PublicFlows(0, 0, {})}


@pytest.mark.parametrize("bad", [None, "203.0.113.10:51820", ("203.0.113.10", 51820), 0])
def test_check_public_refuses_anything_but_an_endpoint(bad: object) -> None:
    with pytest.raises(ConntrackMisuse, match="not an endpoint"):
        check_public(bad)
    assert check_public(PUBLIC) is PUBLIC


def test_no_ipv6_address_filter_is_ever_built() -> None:
    """Linux matches an IPv6 address in a filter inverted: a filtered delete by one
    would flush every other address's flows."""
    ct = NetlinkConntrack.__new__(NetlinkConntrack)  # no sockets: _tuple_msg sends nothing
    with pytest.raises(ConntrackMisuse, match="IPv6"):
        ct._tuple_msg(Endpoint.parse("[2001:db8::10]:51820"), "reply")
    msg = ct._tuple_msg(PUBLIC, "reply")
    assert msg["version"] == 1  # the filter applies to the socket's family only


class FakeConntrack:
    """Records the thread each call runs in."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def _record(self) -> None:
        self.threads.append(threading.current_thread().name)

    def remove_backend(self, mark: int, address: Endpoint) -> CleanupResult:
        self._record()
        return CleanupResult(1, 0, 0, 5)

    def count_backend(self, mark: int, address: Endpoint) -> int:
        self._record()
        return 0

    def remove_unnated(self, public: Endpoint) -> int:
        self._record()
        if public.port == 1:
            raise ConntrackError("conntrack flush of the un-NATed flows: refused")
        return 1

    def public_flows(self, publics: Iterable[Endpoint]) -> dict[Endpoint, PublicFlows]:
        self._record()
        return {public: PublicFlows(1, 1, {public: 1}) for public in publics}


def test_worker_runs_every_call_in_its_one_thread() -> None:
    fake = FakeConntrack()
    worker = ConntrackWorker(lambda: fake)

    async def run() -> tuple[int, dict[Endpoint, PublicFlows]]:
        return await worker.remove_unnated(PUBLIC), await worker.public_flows([PUBLIC])

    try:
        assert asyncio.run(run()) == (1, {PUBLIC: PublicFlows(1, 1, {PUBLIC: 1})})
        with pytest.raises(ConntrackError, match="refused"):
            asyncio.run(worker.remove_unnated(Endpoint(ipaddress.ip_address("1.2.3.4"), 1)))
    finally:
        worker.close()
    assert len(fake.threads) == 3
    assert all(t.startswith("natfail-conntrack") for t in fake.threads)
    assert len(set(fake.threads)) == 1
