"""The one probe schedule: exact periods, spread phases, no catch-up bursts."""

from __future__ import annotations

import pytest

from natfail.core.schedule import Schedule, phase, place, slots
from natfail.io.nft_monitor import Batches


def test_rounds_come_at_exact_periods_whatever_they_cost() -> None:
    s = Schedule()
    s.add("wg0", 1.0, now=100.0)
    first = s.next_due()
    assert first is not None and 100.0 <= first < 101.0
    assert s.pop_due(first + 0.3) == ["wg0"]  # served late
    assert s.next_due() == pytest.approx(first + 1.0)  # the period is not stretched


def test_after_a_stall_the_next_round_is_a_whole_interval_later() -> None:
    s = Schedule()
    s.add("wg0", 1.0, now=0.0)
    assert s.pop_due(20.0) == ["wg0"]  # one round, not twenty
    assert s.pop_due(20.5) == []
    assert s.next_due() == pytest.approx(21.0)


def test_phases_spread_many_services_over_the_interval() -> None:
    s = Schedule()
    for i in range(1000):
        s.add(f"wg{i}", 1.0, now=0.0, among=1000)
    per_tenth = [len(s.pop_due(t / 10 - 1e-6)) for t in range(1, 11)]
    assert sum(per_tenth) == 1000
    assert max(per_tenth) < 160  # about 100 each, never all at once
    assert 0.0 <= phase("wg0") < 1.0 and phase("wg0") == phase("wg0")
    assert slots(1000) == 64


def test_the_services_of_a_slot_start_their_rounds_together() -> None:
    s = Schedule()
    for i in range(10):
        s.add(f"wg{i}", 1.0, now=0.0, among=10)
    first = s.next_due()
    assert first is not None
    assert len(s.pop_due(first)) == 10  # one wake-up for all ten
    assert s.next_due() == pytest.approx(first + 1.0)
    s = Schedule()
    for i in range(100):
        s.add(f"wg{i}", 1.0, now=0.0, among=100)
    starts = set()
    while (due := s.next_due()) is not None and due < 1.0:
        starts.add(due)
        s.pop_due(due)
    assert len(starts) <= slots(100) == 8


def test_a_round_asked_for_at_once_goes_back_to_its_place() -> None:
    s = Schedule()
    s.add("wg0", 1.0, now=0.0, among=1000)
    anchor = s.next_due()
    assert anchor is not None and anchor == place("wg0", 1000) * 1.0
    s.pop_due(anchor)
    s.soon("wg0", 3.02 + anchor)
    assert s.pop_due(3.02 + anchor) == ["wg0"]
    # the next one at its place, at least half an interval later
    assert s.next_due() == pytest.approx(anchor + 4.0)
    s.pop_due(anchor + 4.0)
    assert s.next_due() == pytest.approx(anchor + 5.0)
    # late by more than an interval: at its place, a whole interval later
    assert s.pop_due(anchor + 7.5) == ["wg0"]
    assert s.next_due() == pytest.approx(anchor + 9.0)


def test_remove_and_soon() -> None:
    s = Schedule()
    s.add("a", 1.0, now=0.0)
    s.add("b", 1.0, now=0.0)
    s.remove("a")
    assert s.pop_due(5.0) == ["b"] and s.names() == ["b"]
    s.soon("b", 5.2, interval=0.5)
    assert s.next_due() == 5.2
    # then at its place (0.0, among two services: one slot) on the new period
    assert s.pop_due(5.2) == ["b"] and s.next_due() == pytest.approx(5.5)
    with pytest.raises(KeyError):
        s.soon("a", 6.0)
    with pytest.raises(ValueError):
        s.add("c", 0.0, now=0.0)


def test_the_monitor_reports_a_transaction_once_and_never_our_own() -> None:
    own = {4242}
    batches = Batches(lambda pid: pid in own)
    lines = [b"delete table inet natfail\n", b"add table inet natfail\n"] * 500
    assert not any(batches.line(line) for line in lines)
    assert batches.line(b"# new generation 7 by process 31337 (nft)\n")
    for line in (
        b"add element inet natfail dnat4 { 1 }\n",
        b"# new generation 8 by process 4242 (python3)\n",
    ):
        assert not batches.line(line)
    assert not batches.line(b"# new generation 9 by process 31337 (nft)\n")  # nothing changed
    assert not batches.line(b"trace id 1234 inet natfail prerouting packet: ...\n")
