"""The UDP probe transport against the test responder on loopback: real
sockets, no namespaces. The real WireGuard process is tested in
tests/netns/test_probe.py."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import itertools
import os
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natfail.config import Endpoint
from natfail.core import noise, tai64n
from natfail.io import probe_transport as pt
from natfail.io.timestamps import TimestampClock
from tests.unit.wg_responder import MAC, Rejected, Responder, forge_cookie_reply

Reply = Callable[[bytes, bytes], list[bytes]]


def _source(addr: tuple[str | int, ...]) -> bytes:
    """What WireGuard binds a cookie to: the sender's address and port."""
    return socket.inet_aton(str(addr[0])) + int(addr[1]).to_bytes(2, "big")


class _Server(asyncio.DatagramProtocol):
    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.transport: asyncio.DatagramTransport | None = None
        self.arrivals: list[float] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.arrivals.append(time.monotonic())
        assert self.transport is not None
        for out in self.reply(data, _source(addr)):
            self.transport.sendto(out, addr)


async def _serve(reply: Reply) -> tuple[asyncio.DatagramTransport, _Server, Endpoint]:
    loop = asyncio.get_running_loop()
    transport, server = await loop.create_datagram_endpoint(
        lambda: _Server(reply), local_addr=("127.0.0.1", 0)
    )
    port = transport.get_extra_info("sockname")[1]
    return transport, server, Endpoint(ipaddress.ip_address("127.0.0.1"), port)


def _setup(tmp_path: Path) -> tuple[Responder, noise.Keys, pt.UdpProbeTransport]:
    responder = Responder(os.urandom(32))
    probe_private = os.urandom(32)
    keys = noise.Keys(probe_private, responder.public_key)
    responder.add_peer(keys.public_key)
    transport = pt.UdpProbeTransport(TimestampClock(tmp_path / "ts"))
    return responder, keys, transport


def _answer(responder: Responder) -> Reply:
    def reply(data: bytes, source: bytes) -> list[bytes]:
        try:
            return [responder.respond(data, source)]
        except Rejected:
            return []

    return reply


def test_live_responder_is_up(tmp_path: Path) -> None:
    async def main() -> None:
        responder, keys, transport = _setup(tmp_path)
        server, _, target = await _serve(_answer(responder))
        try:
            result = await transport.probe(keys, target, 2.0)
        finally:
            server.close()
        assert result.up and result.reason == pt.UP
        assert result.rtt is not None and 0 < result.rtt < 2.0
        assert result.invalid_replies == 0

    asyncio.run(main())


def test_nothing_listening_is_port_unreachable(tmp_path: Path) -> None:
    async def main() -> None:
        _, keys, transport = _setup(tmp_path)
        server, _, target = await _serve(lambda data, source: [])
        server.close()  # the port is closed now: the kernel answers ICMP
        await asyncio.sleep(0.01)
        # The ICMP error quotes our initiation, so it counts; but only at the
        # timeout, since a valid response would still win over it.
        result = await transport.probe(keys, target, 0.3)
        assert not result.up and result.reason == pt.UNREACHABLE
        assert result.invalid_replies == 0 and not result.local

    asyncio.run(main())


def test_silence_is_timeout_and_garbage_is_invalid(tmp_path: Path) -> None:
    async def main() -> None:
        _, keys, transport = _setup(tmp_path)
        server, _, target = await _serve(lambda data, source: [])
        garbage_server, _, garbage_target = await _serve(
            lambda data, source: [b"\x02" + bytes(91), os.urandom(64), b"x"]
        )
        try:
            silent = await transport.probe(keys, target, 0.2)
            garbage = await transport.probe(keys, garbage_target, 0.2)
        finally:
            server.close()
            garbage_server.close()
        assert not silent.up and silent.reason == pt.TIMEOUT
        assert not garbage.up and garbage.reason == pt.INVALID
        assert garbage.invalid_replies == 3

    asyncio.run(main())


def test_forged_reply_before_the_real_one_is_counted_not_fatal(tmp_path: Path) -> None:
    async def main() -> None:
        responder, keys, transport = _setup(tmp_path)
        impostor = Responder(os.urandom(32))

        def reply(data: bytes, source: bytes) -> list[bytes]:
            forged = impostor.create_response(
                impostor.consume_initiation(data, impostor=keys.public_key)
            )
            return [forged, responder.respond(data, source)]

        server, _, target = await _serve(reply)
        try:
            result = await transport.probe(keys, target, 2.0)
        finally:
            server.close()
        assert result.up and result.invalid_replies == 1

    asyncio.run(main())


