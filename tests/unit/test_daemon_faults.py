"""The daemon against faults and hostile input, with fakes at its edges (the
rig of tests/unit/test_daemon.py). The namespace tests that show the same
cases with real traffic are in tests/netns/test_stranded.py."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import random
import time
from pathlib import Path

import pytest

from natfail import config as cfg
from natfail.core import ruleset
from natfail.core.health import HealthState
from natfail.daemon import STATE_FILE, Daemon
from natfail.io.control import RequestError
from natfail.io.fakes import FakeTransport
from natfail.io.probe_transport import ProbeResult
from tests.unit.test_daemon import (
    ADDRESS,
    ROOT,
    A,
    Rig,
    dnat_of,
    rig,
    rounds,
    running,
    until,
    up_on_a,
)

PUBLIC = "203.0.113.10:51820"


# --- stranded clients: the table comes with the first DNAT, un-NATed flows go ----------


def test_no_table_before_the_first_dnat_then_unnated_flows_go(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rig.set_up(a=True, b=True)
            await rounds(d, 1)  # rise is 2: no verdict, no DNAT, so no table at all
            assert rig.dp.applied == []
            assert rig.dp.installed.empty
            await rounds(d, 1)
            # the table and the DNAT in one transaction, then the un-NATed flows go
            assert len(rig.dp.applied) == 1 and dnat_of(rig.dp.applied[0]) == A
            assert rig.dp.applied[0].snat  # the SNATs come with it
            assert rig.ct.unnated == [(PUBLIC, 1)]
            assert d.services["wg0"].active == "a"

    asyncio.run(main())


def test_every_dnat_change_or_repair_removes_unnated_flows(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            await up_on_a(rig, d)
            assert rig.ct.unnated == [(PUBLIC, 1)]
            rig.set_up(a=False)
            await rounds(d, 2)  # failover to b
            assert dnat_of(rig.dp.installed) == ADDRESS["b"]
            assert rig.ct.unnated[-1] == (PUBLIC, 2)  # after the second apply
            rig.dp.flush()  # `nft flush ruleset`, `iptables -t nat -F`
            await d.reconcile("test")
            assert rig.ct.unnated[-1] == (PUBLIC, 3)
            count = len(rig.ct.unnated)
            await d.reconcile("test")  # nothing changed: nothing to clean
            assert len(rig.ct.unnated) == count

    asyncio.run(main())


def test_start_with_an_adopted_rule_removes_unnated_flows(tmp_path: Path) -> None:
    first = Rig(tmp_path)
    config = first.write(first.text())
    installed = ruleset.build(config.services, {"wg0": "a"})
    rig = Rig(tmp_path, installed)

    async def main() -> None:
        async with running(rig.daemon()):
            assert [u[0] for u in rig.ct.unnated] == [PUBLIC]  # at start, rule or not

    asyncio.run(main())


# --- reload: one validator, rollback on anything, never a service without its rule -----


def test_a_backend_in_two_services_is_refused_by_load_and_reload(rig: Rig) -> None:
    twice = rig.text(wg1=True).replace(ADDRESS["d"], ADDRESS["a"])
    with pytest.raises(cfg.ConfigError, match="already the address of backend 'a'"):
        cfg.parse(twice, rig.path)

    async def main() -> None:
        async with running(rig.daemon()) as d:
            await up_on_a(rig, d)
            applied = len(rig.dp.applied)
            rig.path.write_text(twice)
            with pytest.raises(RequestError) as refused:
                await d.reload()
            assert refused.value.code == 2
            assert len(rig.dp.applied) == applied
            assert set(d.services) == {"wg0"}

    asyncio.run(main())


def test_a_reload_that_fails_anywhere_rolls_back(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = await up_on_a(rig, d)
            config, health = d.config, dict(rt.health)
            rig.path.write_text(rig.text(wg1=True, wg0=[("a", 100), ("c", 10)]))

            def broken(services: object, actives: dict[str, str | None]) -> ruleset.Ruleset:
                raise RuntimeError("a bug")

            with monkeypatch.context() as m:
                m.setattr(d.firewall, "build", broken)
                with pytest.raises(RequestError, match="running config stays"):
                    await d.reload()
            assert d.config is config
            assert set(d.services) == {"wg0"}
            assert [b.name for b in d.services["wg0"].service.backends] == ["a", "b", "c"]
            assert rt.health == health
            assert rt.active == "a"
            assert (await d.reload()).startswith("reloaded")  # and the next one works
            assert set(d.services) == {"wg0", "wg1"}

    asyncio.run(main())


def test_the_main_loop_survives_a_reload_that_raises(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            calls = 0

            async def explode() -> str:
                nonlocal calls
                calls += 1
                raise KeyError("a bug")

            monkeypatch.setattr(d, "reload", explode)
            d.request_reload()  # what SIGHUP does
            await until(lambda: calls == 1)
            await asyncio.sleep(0.05)
            d.request_reload()
            await until(lambda: calls == 2)  # still serving signals
            assert not d.stopping

    with caplog.at_level(logging.ERROR, logger="natfail"):
        asyncio.run(main())
    assert "internal error in the main loop" in caplog.text


def test_a_reload_renaming_the_active_backend_keeps_its_rule(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = await up_on_a(rig, d)
            rig.set_up(b=False, c=False)
            await rounds(d, 2)
            applied, cleanups = len(rig.dp.applied), len(rig.cleanups())
            rig.path.write_text(
                rig.text(wg0=[("a", 100), ("b", 50), ("c", 10)]).replace(
                    'name = "a"', 'name = "a2"'
                )
            )
            await d.reload()
            assert rt.active == "a2"
            assert rt.health["a2"].state is HealthState.UP  # same address, same verdict
            new = rig.dp.applied[applied:]
            assert new and all(dnat_of(rs) == A for rs in new)
            assert len(rig.cleanups()) == cleanups  # its flows lead to the same place

    asyncio.run(main())


def test_a_reload_never_leaves_a_service_without_a_dnat(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = await up_on_a(rig, d)
            rig.set_up(b=False, c=False)
            await rounds(d, 2)
            applied = len(rig.dp.applied)
            # a moves to a new address: nothing has a verdict there yet, b and c are down
            rig.path.write_text(rig.text().replace(A, "10.0.0.9:51820"))
            await d.reload()
            assert rt.active == "a"
            new = rig.dp.applied[applied:]
            assert new and all(dnat_of(rs) == "10.0.0.9:51820" for rs in new)

    asyncio.run(main())


def test_a_reload_reads_the_config_off_the_event_loop_and_bounded(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            await up_on_a(rig, d)
            rig.path.unlink()
            os.mkfifo(rig.path)  # nobody ever writes it
            with pytest.raises(RequestError, match="not a regular file") as fifo:
                await asyncio.wait_for(d.reload(), 5)
            assert fifo.value.code == 2
            rig.path.unlink()
            rig.path.symlink_to("/dev/zero")
            with pytest.raises(RequestError, match="not a regular file"):
                await asyncio.wait_for(d.reload(), 5)
            assert d.services["wg0"].active == "a"

    asyncio.run(main())


# --- operator commands -------------------------------------------------------------------


def test_force_must_be_a_boolean(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            await up_on_a(rig, d)
            rig.set_up(c=False)
            await rounds(d, 2)
            for value in ("false", 0, 1, None, "yes"):
                with pytest.raises(RequestError) as refused:
                    await d.requests.handle(
                        {"command": "switch", "service": "wg0", "backend": "c", "force": value},
                        ROOT,
                    )
                assert refused.value.code == 2
                assert "force must be true or false" in str(refused.value)
            assert d.services["wg0"].active == "a"
            with pytest.raises(RequestError, match="use --force"):
                await d.requests.handle(
                    {"command": "switch", "service": "wg0", "backend": "c", "force": False}, ROOT
                )
            reply = await d.requests.handle(
                {"command": "switch", "service": "wg0", "backend": "c", "force": True}, ROOT
            )
            assert reply["active"] == "c"

    asyncio.run(main())


def test_a_drain_that_cannot_be_saved_is_not_answered_ok(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            await up_on_a(rig, d)
            state = d.config.daemon.state_dir / STATE_FILE
            state.unlink(missing_ok=True)
            state.mkdir()  # the write fails as on a full disk
            with pytest.raises(RequestError, match="lost when natfail restarts") as lost:
                await d.requests.handle(
                    {"command": "drain", "service": "wg0", "backend": "b"}, ROOT
                )
            assert lost.value.code == 1

    asyncio.run(main())


# --- probing -----------------------------------------------------------------------------


class LocalErrorTransport(FakeTransport):
    """b's probes fail on this gateway (out of file descriptors), not at b."""

    async def probe(self, keys: object, target: cfg.Endpoint, timeout: float) -> ProbeResult:
        if str(target) == ADDRESS["b"]:
            self.probed.append(str(target))
            return ProbeResult(False, "local-error", detail="Too many open files", local=True)
        return await super().probe(keys, target, timeout)  # type: ignore[arg-type]


