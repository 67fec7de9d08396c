"""The gateway's own addresses, watched through netlink: in a pair, a gateway
decides a service only while it holds the service's public address, which
keepalived moves. Watching the addresses themselves (not keepalived's notify
scripts) makes the order of keepalived's notifications irrelevant.

A raw ``NETLINK_ROUTE`` socket subscribed to the address groups says *that*
something changed (its messages are not parsed); pyroute2 then lists the
addresses. A burst of changes (keepalived adds several VIPs at once) is
read as one."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Final, Protocol

from pyroute2 import IPRoute

log = logging.getLogger("natfail")

Addresses = frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]

_RTMGRP_IPV4_IFADDR: Final = 0x10
_RTMGRP_IPV6_IFADDR: Final = 0x100
SETTLE: Final = 0.02
"""Seconds to wait after a change for the rest of its burst."""


class AddressWatch(Protocol):
    def current(self) -> Addresses: ...

    def start(self, changed: Callable[[Addresses], None]) -> None: ...

    def close(self) -> None: ...


def list_addresses() -> Addresses:
    """Every address on this namespace's interfaces, IPv4 and IPv6."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    with IPRoute() as ipr:
        for message in ipr.get_addr():
            text = message.get_attr("IFA_ADDRESS") or message.get_attr("IFA_LOCAL")
            if text is None:
                continue
            with contextlib.suppress(ValueError):
                found.add(ipaddress.ip_address(str(text).split("%")[0]))
    return frozenset(found)


class NetlinkAddressWatch:
    """:class:`AddressWatch` over netlink, in the caller's network namespace."""

    def __init__(self, lister: Callable[[], Addresses] = list_addresses) -> None:
        self._list = lister
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def current(self) -> Addresses:
        """Lists them now; blocking, and not on a running event loop's thread."""
        return self._list()

    def start(self, changed: Callable[[Addresses], None]) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        sock.bind((0, _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR))
        sock.setblocking(False)
        self._sock = sock
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._readable)
        self._task = loop.create_task(self._run(changed))

    def _readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                if not self._sock.recv(65536):
                    break
            except BlockingIOError:
                break
            except OSError as exc:  # ENOBUFS: events were lost; a listing tells all
                log.debug("address watch: %s", exc)
                break
        self._wake.set()

    async def _run(self, changed: Callable[[Addresses], None]) -> None:
        # pyroute2's IPRoute runs an event loop of its own: never on ours.
        last = await asyncio.to_thread(self._list)
        while True:
            await self._wake.wait()
            await asyncio.sleep(SETTLE)
            self._wake.clear()
            try:
                now = await asyncio.to_thread(self._list)
            except Exception as exc:  # the next change lists again
                log.error("cannot list this gateway's addresses: %s", exc)
                continue
            if now != last:
                last = now
                changed(now)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._task is not None:
            self._task.cancel()
            self._task = None


class FixedAddresses:
    """An in-memory :class:`AddressWatch` for unit tests: ``set`` changes it."""

    def __init__(self, addresses: Addresses = frozenset()) -> None:
        self._addresses = addresses
        self._changed: Callable[[Addresses], None] | None = None

    def current(self) -> Addresses:
        return self._addresses

    def start(self, changed: Callable[[Addresses], None]) -> None:
        self._changed = changed

    def set(self, addresses: Addresses) -> None:
        self._addresses = addresses
        if self._changed is not None:
            self._changed(addresses)

    def close(self) -> None:
        self._changed = None