class _RecordingSocket(socket.socket):
    """A real UDP socket that notes when each datagram left, and can fail
    its first sends with given errnos (the boundary where errors arise)."""

    def __init__(self, family: int, fail: list[int]) -> None:
        super().__init__(family, socket.SOCK_DGRAM)
        self.fail = fail
        self.sends: list[float] = []

    def send(self, data: Any, flags: int = 0) -> int:
        if self.fail:
            number = self.fail.pop(0)
            raise OSError(number, os.strerror(number))
        self.sends.append(time.monotonic())
        return super().send(data, flags)


def _recording_opener(
    opened: list[_RecordingSocket], fail: list[int] | None = None
) -> Callable[[Endpoint, tuple[Any, ...] | None], socket.socket]:
    def open_socket(target: Endpoint, local: tuple[Any, ...] | None) -> socket.socket:
        sock = _RecordingSocket(socket.AF_INET, list(fail or []))
        sock.setblocking(False)
        if local is not None:
            sock.bind(local)
        sock.connect(target.sockaddr())
        opened.append(sock)
        return sock

    return open_socket


def test_cookie_reply_is_answered_with_mac2_at_once(tmp_path: Path) -> None:
    """Under load: a cookie reply, then at once (MIN_INITIATION_GAP after the first) a
    second initiation with mac2 from the same port, and its response."""

    async def main() -> None:
        responder, keys, _ = _setup(tmp_path)
        responder.under_load = True
        opened: list[_RecordingSocket] = []
        transport = pt.UdpProbeTransport(
            TimestampClock(tmp_path / "ts"), open_socket=_recording_opener(opened)
        )
        sources: list[bytes] = []

        def reply(data: bytes, source: bytes) -> list[bytes]:
            sources.append(source)
            return _answer(responder)(data, source)

        server, _, target = await _serve(reply)
        try:
            first = await transport.probe(keys, target, 2.0)
            second = await transport.probe(keys, target, 2.0)
        finally:
            server.close()
        # The responder answers a full response only when mac2 is valid.
        assert first.up and first.reason == pt.UNDER_LOAD, first
        assert len(opened) == 1 and len(opened[0].sends) == 3 and len(set(sources)) == 1
        assert opened[0].sends[1] - opened[0].sends[0] >= pt.MIN_INITIATION_GAP
        assert first.rtt is not None and first.rtt < 2.0
        # The next probe leaves from the same socket (the cookie's port) with
        # mac2 right away.
        assert second.up and second.reason == pt.UP

    asyncio.run(main())


def test_cookie_only_answers_are_a_failure(tmp_path: Path) -> None:
    """A fake backend that knows only the server's public key can answer
    every initiation with a valid cookie reply: that is not up."""

    async def main() -> None:
        responder, keys, _ = _setup(tmp_path)
        opened: list[_RecordingSocket] = []
        transport = pt.UdpProbeTransport(
            TimestampClock(tmp_path / "ts"), open_socket=_recording_opener(opened)
        )
        cookie = os.urandom(16)
        seen: list[bytes] = []

        def reply(data: bytes, source: bytes) -> list[bytes]:
            seen.append(data)
            # Only to check the timestamps grow: the responder raises on a replay.
            responder.consume_initiation(data, source)
            return [forge_cookie_reply(keys.server_public_key, data, cookie)]

        server, _, target = await _serve(reply)
        try:
            result = await transport.probe(keys, target, 1.0)
        finally:
            server.close()
        assert not result.up and result.reason == pt.COOKIE_ONLY, result
        assert not result.local and result.invalid_replies == 0
        # The first initiation without mac2, then each answer with the cookie.
        assert len(seen) == 1 + pt.MAX_COOKIE_ANSWERS
        assert seen[0][132:] == bytes(16)
        for later in seen[1:]:
            assert later[132:] == MAC(cookie, later[:132])
        sends = opened[0].sends
        assert all(b - a >= pt.MIN_INITIATION_GAP for a, b in itertools.pairwise(sends))

    asyncio.run(main())


