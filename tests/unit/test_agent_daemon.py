"""The agent's server over a real loopback UDP socket, with an in-memory
WireGuard interface, and the gateway's AgentLink as the other end."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from natfail.agent.config import AgentConfig
from natfail.agent.daemon import Agent
from natfail.agent.wireguard import NO_KEY, FakeWireGuard, Interface, Peer
from natfail.core import agent_channel as ch
from natfail.core import agent_messages as msg
from natfail.core import noise
from natfail.core.model import Endpoint
from natfail.core.tai64n import next_timestamp
from natfail.io.agent_link import AgentLink

GATEWAY = bytes(range(1, 33))
STRANGER = bytes(range(2, 34))
SERVER = bytes(range(3, 35))
SERVER_PUB = noise.public_key(SERVER)
CLIENT = bytes([7]) * 32
IDLE = bytes([8]) * 32
CLIENT_EP = Endpoint(ipaddress.ip_address("198.51.100.7"), 40000)


def _interface(now: float) -> Interface:
    return Interface(
        "wgtest0",
        SERVER,
        SERVER_PUB,
        51820,
        (
            Peer(CLIENT, CLIENT_EP, now - 30, 0, ("10.9.0.2/32",), NO_KEY),
            Peer(IDLE, CLIENT_EP, now - 400, 0, ("10.9.0.3/32",), NO_KEY),
        ),
    )


def _stamps() -> Callable[[], bytes]:
    last: list[bytes | None] = [None]

    def next_stamp() -> bytes:
        stamp = next_timestamp(time.time_ns(), last[0])
        last[0] = stamp
        return stamp

    return next_stamp


@asynccontextmanager
async def _agent(wg: FakeWireGuard) -> AsyncIterator[tuple[Agent, Endpoint]]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    where = Endpoint(ipaddress.ip_address("127.0.0.1"), sock.getsockname()[1])
    config = AgentConfig(where, (noise.public_key(GATEWAY),), ("wgtest0",))
    agent = Agent(config, opener=lambda name: wg)
    task = asyncio.create_task(agent.run(sock))
    for _ in range(100):
        if agent._identities:
            break
        await asyncio.sleep(0.01)
    try:
        yield agent, where
    finally:
        agent.stopping.set()
        await task


def test_a_poll_reports_recent_peers_and_no_keys() -> None:
    async def main() -> None:
        wg = FakeWireGuard(_interface(time.time()))
        async with _agent(wg) as (_, where):
            link = AgentLink(GATEWAY, _stamps())
            pages = await link.poll(where, SERVER_PUB, 0)
            assert pages is not None and len(pages) == 1
            report = pages[0]
            assert [p.public_key for p in report.peers] == [CLIENT]  # IDLE is too old
            assert report.peers[0].endpoint == CLIENT_EP
            assert 29_000 <= report.peers[0].handshake_age_ms <= 60_000
            assert abs(report.clock_ns - time.time_ns()) < 10 * 10**9
            # unchanged: no peers the second time
            again = await link.poll(where, SERVER_PUB, report.version)
            assert again is not None and again[0].peers == () and again[0].version == report.version

    asyncio.run(main())


def test_an_activation_reaches_wireguard() -> None:
    async def main() -> None:
        wg = FakeWireGuard(_interface(time.time()))
        async with _agent(wg) as (_, where):
            link = AgentLink(GATEWAY, _stamps())
            target = Endpoint(ipaddress.ip_address("198.51.100.9"), 41000)
            replies = await link.activate(where, SERVER_PUB, 5, (msg.Target(CLIENT, target),))
            assert len(replies) == 1 and replies[0] is not None
            assert replies[0].epoch == 5 and replies[0].known == 1
            assert wg.activations == [[(CLIENT, target)]]

    asyncio.run(main())


def test_unknown_gateway_forgery_and_replay_get_no_answer() -> None:
    async def main() -> None:
        wg = FakeWireGuard(_interface(time.time()))
        async with _agent(wg) as (agent, where):
            stranger = AgentLink(STRANGER, _stamps())
            assert await stranger.poll(where, SERVER_PUB, 0, timeout=0.2) is None
            wrong_key = AgentLink(GATEWAY, _stamps())
            assert await wrong_key.poll(where, noise.public_key(STRANGER), 0, timeout=0.2) is None
            # a captured request, sent twice: only the first is answered
            payload = msg.encode(msg.Activate(1, (msg.Target(CLIENT, CLIENT_EP),), 0, 1))
            datagram, pending = ch.new_request(GATEWAY, SERVER_PUB, payload, _stamps()())
            loop = asyncio.get_running_loop()
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(where.sockaddr())
            try:
                for expected in (True, False):
                    sock.send(datagram)
                    try:
                        raw = await asyncio.wait_for(loop.sock_recv(sock, 65535), 0.5)
                    except TimeoutError:
                        raw = None
                    assert (raw is not None) == expected
                    if raw is not None:
                        assert isinstance(ch.open_reply(pending, raw), bytes)
                sock.send(b"\x00" * 200)  # garbage
                sock.send(datagram[:-1] + bytes([datagram[-1] ^ 1]))  # forged mac1
            finally:
                sock.close()
            await asyncio.sleep(0.1)
            assert len(wg.activations) == 1
            assert agent.ignored >= 5
            # still serving
            assert await wrong_key.poll(where, SERVER_PUB, 0) is not None

    asyncio.run(main())


def test_a_missing_interface_is_no_crash() -> None:
    async def main() -> None:
        wg = FakeWireGuard(_interface(time.time()), fail="no such interface")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        where = Endpoint(ipaddress.ip_address("127.0.0.1"), sock.getsockname()[1])
        agent = Agent(
            AgentConfig(where, (noise.public_key(GATEWAY),), ("wgtest0",)), opener=lambda n: wg
        )
        task = asyncio.create_task(agent.run(sock))
        await asyncio.sleep(0.1)
        link = AgentLink(GATEWAY, _stamps())
        assert await link.poll(where, SERVER_PUB, 0, timeout=0.2) is None
        wg.fail = None
        await agent.refresh()
        assert await link.poll(where, SERVER_PUB, 0) is not None
        agent.stopping.set()
        await task

    asyncio.run(main())


def test_the_agent_records_the_highest_epoch_per_interface_and_reports_it() -> None:
    server2 = bytes(range(4, 36))
    server2_pub = noise.public_key(server2)
    other = Interface("wgtest1", server2, server2_pub, 51821, ())

    async def main() -> None:
        wgs = {"wgtest0": FakeWireGuard(_interface(time.time())), "wgtest1": FakeWireGuard(other)}
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        where = Endpoint(ipaddress.ip_address("127.0.0.1"), sock.getsockname()[1])
        config = AgentConfig(where, (noise.public_key(GATEWAY),), ("wgtest0", "wgtest1"))
        agent = Agent(config, opener=lambda name: wgs[name])
        task = asyncio.create_task(agent.run(sock))
        link = AgentLink(GATEWAY, _stamps())

        async def epochs() -> tuple[int, int]:
            first = await link.poll(where, SERVER_PUB, 0)
            second = await link.poll(where, server2_pub, 0)
            assert first is not None and second is not None
            return first[0].epoch, second[0].epoch

        try:
            for _ in range(100):
                if len(agent._identities) == 2:
                    break
                await asyncio.sleep(0.01)
            assert await epochs() == (0, 0)  # nothing recorded yet
            target = msg.Target(CLIENT, Endpoint(ipaddress.ip_address("198.51.100.9"), 41000))
            replies = await link.activate(where, SERVER_PUB, 5, (target,))
            assert [r.epoch if r else None for r in replies] == [5]
            assert await epochs() == (5, 0)  # per interface
            # an empty activation only records; a lower epoch is answered, not kept
            replies = await link.activate(where, SERVER_PUB, 3, ())
            assert replies == [msg.Activated(3, 0, 0, 0, 0)]
            assert await epochs() == (5, 0)
            replies = await link.activate(where, SERVER_PUB, 9, ())
            assert replies == [msg.Activated(9, 0, 0, 0, 0)]
            assert await epochs() == (9, 0)
            assert len(wgs["wgtest0"].activations) == 1  # the empty ones never reach WireGuard
            await link.activate(where, server2_pub, 2, ())
            assert await epochs() == (9, 2)
            assert wgs["wgtest1"].activations == []
            # "still at this version": the page without peers carries the epoch too
            first = await link.poll(where, SERVER_PUB, 0)
            assert first is not None
            again = await link.poll(where, SERVER_PUB, first[0].version)
            assert again is not None and again[0].peers == () and again[0].epoch == 9
        finally:
            agent.stopping.set()
            await task

    asyncio.run(main())


def test_a_repeated_activation_is_answered_without_bringing_the_clients_over_again() -> None:
    """The gateway asks again when its answer is late; a second remove, re-add
    and kick would wipe the first handshake and the client would drop the
    second initiation as a flood: a five-second outage."""

    async def main() -> None:
        wg = FakeWireGuard(_interface(time.time()))
        async with _agent(wg) as (_, where):
            link = AgentLink(GATEWAY, _stamps())
            target = msg.Target(CLIENT, Endpoint(ipaddress.ip_address("198.51.100.9"), 41000))
            page = msg.paginate_activate(7, (target,))[0]
            first, second = await asyncio.gather(
                link.exchange(where, SERVER_PUB, page, msg.Activated),
                link.exchange(where, SERVER_PUB, page, msg.Activated),
            )
            again = await link.exchange(where, SERVER_PUB, page, msg.Activated)
            assert first is not None and first == second == again
            assert first.initiated == 1
            assert len(wg.activations) == 1
            # another epoch is another activation
            await link.activate(where, SERVER_PUB, 8, (target,))
            assert len(wg.activations) == 2

    asyncio.run(main())


def test_every_exchange_with_an_agent_uses_one_socket() -> None:
    """One conntrack entry per agent on the gateway, not one per poll."""

    async def main() -> None:
        wg = FakeWireGuard(_interface(time.time()))
        async with _agent(wg) as (_, where):
            link = AgentLink(GATEWAY, _stamps())
            ports = set()
            for _ in range(3):
                assert await link.poll(where, SERVER_PUB, 0) is not None
                channel = link._channels[where]
                assert channel.transport is not None
                ports.add(channel.transport.get_extra_info("sockname")[1])
            assert len(ports) == 1 and list(link._channels) == [where]
            link.retain(())
            assert link._channels == {}
            assert await link.poll(where, SERVER_PUB, 0) is not None  # a new one when needed
            link.close()

    asyncio.run(main())
