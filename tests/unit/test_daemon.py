"""The daemon's logic with fakes at its edges: dataplane, conntrack, probe
transport, sd_notify and the notify hook. No root, no namespaces, no packets;
the namespace tests (tests/netns/test_daemon.py) run the real parts.

Two ways to drive it: `running(Daemon)` runs `Daemon.run()` with its probe
loops (interval 0.05 s) and waits for conditions; `running(ManualDaemon)` runs
the same start-up but fires no probe timer, so a test calls `probe_round`
itself and every step is deterministic."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from nacl.bindings import crypto_scalarmult_base

from natfail import config as cfg
from natfail.core import ruleset
from natfail.core import selector as sel
from natfail.core.health import HealthState
from natfail.daemon import STATE_FILE, Daemon, ServiceRuntime
from natfail.io.control import Peer, RequestError
from natfail.io.fakes import (
    Call,
    FakeConntrack,
    FakeDataplane,
    FakeHooks,
    FakeNotifier,
    FakeTransport,
)
from natfail.io.hooks import SwitchEvent

ROOT = Peer(pid=1, uid=0, gid=0, groups=frozenset())
A, B, C = "10.0.0.2:51820", "10.0.0.3:51820", "10.0.0.4:51820"
D, E = "10.0.1.2:51820", "10.0.1.3:51820"
ADDRESS = {"a": A, "b": B, "c": C, "d": D, "e": E}


# --- the daemon without its probe timer ---------------------------------------------------


class ManualDaemon(Daemon):
    """Fires no probe timer: the test runs the rounds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prober.arm = lambda: None  # type: ignore[method-assign]

    @property
    def started(self) -> list[str]:
        """The services that are scheduled for probing."""
        return self.schedule.names()


# --- config and rig ----------------------------------------------------------------------


def _service(name: str, public: str, key: str, hook: Path, backends: list[tuple[str, int]]) -> str:
    text = (
        f'[[service]]\nname = "{name}"\npublic = "{public}"\n'
        f'server_public_key = "{key}"\nnotify = "{hook}"\n'
    )
    for backend, priority in backends:
        text += (
            f'\n[[service.backend]]\nname = "{backend}"\n'
            f'address = "{ADDRESS[backend]}"\npriority = {priority}\n'
        )
    return text


class Rig:
    """One test's files, fakes and shared call log."""

    def __init__(self, tmp: Path, installed: ruleset.Ruleset | None = None) -> None:
        self.tmp = tmp
        self.path = tmp / "natfail.toml"
        key = tmp / "probe.key"
        key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        key.chmod(0o600)
        self.hook = tmp / "hook"
        self.hook.write_text("#!/bin/sh\nexit 0\n")
        self.hook.chmod(0o755)
        public = crypto_scalarmult_base(os.urandom(32))
        self.server_key = base64.b64encode(public).decode()
        self.calls: list[Call] = []
        self.dp = FakeDataplane(self.calls, installed)
        self.ct = FakeConntrack(self.calls)
        self.transport = FakeTransport()
        self.notifier = FakeNotifier()
        self.hooks = FakeHooks()

    def text(
        self, wg1: bool = False, wg0: list[tuple[str, int]] | None = None, state_dir: str = "state"
    ) -> str:
        head = (
            f'[daemon]\nsocket = "{self.tmp}/natfail.sock"\n'
            f'state_dir = "{self.tmp}/{state_dir}"\n\n'
            f'[probe]\nprivate_key_file = "{self.tmp}/probe.key"\n'
            "interval = 0.05\ntimeout = 0.02\nrise = 2\nfall = 2\n\n"
        )
        backends = wg0 if wg0 is not None else [("a", 100), ("b", 50), ("c", 10)]
        text = head + _service("wg0", "203.0.113.10:51820", self.server_key, self.hook, backends)
        if wg1:
            text += "\n" + _service(
                "wg1", "203.0.113.11:51820", self.server_key, self.hook, [("d", 100), ("e", 50)]
            )
        return text

    def write(self, text: str) -> cfg.Config:
        self.path.write_text(text)
        return cfg.parse(text, self.path)

    def daemon(self, kind: type[Daemon] = ManualDaemon, text: str | None = None) -> Daemon:
        config = self.write(text if text is not None else self.text())
        return kind(
            config,
            dataplane=self.dp,
            conntrack=self.ct,
            transport=self.transport,
            notifier=self.notifier,
            hooks=self.hooks,
            check_interval=0.1,
        )

    def set_up(self, **backends: bool) -> None:
        for name, up in backends.items():
            self.transport.up[ADDRESS[name]] = up

    def cleanups(self) -> list[Call]:
        return [c for c in self.calls if c[0] == "cleanup"]


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def mark(backend: str, service: str = "wg0") -> int:
    return ruleset.backend_mark(service, backend)


