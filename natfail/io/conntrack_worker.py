"""Conntrack for the asyncio daemon: every call in one dedicated thread.

pyroute2's synchronous sockets drive an asyncio loop of their own and refuse
to run inside the daemon's loop; a single worker thread also keeps each
netlink socket in the thread that made it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from natfail.config import Endpoint
from natfail.io.conntrack import CleanupResult, Conntrack, PublicFlows


class AsyncConntrack(Protocol):
    async def remove_backend(self, mark: int, address: Endpoint) -> CleanupResult: ...

    async def remove_unnated(self, public: Endpoint) -> int: ...

    async def public_flows(self, publics: Iterable[Endpoint]) -> dict[Endpoint, PublicFlows]: ...


class ConntrackWorker:
    def __init__(self, factory: Callable[[], Conntrack]) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="natfail-conntrack")
        self._conntrack = self._pool.submit(factory).result()

    async def remove_backend(self, mark: int, address: Endpoint) -> CleanupResult:
        future = self._pool.submit(self._conntrack.remove_backend, mark, address)
        return await asyncio.wrap_future(future)

    async def remove_unnated(self, public: Endpoint) -> int:
        future = self._pool.submit(self._conntrack.remove_unnated, public)
        return await asyncio.wrap_future(future)

    async def public_flows(self, publics: Iterable[Endpoint]) -> dict[Endpoint, PublicFlows]:
        future = self._pool.submit(self._conntrack.public_flows, list(publics))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        close = getattr(self._conntrack, "close", None)
        if close is not None:
            self._pool.submit(close).result()
        self._pool.shutdown()