@pytest.mark.parametrize(
    "number", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EACCES, errno.EPERM]
)
def test_our_own_socket_errors_are_local(tmp_path: Path, number: int) -> None:
    async def main() -> None:
        _, keys, _ = _setup(tmp_path)

        def failing(target: Endpoint, local: tuple[Any, ...] | None) -> socket.socket:
            raise OSError(number, os.strerror(number))

        transport = pt.UdpProbeTransport(TimestampClock(tmp_path / "ts"), open_socket=failing)
        target = Endpoint(ipaddress.ip_address("127.0.0.1"), 9)
        result = await transport.probe(keys, target, 0.5)
        assert not result.up and result.local and result.reason == pt.LOCAL_ERROR, result
        assert result.detail == os.strerror(number)
        assert result.sent_at is None

    asyncio.run(main())


@pytest.mark.parametrize("number", [errno.EPERM, errno.ENOBUFS, errno.EAGAIN, errno.EACCES])
def test_a_send_our_host_refuses_is_local(tmp_path: Path, number: int) -> None:
    """EPERM is what a local firewall's drop on output returns: still not
    the backend's fault."""

    async def main() -> None:
        responder, keys, _ = _setup(tmp_path)
        opened: list[_RecordingSocket] = []
        server, _, target = await _serve(_answer(responder))
        transport = pt.UdpProbeTransport(
            TimestampClock(tmp_path / "ts"), open_socket=_recording_opener(opened, [number])
        )
        try:
            result = await transport.probe(keys, target, 0.5)
        finally:
            server.close()
        assert not result.up and result.local and result.reason == pt.LOCAL_ERROR, result
        assert opened[0].sends == []

    asyncio.run(main())


def test_a_pending_icmp_error_does_not_fail_the_send(tmp_path: Path) -> None:
    """An earlier ICMP error fails the next send once with ECONNREFUSED:
    the initiation is sent again and its response counts."""

    async def main() -> None:
        responder, keys, _ = _setup(tmp_path)
        opened: list[_RecordingSocket] = []
        server, _, target = await _serve(_answer(responder))
        transport = pt.UdpProbeTransport(
            TimestampClock(tmp_path / "ts"),
            open_socket=_recording_opener(opened, [errno.ECONNREFUSED]),
        )
        try:
            result = await transport.probe(keys, target, 2.0)
        finally:
            server.close()
        assert result.up and result.reason == pt.UP, result

    asyncio.run(main())


def test_a_route_error_is_not_local(tmp_path: Path) -> None:
    async def main() -> None:
        _, keys, _ = _setup(tmp_path)

        def no_route(target: Endpoint, local: tuple[Any, ...] | None) -> socket.socket:
            raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))

        transport = pt.UdpProbeTransport(TimestampClock(tmp_path / "ts"), open_socket=no_route)
        result = await transport.probe(keys, Endpoint(ipaddress.ip_address("127.0.0.1"), 9), 0.5)
        assert not result.up and not result.local and result.reason == pt.NO_ROUTE

    asyncio.run(main())


_EMFILE_SCRIPT = """
import asyncio, ipaddress, os, resource, sys
from natfail.config import Endpoint
from natfail.core import noise
from natfail.io import probe_transport as pt
from natfail.io.timestamps import TimestampClock

keys = noise.Keys(os.urandom(32), noise.public_key(os.urandom(32)))
transport = pt.UdpProbeTransport(TimestampClock(None))

async def main() -> None:
    # Every descriptor up to the limit taken, as a connection flood would.
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    held = []
    while True:
        try:
            held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError:
            break
    result = await transport.probe(keys, Endpoint(ipaddress.ip_address("127.0.0.1"), 9), 0.2)
    print(result.reason, result.local, result.detail)

asyncio.run(main())
"""


def test_real_emfile_is_local() -> None:
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _EMFILE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "local-error True Too many open files", proc.stdout


def test_initiations_to_one_backend_are_20ms_apart(tmp_path: Path) -> None:
    async def main() -> None:
        responder, keys, transport = _setup(tmp_path)
        server, state, target = await _serve(_answer(responder))
        try:
            results = await asyncio.gather(*(transport.probe(keys, target, 2.0) for _ in range(4)))
        finally:
            server.close()
        # The responder refuses a timestamp that is not newer than the last
        # one, so all four up also proves they left in timestamp order.
        assert all(r.up for r in results) and len(state.arrivals) == 4
        sent = sorted(r.sent_at for r in results if r.sent_at is not None)
        gaps = [b - a for a, b in itertools.pairwise(sent)]
        # The gap is kept between the transport's own send times, so it
        # holds exactly, however late the event loop runs.
        assert len(gaps) == 3 and min(gaps) >= pt.MIN_INITIATION_GAP, gaps
        # They took turns on the backend's one socket.
        assert transport.sockets == 1

    asyncio.run(main())


