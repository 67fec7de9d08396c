"""The gateway's end of the agent channel: one request, one reply, over UDP.

Each exchange is a one-shot Noise IK handshake (:mod:`natfail.core.agent_channel`)
from the gateway's probe key to the interface key the agent serves (the
service's ``server_public_key``). The agent takes a request only if its
timestamp is newer than the last one it took from this gateway for that
interface, so exchanges with one (agent, interface) go one at a time, each
with a new stamp from the gateway's own never-decreasing clock. An agent that
does not answer in ``timeout`` is asked again, ``attempts`` times in all;
then the exchange yields None (a down agent costs speed, never a failover).

Every exchange with one agent goes through one long-lived connected UDP
socket: one conntrack entry per agent on the gateway, not one per poll. A
reply is matched to the request it answers by the channel's own check
(bound to the request's ephemeral key), so a late answer to an abandoned
attempt is dropped."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TypeVar, cast

from natfail.core import agent_channel as ch
from natfail.core import agent_messages as msg
from natfail.core.model import Endpoint

TIMEOUT = 0.5
ATTEMPTS = 2
ACTIVATE_TIMEOUT = 1.0
"""An activation waits for the backend's WireGuard (about 0.15 ms a client on
wireguard-go); the agent answers a repeat of the same page without doing it
again."""
ACTIVATE_ATTEMPTS = 3

_Reply = TypeVar("_Reply", msg.Report, msg.Activated)


class _Channel(asyncio.DatagramProtocol):
    """The socket to one agent, and the requests waiting for its replies."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: list[tuple[ch.Pending, asyncio.Future[bytes]]] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        for pending, done in self.waiting:
            if done.done():
                continue
            payload = ch.open_reply(pending, data)
            if isinstance(payload, bytes):
                done.set_result(payload)
                return

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error: the timeout decides; anyone can forge one

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


class AgentLink:
    def __init__(self, private_key: bytes, timestamp: Callable[[], bytes]) -> None:
        self._private_key = private_key
        self._timestamp = timestamp
        self._locks: dict[tuple[Endpoint, bytes], asyncio.Lock] = {}
        self._channels: dict[Endpoint, _Channel] = {}

    async def _channel(self, agent: Endpoint) -> _Channel:
        channel = self._channels.get(agent)
        if channel is None or channel.closed or channel.transport is None:
            loop = asyncio.get_running_loop()
            _, channel = await loop.create_datagram_endpoint(_Channel, remote_addr=agent.sockaddr())
            self._channels[agent] = channel
        return channel

    def retain(self, agents: Iterable[Endpoint]) -> None:
        """Closes the sockets of agents no longer in ``agents`` (after a reload)."""
        keep = set(agents)
        for agent in [a for a in self._channels if a not in keep]:
            channel = self._channels.pop(agent)
            if channel.transport is not None:
                channel.transport.close()

    def close(self) -> None:
        self.retain(())

    async def _once(
        self, agent: Endpoint, agent_public: bytes, payload: bytes, timeout: float
    ) -> bytes | None:
        loop = asyncio.get_running_loop()
        datagram, pending = ch.new_request(
            self._private_key, agent_public, payload, self._timestamp()
        )
        done: asyncio.Future[bytes] = loop.create_future()
        channel = await self._channel(agent)
        assert channel.transport is not None
        entry = (pending, done)
        channel.waiting.append(entry)
        try:
            channel.transport.sendto(datagram)
            return await asyncio.wait_for(done, timeout)
        except TimeoutError:
            return None
        finally:
            channel.waiting.remove(entry)

    async def exchange(
        self,
        agent: Endpoint,
        agent_public: bytes,
        request: msg.Poll | msg.Activate,
        expect: type[_Reply],
        *,
        timeout: float = TIMEOUT,
        attempts: int = ATTEMPTS,
    ) -> _Reply | None:
        """The agent's reply of type ``expect``, or None when none came."""
        payload = msg.encode(request)
        lock = self._locks.setdefault((agent, agent_public), asyncio.Lock())
        async with lock:
            for _ in range(attempts):
                try:
                    raw = await self._once(agent, agent_public, payload, timeout)
                except OSError:
                    raw = None
                if raw is None:
                    continue
                reply = msg.decode_reply(raw)
                if isinstance(reply, expect):
                    return reply
            return None

    async def poll(
        self, agent: Endpoint, agent_public: bytes, version: int, *, timeout: float = TIMEOUT
    ) -> list[msg.Report] | None:
        """Every page of the agent's report (none beyond the first when its
        version is ``version``), or None when the agent did not answer."""
        first = await self.exchange(
            agent, agent_public, msg.Poll(version, 0), msg.Report, timeout=timeout
        )
        if first is None:
            return None
        pages = [first]
        for page in range(1, first.pages):
            more = await self.exchange(
                agent, agent_public, msg.Poll(version, page), msg.Report, timeout=timeout
            )
            if more is None or more.version != first.version:
                return None  # changed meanwhile: the next poll reads it whole
            pages.append(more)
        return pages

    async def activate(
        self, agent: Endpoint, agent_public: bytes, epoch: int, targets: tuple[msg.Target, ...]
    ) -> list[msg.Activated | None]:
        """Sends every page of an activation; one reply (or None) per page."""
        out: list[msg.Activated | None] = []
        for page in msg.paginate_activate(epoch, targets):
            out.append(
                await self.exchange(
                    agent,
                    agent_public,
                    page,
                    msg.Activated,
                    timeout=ACTIVATE_TIMEOUT,
                    attempts=ACTIVATE_ATTEMPTS,
                )
            )
        return out
