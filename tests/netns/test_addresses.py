"""The gateway's address watch over real netlink, in a namespace of its own:
what keepalived does to a VIP (add, remove) is seen, and a burst is one change."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from natfail.io.addresses import Addresses, NetlinkAddressWatch
from tests.netns.nsworker import NsWorker

VIP = ipaddress.ip_address("203.0.113.10")
VIP6 = ipaddress.ip_address("2001:db8::10")


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"nfaw{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (
            "link set lo up",
            "link add v0 type veth peer name v1",
            "link set v0 up",
        ):
            subprocess.run(["ip", "-n", name, *cmd.split()], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _ip(ns: str, cmd: str) -> None:
    subprocess.run(["ip", "-n", ns, *cmd.split()], check=True)


def watch_vips(namespace: str) -> list[Addresses]:
    """Runs in the namespace (NsWorker): adds and removes the VIPs under a watch."""

    async def main() -> list[Addresses]:
        seen: list[Addresses] = []
        watch = NetlinkAddressWatch()
        start = await asyncio.to_thread(watch.current)
        assert VIP not in start
        watch.start(seen.append)
        await asyncio.sleep(0.3)
        _ip(namespace, f"addr add {VIP}/32 dev v0")
        _ip(namespace, f"addr add {VIP6}/128 dev v0 nodad")
        await asyncio.sleep(1.0)
        _ip(namespace, f"addr del {VIP}/32 dev v0")
        _ip(namespace, f"addr del {VIP6}/128 dev v0")
        await asyncio.sleep(1.0)
        watch.close()
        return seen

    return asyncio.run(main())


def test_the_watch_sees_a_vip_come_and_go(namespace: str) -> None:
    with NsWorker(namespace) as worker:
        seen: list[Addresses] = worker.call(watch_vips, namespace)
    assert seen, "no change seen"
    assert any(VIP in s and VIP6 in s for s in seen), seen
    assert VIP not in seen[-1] and VIP6 not in seen[-1], seen
    assert len(seen) <= 4, seen  # bursts are folded, not one change per message
