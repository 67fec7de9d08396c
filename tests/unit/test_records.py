"""Switch records: their one log line, their JSON, and the log that keeps them."""

from __future__ import annotations

import asyncio

import pytest

from natfail.core.records import SwitchLog, SwitchRecord
from natfail.io.control import RequestError
from tests.unit.test_daemon import ROOT, Rig, rig, rounds, running, up_on_a

__all__ = ["rig"]  # the fixture, imported for pytest

RECORD = SwitchRecord("wg0", "a", "b", "failover", 1_700_000_000.25, 0.412, 1.5)


def test_a_record_is_one_line_of_key_value_fields() -> None:
    assert RECORD.line() == (
        "switch service=wg0 from=a to=b reason=failover swap_ms=0.41 cleanup_ms=1.50"
    )
    first = SwitchRecord("wg0", None, "a", "initial", 0.0, 0.1, 0.0)
    assert " from=- to=a " in first.line()


def test_a_record_as_json() -> None:
    assert RECORD.to_json() == {
        "service": "wg0",
        "from": "a",
        "to": "b",
        "reason": "failover",
        "time": "2023-11-14T22:13:20.250+00:00",
        "unix_time": 1_700_000_000.25,
        "swap_ms": 0.412,
        "cleanup_ms": 1.5,
    }


def test_the_log_keeps_the_newest() -> None:
    switches = SwitchLog(kept=3)
    for i in range(5):
        switches.add(SwitchRecord("wg0", None, str(i), "initial", float(i), 0.0, 0.0))
    assert [r.active for r in switches.last(10)] == ["2", "3", "4"]
    assert [r.active for r in switches.last(2)] == ["3", "4"]
    assert switches.last(0) == []


def test_the_daemon_records_every_switch_and_answers_events(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            await up_on_a(rig, d)
            rig.set_up(a=False)
            await rounds(d, 2)
            events = (await d.requests.handle({"command": "events"}, ROOT))["events"]
            assert [(e["from"], e["to"], e["reason"]) for e in events] == [
                (None, "a", "initial"),
                ("a", "b", "failover"),
            ]
            last = await d.requests.handle({"command": "events", "count": 1}, ROOT)
            assert [e["to"] for e in last["events"]] == ["b"]
            for bad in (0, -1, 1001, "5", True, 2.5):
                with pytest.raises(RequestError) as refused:
                    await d.requests.handle({"command": "events", "count": bad}, ROOT)
                assert refused.value.code == 2

    asyncio.run(main())