def test_restart_with_clock_stepped_back_is_still_accepted(tmp_path: Path) -> None:
    async def main() -> None:
        responder, keys, transport = _setup(tmp_path)
        server, _, target = await _serve(_answer(responder))
        try:
            assert (await transport.probe(keys, target, 2.0)).up
            # a new process whose wall clock is an hour behind
            behind = TimestampClock(tmp_path / "ts", wall_ns=lambda: time.time_ns() - 3600 * 10**9)
            restarted = pt.UdpProbeTransport(behind)
            assert (await restarted.probe(keys, target, 2.0)).up
            # without the state file the responder drops it as a replay
            forgetful = pt.UdpProbeTransport(
                TimestampClock(None, wall_ns=lambda: time.time_ns() - 3600 * 10**9)
            )
            lost = await forgetful.probe(keys, target, 0.3)
        finally:
            server.close()
        assert not lost.up and lost.reason == pt.TIMEOUT

    asyncio.run(main())


@pytest.mark.parametrize("content", [b"", b"short", bytes(13)])
def test_corrupt_timestamp_file_starts_from_the_clock(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ts"
    path.write_bytes(content)
    clock = TimestampClock(path)
    first = clock.next()
    assert clock.next() > first
    assert path.read_bytes() == clock.lease and clock.lease > (clock.last or b"")


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    junk=st.lists(
        st.one_of(
            st.binary(max_size=200),
            # the sizes and first byte of real messages, the rest random
            st.sampled_from([1, 2, 3, 4]).flatmap(
                lambda t: st.sampled_from([32, 64, 92, 148]).flatmap(
                    lambda n: st.binary(min_size=n - 1, max_size=n - 1).map(
                        lambda rest: bytes([t]) + rest
                    )
                )
            ),
        ),
        max_size=5,
    )
)
def test_random_datagrams_are_only_ignored(tmp_path: Path, junk: list[bytes]) -> None:
    """Whatever arrives before the real response is counted and dropped: the
    probe neither fails nor raises, and the real response still counts."""

    async def main() -> None:
        responder, keys, transport = _setup(tmp_path)
        real = _answer(responder)
        server, _, target = await _serve(lambda data, source: [*junk, *real(data, source)])
        try:
            result = await transport.probe(keys, target, 1.0)
        finally:
            server.close()
        assert result.up, result
        assert result.invalid_replies <= len(junk)

    asyncio.run(main())


def test_one_socket_per_backend_for_every_probe(tmp_path: Path) -> None:
    async def main() -> None:
        responder, keys, _ = _setup(tmp_path)
        opened: list[_RecordingSocket] = []
        transport = pt.UdpProbeTransport(
            TimestampClock(tmp_path / "ts"), open_socket=_recording_opener(opened)
        )
        sources: list[bytes] = []

        def reply(data: bytes, source: bytes) -> list[bytes]:
            sources.append(source)
            return _answer(responder)(data, source)

        server, _, target = await _serve(reply)
        other_server, _, other = await _serve(_answer(responder))
        try:
            for _ in range(5):
                assert (await transport.probe(keys, target, 2.0)).up
                assert (await transport.probe(keys, other, 2.0)).up
        finally:
            server.close()
            other_server.close()
        # One socket (one conntrack entry) per backend, always the same port.
        assert len(opened) == 2 and transport.sockets == 2
        assert [len(s.sends) for s in opened] == [5, 5] and len(set(sources)) == 1
        transport.close()
        assert transport.sockets == 0 and all(s.fileno() == -1 for s in opened)

    asyncio.run(main())