def dnat_of(rs: ruleset.Ruleset, service: str = "wg0") -> str | None:
    """The backend address the service's DNAT points to, None when there is none."""
    targets = [str(d.backend) for d in rs.dnat if d.service == service]
    assert len(targets) <= 1
    return targets[0] if targets else None


async def until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(d: Daemon) -> AsyncIterator[Daemon]:
    notifier = d.notifier
    assert isinstance(notifier, FakeNotifier)
    seen = len(notifier.lines)  # a rig's notifier may have served an earlier daemon
    task = asyncio.create_task(d.run())
    await until(lambda: "READY=1" in notifier.lines[seen:] or task.done())
    if task.done():
        task.result()  # raises what run() raised
        raise AssertionError("run() returned before READY=1")
    try:
        yield d
    finally:
        d.stop()
        assert await asyncio.wait_for(task, 5) == 0
    assert "STOPPING=1" in notifier.lines


async def rounds(d: Daemon, n: int, service: str = "wg0") -> None:
    for _ in range(n):
        await d.probe_round(service)


async def up_on_a(rig: Rig, d: Daemon) -> ServiceRuntime:
    """All three backends UP after `rise` rounds: a (priority 100) is active."""
    hooks = rig.hooks
    rig.set_up(a=True, b=True, c=True)
    await rounds(d, 2)
    rt = d.services["wg0"]
    assert rt.active == "a"
    await until(lambda: len(hooks.events) >= 1)  # the "initial" hook has run
    return rt


# --- selection and failover, with the real probe loops -----------------------------------


def test_initial_selection_then_failover_swaps_before_cleanup(rig: Rig) -> None:
    async def main() -> None:
        rig.set_up(a=True, b=True, c=True)
        async with running(rig.daemon(Daemon)) as d:
            rt = d.services["wg0"]
            await until(lambda: rt.active == "a")
            assert dnat_of(rig.dp.installed) == A
            assert rig.dp.applied[-1].active() == {"wg0": "a"}
            assert rig.cleanups() == []  # nothing to clean on the first choice
            await until(lambda: len(rig.hooks.events) == 1)
            hook, event = rig.hooks.events[0]
            assert hook == rig.hook
            assert event == SwitchEvent("wg0", None, "a", "initial", A)
            assert rt.failovers == 0

            rig.calls.clear()
            rig.set_up(a=False)
            await until(lambda: rt.active == "b")
            await until(lambda: len(rig.hooks.events) == 2)
            # one transaction to b, and only then a's flows go
            assert rig.calls[:2] == [("apply", {"wg0": "b"}), ("cleanup", mark("a"), A)]
            assert rig.hooks.events[1][1] == SwitchEvent("wg0", "a", "b", "failover", B)
            assert rt.failovers == 1
            assert dnat_of(rig.dp.installed) == B
            assert d.status()["services"][0]["failovers"] == 1
            assert rt.health["a"].state is HealthState.DOWN
            assert any(line.startswith("STATUS=active wg0: b") for line in rig.notifier.lines)

    asyncio.run(main())


