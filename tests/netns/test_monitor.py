"""The nftables monitor with real nft: one event per foreign transaction, none
for natfail's own transactions (made from the firewall's worker thread)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator

import pytest

from natfail.core.ruleset import Builder
from natfail.firewall import Firewall
from natfail.io import nft_monitor
from natfail.io.nftables import NftablesDataplane
from tests.builders import service
from tests.netns.nsworker import NsWorker


def _events_seen() -> list[str]:
    """Runs in a fresh namespace: what the monitor reported, step by step."""

    async def main() -> list[str]:
        seen: list[str] = []
        step = ["start"]
        firewall = Firewall(NftablesDataplane(), conntrack=None)  # type: ignore[arg-type]
        watcher = nft_monitor.start(lambda: seen.append(step[0]), firewall.own)
        await asyncio.sleep(0.5)
        services = [
            service(
                f"s{i}",
                f"203.0.113.{i + 1}:51820",
                [("a", f"10.0.{i}.2:51820"), ("b", f"10.0.{i}.3:51820")],
            )
            for i in range(50)
        ]
        builder = Builder(services)
        for n, backend in enumerate(["a", "b", "a", "b"]):
            step[0] = f"own-{n}"
            error = await firewall.apply(builder.build({s.name: backend for s in services}))
            assert error is None, error
        await asyncio.sleep(0.5)
        step[0] = "foreign"
        subprocess.run(["nft", "flush", "ruleset"], check=True)
        await asyncio.sleep(0.5)
        watcher.cancel()
        firewall.close()
        return seen

    return asyncio.run(main())


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"nf-mon-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_the_monitor_ignores_our_transactions_and_folds_a_foreign_one(namespace: str) -> None:
    with NsWorker(namespace) as worker:
        seen = worker.call(_events_seen)
    # one look at the start, none for the four own transactions (one of them
    # created the table with 200 elements), one for the flush
    assert seen == ["start", "foreign"], seen