def test_a_late_reply_to_an_earlier_probe_counts_for_nobody(tmp_path: Path) -> None:
    """The first probe times out; its response arrives during the second
    probe, on the same socket: dropped, neither up nor invalid for it."""

    async def main() -> None:
        responder, keys, transport = _setup(tmp_path)
        loop = asyncio.get_running_loop()
        server_transport: list[asyncio.DatagramTransport] = []
        late: list[bytes] = []

        def reply(data: bytes, source: bytes) -> list[bytes]:
            answer = _answer(responder)(data, source)
            if not late:
                late.extend(answer)
                # The first answer 0.15 s late, past the first probe's timeout.
                loop.call_later(0.15, lambda: server_transport[0].sendto(late[0], addr[0]))
                return []
            # The second answer after the late one arrived.
            loop.call_later(0.15, lambda: server_transport[0].sendto(answer[0], addr[0]))
            return []

        addr: list[tuple[str, int]] = []

        class Server(_Server):
            def datagram_received(self, data: bytes, source: tuple[str | int, ...]) -> None:
                addr[:] = [(str(source[0]), int(source[1]))]
                super().datagram_received(data, source)

        udp, _ = await loop.create_datagram_endpoint(
            lambda: Server(reply), local_addr=("127.0.0.1", 0)
        )
        server_transport.append(udp)
        target = Endpoint(ipaddress.ip_address("127.0.0.1"), udp.get_extra_info("sockname")[1])
        try:
            first = await transport.probe(keys, target, 0.1)
            second = await transport.probe(keys, target, 1.0)
        finally:
            udp.close()
        assert not first.up and first.reason == pt.TIMEOUT
        assert second.up and second.invalid_replies == 0, second
        assert second.rtt is not None and second.rtt >= 0.15

    asyncio.run(main())


def test_a_late_icmp_error_for_an_earlier_probe_counts_for_nobody() -> None:
    keys = noise.Keys(os.urandom(32), noise.public_key(os.urandom(32)))
    earlier, _ = noise.new_initiation(keys, timestamp=tai64n_now())
    current, handshake = noise.new_initiation(keys, timestamp=tai64n_now())
    recent = deque([earlier[: noise.QUOTE_MIN]], maxlen=pt._RECENT)
    exchange = pt._Exchange(keys, time.monotonic)
    exchange.sent[handshake.sender_index] = pt._Sent(handshake, current, 0.0)
    exchange.icmp_error(errno.ECONNREFUSED, earlier[:64], recent)
    assert exchange.icmp is None and exchange.invalid == 0
    exchange.icmp_error(errno.ECONNREFUSED, os.urandom(64), recent)
    assert exchange.icmp is None and exchange.invalid == 1
    exchange.icmp_error(errno.ECONNREFUSED, current[:64], recent)
    assert exchange.icmp == errno.ECONNREFUSED


def tai64n_now() -> bytes:
    return tai64n.tai64n(time.time_ns())


@pytest.mark.parametrize("number", [errno.EINVAL, errno.EADDRNOTAVAIL, errno.ENOTCONN])
def test_a_broken_socket_is_replaced_at_once(tmp_path: Path, number: int) -> None:
    """The source address a long-lived socket was connected from is gone
    (EINVAL, EADDRNOTAVAIL): a new socket, and the probe goes on."""

    async def main() -> None:
        responder, keys, _ = _setup(tmp_path)
        opened: list[_RecordingSocket] = []
        fails = [[number], []]

        def opener(target: Endpoint, local: tuple[Any, ...] | None) -> socket.socket:
            return _recording_opener(opened, fails.pop(0) if fails else [])(target, local)

        transport = pt.UdpProbeTransport(TimestampClock(tmp_path / "ts"), open_socket=opener)
        server, _, target = await _serve(_answer(responder))
        try:
            result = await transport.probe(keys, target, 2.0)
            again = await transport.probe(keys, target, 2.0)
        finally:
            server.close()
        assert result.up and again.up, result
        assert len(opened) == 2 and opened[0].fileno() == -1 and transport.sockets == 1

    asyncio.run(main())


