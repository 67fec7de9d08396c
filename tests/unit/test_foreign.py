"""The foreign-NAT check's cadence: one conntrack dump per public address, each
address once per interval, the first at once (natfail.foreign)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from natfail.core.model import Endpoint
from natfail.foreign import FOREIGN_CHECK_INTERVAL, ForeignCheck
from natfail.io.conntrack import PublicFlows


@dataclass
class _Service:
    name: str
    public: Endpoint
    backends: tuple[Any, ...] = ()


@dataclass
class _Runtime:
    service: _Service
    active: str | None = "a"
    foreign: dict[str, int] = field(default_factory=dict)


class _Conntrack:
    def __init__(self) -> None:
        self.looks: list[list[Endpoint]] = []

    async def public_flows(self, publics: Iterable[Endpoint]) -> dict[Endpoint, PublicFlows]:
        asked = list(publics)
        self.looks.append(asked)
        return {p: PublicFlows(0, 0) for p in asked}


class _Daemon:
    def __init__(self, services: dict[str, _Runtime]) -> None:
        self.services = services
        self.now = 100.0
        self.firewall = type("_Firewall", (), {"conntrack": _Conntrack()})()

    def monotonic(self) -> float:
        return self.now


def _endpoint(ip: str, port: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(ip), port)


def _daemon(publics: list[Endpoint]) -> _Daemon:
    return _Daemon({f"s{i}": _Runtime(_Service(f"s{i}", p)) for i, p in enumerate(publics)})


def _run(daemon: _Daemon, seconds: int) -> list[list[Endpoint]]:
    check = ForeignCheck(cast(Any, daemon))
    ct = daemon.firewall.conntrack

    async def ticks() -> None:
        for _ in range(seconds):
            await check.tick()
            daemon.now += 1.0

    asyncio.run(ticks())
    return cast(list[list[Endpoint]], ct.looks)


def test_many_services_on_one_address_cost_one_dump_per_interval() -> None:
    publics = [_endpoint("203.0.113.10", 40000 + i) for i in range(50)]
    looks = _run(_daemon(publics), 31)
    # at once, then once per interval: never one dump per service
    assert len(looks) == 1 + int(30 // FOREIGN_CHECK_INTERVAL)
    assert all(sorted(look, key=lambda e: e.port) == publics for look in looks)


def test_each_address_is_looked_at_once_per_interval() -> None:
    publics = [_endpoint(f"203.0.113.{10 + i}", 51820) for i in range(3)]
    looks = _run(_daemon(publics), 61)
    assert [len(look) for look in looks] == [1] * len(looks)
    # 3 addresses every 15 s over 60 s, plus the first look
    assert 12 <= len(looks) <= 13
    assert {look[0] for look in looks} == set(publics)


def test_services_without_an_active_backend_are_not_looked_at() -> None:
    daemon = _daemon([_endpoint("203.0.113.10", 51820), _endpoint("203.0.113.10", 51821)])
    daemon.services["s0"].active = None
    looks = _run(daemon, 1)
    assert looks == [[_endpoint("203.0.113.10", 51821)]]
    for rt in daemon.services.values():
        rt.active = None
    assert _run(daemon, 20) == looks  # nothing more: no DNAT to override