def test_local_probe_errors_never_count_and_are_logged_once(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.transport = LocalErrorTransport()

    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = await up_on_a(rig, d)
            await rounds(d, 10)
            assert rt.health["b"].state is HealthState.UNKNOWN
            assert rt.health["b"].failures == 0

    with caplog.at_level(logging.ERROR, logger="natfail"):
        asyncio.run(main())
    lines = [r for r in caplog.records if "Too many open files" in r.getMessage()]
    assert len(lines) == 1, caplog.text
    assert "not counted against the backend" in lines[0].getMessage()


class ClockJump:
    """A monotonic clock that can jump ahead, as a SIGSTOPped process sees it."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def test_after_a_stall_probe_rounds_do_not_come_back_to_back(rig: Rig) -> None:
    clock = ClockJump()
    text = rig.text().replace("interval = 0.05", "interval = 0.4")
    starts: list[float] = []

    class Timed(FakeTransport):
        async def probe(self, keys: object, target: cfg.Endpoint, timeout: float) -> ProbeResult:
            if str(target) == A:
                starts.append(time.monotonic())
            return await super().probe(keys, target, timeout)  # type: ignore[arg-type]

    rig.transport = Timed()

    async def main() -> None:
        config = rig.write(text)
        d = Daemon(
            config,
            dataplane=rig.dp,
            conntrack=rig.ct,
            transport=rig.transport,
            notifier=rig.notifier,
            hooks=rig.hooks,
            monotonic=clock,
        )
        async with running(d):
            await until(lambda: len(starts) == 1)
            clock.offset += 20.0  # stopped for 20 s
            await until(lambda: len(starts) == 3, timeout=10)
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert min(gaps) >= 0.2, gaps  # never two rounds back to back

    asyncio.run(main())


def test_equally_lossy_backends_do_not_flap_traffic(rig: Rig) -> None:
    """~50 % loss on every path: traffic stays; a dead active still fails over."""
    rng = random.Random(7)

    loss = {A: 0.5, ADDRESS["b"]: 0.5, ADDRESS["c"]: 0.5}

    class Lossy(FakeTransport):
        async def probe(self, keys: object, target: cfg.Endpoint, timeout: float) -> ProbeResult:
            if rng.random() < loss[str(target)]:
                return ProbeResult(False, "timeout")
            return ProbeResult(True, "ok", 0.001)

    rig.transport = Lossy()

    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = d.services["wg0"]
            await until(lambda: True)
            for _ in range(50):
                await rounds(d, 1)
                if rt.active is not None:
                    break
            assert rt.active is not None
            await rounds(d, 240)  # 120 s at the 0.5 s interval of the report
            assert rt.failovers <= 1, rt.failovers
            # the active one dies for good, the others stay lossy: it is left
            dead = rt.active
            loss[ADDRESS[dead]] = 1.0
            await rounds(d, 20)
            assert rt.active != dead

    asyncio.run(main())


# --- state and status --------------------------------------------------------------------


def test_a_deeply_nested_state_file_is_ignored(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    d = rig.daemon()
    state = d.config.daemon.state_dir / STATE_FILE
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text("[" * 60000 + "]" * 60000)

    async def main() -> None:
        async with running(d):
            assert d.services["wg0"].drained == set()

    with caplog.at_level(logging.WARNING, logger="natfail"):
        asyncio.run(main())
    assert "ignoring unreadable state file" in caplog.text


def test_a_foreign_nat_of_the_public_endpoint_is_reported(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            await up_on_a(rig, d)
            public = cfg.Endpoint.parse(PUBLIC)
            ours = cfg.Endpoint.parse(A)
            rig.ct.flows[PUBLIC] = {ours: 3, public: 1}
            await d.foreign.check_all()
            assert json.loads(json.dumps(d.status()))["services"][0]["warnings"] == []
            rig.ct.flows[PUBLIC] = {ours: 3, cfg.Endpoint.parse("192.0.2.99:51820"): 2}
            await d.foreign.check_all()
            (warning,) = d.status()["services"][0]["warnings"]
            assert "192.0.2.99:51820 (2 flows)" in warning
            rig.ct.flows[PUBLIC] = {ours: 3}
            await d.foreign.check_all()
            assert d.status()["services"][0]["warnings"] == []

    with caplog.at_level(logging.INFO, logger="natfail"):
        asyncio.run(main())
    assert "not by natfail" in caplog.text
    assert "no client flow" in caplog.text


__all__ = ["Daemon", "rig"]  # the rig fixture, imported for pytest


def test_a_probe_in_flight_across_a_reload_is_not_counted_for_the_new_address(
    rig: Rig,
) -> None:
    """The reload race of issue 11: a's probe leaves for 10.0.0.2, a reload moves
    a to 10.0.0.9 meanwhile, and the old address's answer must not count."""
    release = asyncio.Event()

    class Slow(FakeTransport):
        async def probe(self, keys: object, target: cfg.Endpoint, timeout: float) -> ProbeResult:
            if str(target) == A:
                await release.wait()
            return await super().probe(keys, target, timeout)  # type: ignore[arg-type]

    rig.transport = Slow()

    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = d.services["wg0"]
            rig.set_up(a=True, b=True, c=True)
            in_flight = asyncio.create_task(d.probe_round("wg0"))
            await asyncio.sleep(0.05)  # a's probe is out, to the old address
            rig.path.write_text(rig.text().replace(A, "10.0.0.9:51820"))
            await d.reload()
            release.set()
            await in_flight
            assert rt.health["a"].state is HealthState.UNKNOWN
            assert rt.health["a"].successes == 0  # not counted for 10.0.0.9
            assert rt.health["b"].successes == 1  # unchanged backends count

    asyncio.run(main())