def test_a_socket_broken_twice_fails_the_probe_and_is_replaced_next_time(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        responder, keys, _ = _setup(tmp_path)
        opened: list[_RecordingSocket] = []
        fails = [[errno.EINVAL], [errno.EINVAL], []]

        def opener(target: Endpoint, local: tuple[Any, ...] | None) -> socket.socket:
            return _recording_opener(opened, fails.pop(0) if fails else [])(target, local)

        transport = pt.UdpProbeTransport(TimestampClock(tmp_path / "ts"), open_socket=opener)
        server, _, target = await _serve(_answer(responder))
        try:
            failed = await transport.probe(keys, target, 2.0)
            assert transport.sockets == 0
            later = await transport.probe(keys, target, 2.0)
        finally:
            server.close()
        assert not failed.up and failed.reason == pt.SEND_ERROR and not failed.local, failed
        assert later.up and len(opened) == 3

    asyncio.run(main())


def test_a_firewall_refusal_keeps_the_socket(tmp_path: Path) -> None:
    async def main() -> None:
        responder, keys, _ = _setup(tmp_path)
        opened: list[_RecordingSocket] = []
        transport = pt.UdpProbeTransport(
            TimestampClock(tmp_path / "ts"), open_socket=_recording_opener(opened, [errno.EPERM])
        )
        server, _, target = await _serve(_answer(responder))
        try:
            refused = await transport.probe(keys, target, 2.0)
            later = await transport.probe(keys, target, 2.0)
        finally:
            server.close()
        assert refused.local and later.up and len(opened) == 1

    asyncio.run(main())


def test_retain_closes_the_sockets_of_backends_no_longer_probed(tmp_path: Path) -> None:
    async def main() -> None:
        responder, keys, _ = _setup(tmp_path)
        opened: list[_RecordingSocket] = []
        transport = pt.UdpProbeTransport(
            TimestampClock(tmp_path / "ts"), open_socket=_recording_opener(opened)
        )
        servers = [await _serve(_answer(responder)) for _ in range(3)]
        silent, _, silent_target = await _serve(lambda data, source: [])
        targets = [t for _, _, t in servers]
        try:
            for target in targets:
                assert (await transport.probe(keys, target, 2.0)).up
            transport.retain(targets[:1])
            assert transport.sockets == 1
            assert [s.fileno() == -1 for s in opened] == [False, True, True]
            # A probe in flight keeps its socket until it is done.
            running = asyncio.ensure_future(transport.probe(keys, silent_target, 0.3))
            await asyncio.sleep(0.05)
            assert len(opened) == 4
            transport.retain(targets[:1])
            assert opened[3].fileno() != -1
            result = await running
            assert result.reason == pt.TIMEOUT and opened[3].fileno() == -1
            assert transport.sockets == 1
            # A backend probed again gets a new socket.
            assert (await transport.probe(keys, targets[1], 2.0)).up
            assert len(opened) == 5 and transport.sockets == 2
        finally:
            for server, _, _ in servers:
                server.close()
            silent.close()
        transport.close()
        assert transport.sockets == 0 and all(s.fileno() == -1 for s in opened)

    asyncio.run(main())


def test_a_probe_waiting_for_a_retired_backend_gets_a_new_socket(tmp_path: Path) -> None:
    async def main() -> None:
        responder, keys, _ = _setup(tmp_path)
        opened: list[_RecordingSocket] = []
        transport = pt.UdpProbeTransport(
            TimestampClock(tmp_path / "ts"), open_socket=_recording_opener(opened)
        )
        server, _, target = await _serve(_answer(responder))
        try:
            first = asyncio.ensure_future(transport.probe(keys, target, 2.0))
            second = asyncio.ensure_future(transport.probe(keys, target, 2.0))
            await asyncio.sleep(0)
            transport.retain([])
            results = await asyncio.gather(first, second)
        finally:
            server.close()
        assert all(r.up for r in results)
        # The retired socket is closed; the waiting probe used a new one,
        # which the transport holds (and closes).
        assert len(opened) == 2 and opened[0].fileno() == -1 and transport.sockets == 1
        transport.close()
        assert opened[1].fileno() == -1

    asyncio.run(main())


def test_datagrams_between_probes_are_dropped(tmp_path: Path) -> None:
    """The reader stays registered between probes: what arrives then is
    read and dropped, and counts for no probe."""

    async def main() -> None:
        responder, keys, transport = _setup(tmp_path)
        loop = asyncio.get_running_loop()
        holder: list[asyncio.DatagramTransport] = []

        def reply(data: bytes, source: bytes) -> list[bytes]:
            out = _answer(responder)(data, source)
            addr = holder_addr[0]
            for _ in range(3):
                loop.call_later(0.05, lambda: holder[0].sendto(os.urandom(92), addr))
            return out

        holder_addr: list[tuple[str, int]] = []

        class Server(_Server):
            def datagram_received(self, data: bytes, source: tuple[str | int, ...]) -> None:
                holder_addr[:] = [(str(source[0]), int(source[1]))]
                super().datagram_received(data, source)

        udp, _ = await loop.create_datagram_endpoint(
            lambda: Server(reply), local_addr=("127.0.0.1", 0)
        )
        holder.append(udp)
        target = Endpoint(ipaddress.ip_address("127.0.0.1"), udp.get_extra_info("sockname")[1])
        try:
            assert (await transport.probe(keys, target, 1.0)).up
            await asyncio.sleep(0.15)
            result = await transport.probe(keys, target, 1.0)
        finally:
            udp.close()
        assert result.up and result.invalid_replies == 0, result

    asyncio.run(main())