def test_nothing_is_chosen_before_rise_successes(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rig.set_up(a=True, b=True)
            await rounds(d, 1)  # rise is 2
            assert d.services["wg0"].active is None
            assert all(dnat_of(rs) is None for rs in rig.dp.applied)
            await rounds(d, 1)
            assert d.services["wg0"].active == "a"
            assert dnat_of(rig.dp.applied[-1]) == A

    asyncio.run(main())


def test_failed_apply_keeps_old_active_and_is_retried(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = await up_on_a(rig, d)
            rig.calls.clear()
            hooks_before = len(rig.hooks.events)
            rig.set_up(a=False)
            rig.dp.fail_next = 1
            await rounds(d, 2)  # fall is 2: the second round decides, the swap fails
            assert rt.health["a"].state is HealthState.DOWN
            assert rig.calls == [("apply-failed", {"wg0": "b"})]
            assert rt.active == "a"
            assert rt.failovers == 0
            assert dnat_of(rig.dp.installed) == A
            await asyncio.sleep(0)
            assert len(rig.hooks.events) == hooks_before  # no switch, no hook
            await rounds(d, 1)  # retried
            assert rig.calls[1:] == [("apply", {"wg0": "b"}), ("cleanup", mark("a"), A)]
            assert rt.active == "b"
            assert rt.failovers == 1
            assert dnat_of(rig.dp.installed) == B

    asyncio.run(main())


def test_all_down_keeps_the_last_rule(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = await up_on_a(rig, d)
            await rounds(d, 30)  # a history of clean probes, as a running daemon has
            rig.calls.clear()
            rig.set_up(a=False, b=False, c=False)
            await rounds(d, 4)
            assert all(h.state is HealthState.DOWN for h in rt.health.values())
            assert rt.active == "a"
            assert rt.no_healthy
            # no apply; the standbys' flows go as each goes down, a's flows stay
            assert rig.calls == [("cleanup", mark("b"), B), ("cleanup", mark("c"), C)]
            assert dnat_of(rig.dp.applied[-1]) == A
            assert dnat_of(rig.dp.installed) == A
            assert sum("no healthy backend" in r.message for r in caplog.records) == 1
            # the first one back gets the traffic (its short outage leaves it clean)
            rig.calls.clear()
            rig.set_up(c=True)
            await rounds(d, 2)
            assert rt.active == "c"
            assert not rt.no_healthy
            assert rig.calls == [("apply", {"wg0": "c"}), ("cleanup", mark("a"), A)]

    with caplog.at_level(logging.INFO, logger="natfail"):
        asyncio.run(main())


# --- adoption and the state file ---------------------------------------------------------


def test_restart_adopts_the_installed_rule(tmp_path: Path) -> None:
    probe = Rig(tmp_path)  # only to build the installed ruleset from the same config
    installed = ruleset.build(probe.write(probe.text()).services, {"wg0": "b"})
    rig = Rig(tmp_path, installed)
    rig.server_key = probe.server_key

    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = d.services["wg0"]
            assert rt.active == "b"
            assert rig.dp.applied == [installed]  # the start-up apply changes nothing
            rig.set_up(a=True, b=True, c=True)
            await rounds(d, 1)  # everyone UNKNOWN still: pending, b stays
            assert rt.health["b"].state is HealthState.UNKNOWN
            assert rt.active == "b"
            await rounds(d, 2)  # all UP, sticky: b stays although a has priority
            assert rt.active == "b"
            assert all(dnat_of(rs) == B for rs in rig.dp.applied)
            # at start only: flows of the others go (an earlier run may have died
            # between a swap and its cleanup); the active backend's flows stay
            assert rig.cleanups() == [("cleanup", mark("a"), A), ("cleanup", mark("c"), C)]
            assert rt.failovers == 0
            await asyncio.sleep(0)
            assert rig.hooks.events == []

    asyncio.run(main())


def test_pin_and_drain_survive_a_restart(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            await up_on_a(rig, d)
            await d.requests.handle({"command": "switch", "service": "wg0", "backend": "b"}, ROOT)
            await d.requests.handle({"command": "drain", "service": "wg0", "backend": "c"}, ROOT)
            assert d.services["wg0"].active == "b"
        saved = json.loads((rig.tmp / "state" / STATE_FILE).read_text())
        assert saved["services"]["wg0"]["pin"] == {"backend": "b", "armed": True}
        assert saved["services"]["wg0"]["drained"] == ["c"]

        rig.calls.clear()
        async with running(rig.daemon()) as again:
            rt = again.services["wg0"]
            assert rt.pin == sel.Pin("b", True)
            assert rt.drained == {"c"}
            assert rt.active == "b"  # adopted from the installed rule
            await rounds(again, 2)  # a UP with higher priority: the pin holds
            assert rt.active == "b"
            assert again.status()["services"][0]["pinned"] is True
            states = {b["name"]: b["state"] for b in again.status()["services"][0]["backends"]}
            assert states == {"a": "up", "b": "up", "c": "drained"}
            assert rig.cleanups() == [("cleanup", mark("a"), A), ("cleanup", mark("c"), C)]

    asyncio.run(main())


def test_unreadable_state_file_is_ignored(rig: Rig) -> None:
    async def main() -> None:
        (rig.tmp / "state").mkdir()
        (rig.tmp / "state" / STATE_FILE).write_text("{not json")
        async with running(rig.daemon()) as d:
            assert d.services["wg0"].pin is None
            assert d.services["wg0"].drained == set()

    asyncio.run(main())


# --- the control handler -----------------------------------------------------------------


def test_switch_refuses_a_down_backend_unless_forced(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rig.set_up(a=True, b=True, c=False)
            await rounds(d, 2)
            rt = d.services["wg0"]
            assert rt.health["c"].state is HealthState.DOWN
            request: dict[str, Any] = {"command": "switch", "service": "wg0", "backend": "c"}
            with pytest.raises(RequestError) as refused:
                await d.requests.handle(request, ROOT)
            assert refused.value.code == 1
            assert "down" in str(refused.value)
            assert rt.active == "a" and rt.pin is None

            rig.calls.clear()
            reply = await d.requests.handle({**request, "force": True}, ROOT)
            assert reply["active"] == "c"
            assert rt.pin == sel.Pin("c", armed=False)  # a forced pin outlives c being down
            assert rig.calls == [("apply", {"wg0": "c"}), ("cleanup", mark("a"), A)]
            await rounds(d, 2)
            assert rt.active == "c"

            reply = await d.requests.handle({"command": "release", "service": "wg0"}, ROOT)
            assert rt.pin is None
            await rounds(d, 1)  # c is DOWN and no longer pinned: failover to a
            assert rt.active == "a"

    asyncio.run(main())


def test_switch_to_an_up_backend_pins_it(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = await up_on_a(rig, d)
            rig.calls.clear()
            reply = await d.requests.handle(
                {"command": "switch", "service": "wg0", "backend": "c"}, ROOT
            )
            assert reply["active"] == "c"
            assert rt.pin == sel.Pin("c", armed=True)
            assert rig.calls == [("apply", {"wg0": "c"}), ("cleanup", mark("a"), A)]
            # an armed pin ends when c fails; failover to the best UP backend
            rig.set_up(c=False)
            await rounds(d, 2)
            assert rt.pin is None
            assert rt.active == "a"

    asyncio.run(main())


def test_switch_or_drain_the_firewall_refuses_changes_nothing(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = await up_on_a(rig, d)
            rig.calls.clear()
            for command in ("switch", "drain"):
                rig.dp.fail_next = 1
                with pytest.raises(RequestError) as refused:
                    await d.requests.handle(
                        {
                            "command": command,
                            "service": "wg0",
                            "backend": "b" if command == "switch" else "a",
                        },
                        ROOT,
                    )
                assert refused.value.code == 1 and "nothing changed" in str(refused.value)
                assert rt.active == "a" and rt.pin is None and rt.drained == set()
            # and the next round does not carry either out behind the operator's back
            await rounds(d, 2)
            assert rt.active == "a"
            assert [c[0] for c in rig.calls] == ["apply-failed", "apply-failed"]

    asyncio.run(main())


def test_switch_refuses_a_drained_backend_even_forced(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            await up_on_a(rig, d)
            await d.requests.handle({"command": "drain", "service": "wg0", "backend": "b"}, ROOT)
            with pytest.raises(RequestError, match="drained"):
                await d.requests.handle(
                    {"command": "switch", "service": "wg0", "backend": "b", "force": True}, ROOT
                )
            assert d.services["wg0"].active == "a"

    asyncio.run(main())


def test_drain_of_the_active_backend_moves_traffic(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = await up_on_a(rig, d)
            rig.calls.clear()
            reply = await d.requests.handle(
                {"command": "drain", "service": "wg0", "backend": "a"}, ROOT
            )
            assert reply["active"] == "b"
            assert rig.calls == [("apply", {"wg0": "b"}), ("cleanup", mark("a"), A)]
            await until(lambda: len(rig.hooks.events) == 2)
            assert rig.hooks.events[-1][1].reason == "drain"
            await rounds(d, 2)  # a is UP but drained: stays out
            assert rt.active == "b"
            await d.requests.handle({"command": "undrain", "service": "wg0", "backend": "a"}, ROOT)
            assert rt.active == "b"  # sticky: no move back
            assert rt.drained == set()

    asyncio.run(main())


def test_unknown_service_backend_or_command_is_refused(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            await up_on_a(rig, d)
            with pytest.raises(RequestError, match="no service 'wg9'") as exc:
                await d.requests.handle(
                    {"command": "switch", "service": "wg9", "backend": "a"}, ROOT
                )
            assert exc.value.code == 1
            with pytest.raises(RequestError, match="no backend 'z'"):
                await d.requests.handle(
                    {"command": "drain", "service": "wg0", "backend": "z"}, ROOT
                )
            with pytest.raises(RequestError, match="no backend"):
                await d.requests.handle({"command": "switch", "service": "wg0"}, ROOT)
            with pytest.raises(RequestError, match="no service"):
                await d.requests.handle({"command": "release"}, ROOT)
            with pytest.raises(RequestError) as unknown:
                await d.requests.handle({"command": "explode"}, ROOT)
            assert unknown.value.code == 2
            assert (await d.requests.handle({"command": "ping"}, ROOT))["message"] == "pong"
            assert d.services["wg0"].active == "a"
            assert d.services["wg0"].drained == set()

    asyncio.run(main())


def test_status_matches_the_contract(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rig.set_up(a=True, b=True, c=False)
            await rounds(d, 2)
            await d.requests.handle({"command": "drain", "service": "wg0", "backend": "b"}, ROOT)
            status = await d.requests.handle({"command": "status"}, ROOT)
            status = json.loads(json.dumps(status))  # what natfailctl gets
            assert set(status) == {"services"}
            (service,) = status["services"]
            assert {"name", "public", "active", "pinned", "failovers", "backends"} <= set(service)
            assert service["name"] == "wg0"
            assert service["public"] == "203.0.113.10:51820"
            assert service["active"] == "a"
            assert service["pinned"] is False
            assert service["failovers"] == 0
            backends = {b["name"]: b for b in service["backends"]}
            assert [b["name"] for b in service["backends"]] == ["a", "b", "c"]
            for b in backends.values():
                assert {"name", "address", "state", "rtt_ms", "since"} <= set(b)
                assert b["state"] in ("up", "down", "unknown", "drained")
                assert isinstance(b["since"], str) and b["since"]
            assert {n: b["state"] for n, b in backends.items()} == {
                "a": "up",
                "b": "drained",
                "c": "down",
            }
            assert backends["a"]["address"] == A
            assert backends["a"]["rtt_ms"] == pytest.approx(1.5)
            assert backends["c"]["rtt_ms"] is None

    asyncio.run(main())


def test_status_before_any_verdict(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            service = d.status()["services"][0]
            assert service["active"] is None
            assert {b["state"] for b in service["backends"]} == {"unknown"}

    asyncio.run(main())


# --- reload ------------------------------------------------------------------------------


def test_bad_reload_is_refused_and_changes_nothing(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = await up_on_a(rig, d)
            config, services, applied = d.config, dict(d.services), len(rig.dp.applied)
            good = rig.path.read_text()
            rig.path.write_text(good.replace("priority = 100", "priority = 'high'"))
            with pytest.raises(RequestError) as refused:
                await d.requests.handle({"command": "reload"}, ROOT)
            assert refused.value.code == 2
            assert "priority" in str(refused.value)
            # a [daemon] change needs a restart: refused as well
            rig.path.write_text(good.replace('state_dir = "', 'state_dir = "/x'))
            with pytest.raises(RequestError) as daemon_change:
                await d.reload()
            assert daemon_change.value.code == 2
            # a missing probe key is refused before anything changes
            rig.path.write_text(good.replace("probe.key", "missing.key"))
            with pytest.raises(RequestError) as missing:
                await d.reload()
            assert missing.value.code == 2
            assert d.config is config
            assert d.services == services and d.services["wg0"] is rt
            assert rt.active == "a"
            assert len(rig.dp.applied) == applied
            assert rig.cleanups() == []
            assert rig.notifier.lines[-2] == "READY=1"  # after RELOADING=1, then STATUS

    asyncio.run(main())


def test_reload_that_removes_the_active_backend_moves_traffic(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = await up_on_a(rig, d)
            rig.calls.clear()
            since = len(rig.dp.applied)
            rig.write(rig.text(wg0=[("b", 50), ("c", 10)]))
            reply = await d.requests.handle({"command": "reload"}, ROOT)
            assert "0 added, 0 removed" in reply["message"]
            assert d.config.services[0].backend("a") is None
            # one transaction straight to b (never a moment without the DNAT), then
            # a's flows go
            assert rig.calls == [("apply", {"wg0": "b"}), ("cleanup", mark("a"), A)]
            assert rt.active == "b"
            assert dnat_of(rig.dp.installed) == B
            await rounds(d, 1)
            assert rt.active == "b"
            assert all(dnat_of(rs) == B for rs in rig.dp.applied[since:])
            await until(lambda: rig.hooks.events[-1][1].active == "b")
            assert rig.hooks.events[-1][1].previous == "a"

    asyncio.run(main())


def test_reload_the_firewall_refuses_leaves_the_running_config(rig: Rig) -> None:
    async def main() -> None:
        d = rig.daemon()
        assert isinstance(d, ManualDaemon)
        async with running(d):
            rt = await up_on_a(rig, d)
            config, health, installed = d.config, dict(rt.health), rig.dp.installed
            rig.calls.clear()
            rig.write(rig.text(wg1=True, wg0=[("b", 50), ("c", 10)]))
            rig.dp.fail_next = 1
            with pytest.raises(RequestError) as refused:
                await d.reload()
            assert refused.value.code == 1 and "running config stays" in str(refused.value)
            assert d.config is config and set(d.services) == {"wg0"}
            assert d.services["wg0"] is rt and rt.service is config.services[0]
            assert rt.active == "a" and rt.health == health
            assert rig.cleanups() == []  # a's flows were not touched
            assert rig.dp.installed is installed
            assert d.started == ["wg0"]  # wg1 never started probing
            # the next probe round finds nothing to change
            await rounds(d, 1)
            assert rt.active == "a" and [c for c in rig.calls if c[0] == "apply"] == []

    asyncio.run(main())


def test_reload_that_changes_the_active_address_resets_and_moves(rig: Rig) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            rt = await up_on_a(rig, d)
            rig.calls.clear()
            text = rig.text().replace(f'address = "{A}"', 'address = "10.0.0.9:51820"')
            rig.write(text)
            await d.reload()
            assert rt.health["a"].state is HealthState.UNKNOWN
            assert rt.health["b"].state is HealthState.UP  # unchanged backends keep theirs
            assert ("cleanup", mark("a"), A) in rig.calls  # the old address's flows go
            assert rt.active == "b"

    asyncio.run(main())


def test_reload_that_adds_a_service_starts_probing_it(rig: Rig) -> None:
    async def main() -> None:
        rig.set_up(a=True, b=True, c=True, d=True, e=True)
        async with running(rig.daemon(Daemon)) as d:
            await until(lambda: d.services["wg0"].active == "a")
            assert D not in rig.transport.probed
            rig.write(rig.text(wg1=True))
            reply = await d.reload()
            assert "1 added, 0 removed" in reply
            assert set(d.services) == {"wg0", "wg1"}
            await until(lambda: d.services["wg1"].active == "d")
            assert D in rig.transport.probed and E in rig.transport.probed
            assert rig.dp.installed.active() == {"wg0": "a", "wg1": "d"}
            assert rig.cleanups() == []

            # and removing it again stops the probes and cleans its active backend
            rig.write(rig.text())
            assert "1 removed" in await d.reload()
            assert set(d.services) == {"wg0"}
            assert ("cleanup", mark("d", "wg1"), D) in rig.calls
            assert rig.dp.installed.active() == {"wg0": "a"}
            probed = len([p for p in rig.transport.probed if p == D])
            await asyncio.sleep(0.15)
            assert len([p for p in rig.transport.probed if p == D]) == probed

    asyncio.run(main())


# --- reconcile ---------------------------------------------------------------------------


def test_reconcile_repairs_a_flushed_ruleset(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with running(rig.daemon()) as d:
            await up_on_a(rig, d)
            applied = len(rig.dp.applied)
            await d.reconcile("test")
            assert len(rig.dp.applied) == applied  # intact and equal: nothing to do
            rig.dp.flush()
            await d.reconcile("test")
            assert len(rig.dp.applied) == applied + 1
            assert dnat_of(rig.dp.installed) == A
            assert any("repaired" in r.message and "(test)" in r.message for r in caplog.records)
            # no probe round reads the firewall: drift waits for the periodic check
            reads = rig.dp.reads
            await rounds(d, 10)
            assert rig.dp.reads == reads
            rig.dp.flush()
            await rounds(d, 1)
            assert rig.dp.installed.empty
            await until(lambda: dnat_of(rig.dp.installed) == A)  # check_interval 0.1 s
            assert rig.cleanups() == []
            assert any("(found by the periodic check)" in r.message for r in caplog.records)

    with caplog.at_level(logging.INFO, logger="natfail"):
        asyncio.run(main())


def test_a_ruleset_change_event_triggers_reconcile(rig: Rig) -> None:
    async def main() -> None:
        d = rig.daemon()
        async with running(d):
            await up_on_a(rig, d)
            rig.dp.flush()
            d.request_check()  # what the nft monitor's callback does
            await until(lambda: dnat_of(rig.dp.installed) == A)

    asyncio.run(main())


def test_keys_stay_out_of_logs_status_and_errors(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A key file that became readable by others is refused on reload with one
    line naming the file; no key, in any spelling, reaches a log line, the
    status or an error."""
    psk = base64.b64encode(os.urandom(32)).decode()
    (rig.tmp / "probe.psk").write_text(psk + "\n")
    (rig.tmp / "probe.psk").chmod(0o600)
    text = rig.text().replace(
        "server_public_key", f'preshared_key_file = "{rig.tmp}/probe.psk"\nserver_public_key'
    )
    probe_key = (rig.tmp / "probe.key").read_text().strip()
    secrets = [probe_key, psk]
    secrets += [base64.b64decode(s).hex() for s in secrets]

    async def main() -> list[str]:
        outputs: list[str] = []
        async with running(rig.daemon(text=text)) as d:
            await up_on_a(rig, d)
            outputs.append(json.dumps(d.status()))
            for path in (rig.tmp / "probe.key", rig.tmp / "probe.psk"):
                path.chmod(0o644)
                with pytest.raises(RequestError) as refused:
                    await d.requests.handle({"command": "reload"}, ROOT)
                assert refused.value.code == 2
                message = str(refused.value)
                assert str(path) in message and "too open" in message
                assert len(message.splitlines()) == 1
                outputs.append(message)
                path.chmod(0o600)
            outputs.append(await d.reload())
            outputs.append(json.dumps(d.status()))
        return outputs

    with caplog.at_level(logging.DEBUG):
        outputs = asyncio.run(main())
    outputs.append(caplog.text)
    outputs += [str(r.args) for r in caplog.records]
    outputs += rig.notifier.lines
    for secret in secrets:
        for out in outputs:
            assert secret not in out


def test_a_preempt_comes_when_it_falls_due_not_at_the_next_probe_round(rig: Rig) -> None:
    """The controller asks for a wake-up at the preempt's time; no probe round
    runs in between (the test runs none)."""
    text = rig.text().replace(
        'notify = "', 'failback = "preempt"\npreempt_delay = 0.3\nnotify = "', 1
    )

    async def main() -> None:
        async with running(rig.daemon(text=text)) as d:
            rig.set_up(a=False, b=True, c=True)
            await rounds(d, 2)
            rt = d.services["wg0"]
            assert rt.active == "b"
            rig.set_up(a=True)
            await rounds(d, 2)  # a is up again, from now on
            assert rt.active == "b"
            await until(lambda: rt.active == "a", timeout=3)
            assert d.switches.last(1)[0].reason == "preempt"

    asyncio.run(main())
