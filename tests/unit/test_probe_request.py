"""The daemon's side of `natfailctl probe` (natfail.io.probe_request) with a
fake transport, and natfailctl probe against it over a real control socket:
the daemon's clock, not natfailctl's, stamps the probe."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import math
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import pytest

from natfail import commands, exitcodes
from natfail.config import Endpoint
from natfail.core import noise
from natfail.io import probe_request as pr
from natfail.io import probe_transport as pt
from natfail.io.control import ControlServer, Peer, RequestError
from natfail.io.timestamps import STATE_FILE, TimestampClock
from tests.unit.wg_responder import Rejected, Responder

REPO = Path(__file__).resolve().parents[2]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class FakeTransport:
    def __init__(self, result: pt.ProbeResult | None = None) -> None:
        self.calls: list[tuple[noise.Keys, Endpoint, float]] = []
        self.retained: list[set[Endpoint]] = []
        self.result = result or pt.ProbeResult(True, pt.UP, 0.0012, 1)

    async def probe(self, keys: noise.Keys, target: Endpoint, timeout: float) -> pt.ProbeResult:
        self.calls.append((keys, target, timeout))
        return self.result

    def retain(self, targets: Iterable[Endpoint]) -> None:
        self.retained.append(set(targets))

    def close(self) -> None:
        pass


PROBE_A, PROBE_B = os.urandom(32), os.urandom(32)
SERVER_A, SERVER_B = noise.public_key(os.urandom(32)), noise.public_key(os.urandom(32))
PSK_A = os.urandom(32)
HELD = [
    ("wg0", noise.Keys(PROBE_A, SERVER_A, PSK_A)),
    ("wg1", noise.Keys(PROBE_B, SERVER_B)),
]
KEYS_FOR = pr.held_keys(lambda: HELD)
BACKEND = Endpoint(ipaddress.ip_address("10.0.0.2"), 51820)


def request(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "command": commands.PROBE,
        "target": "10.0.0.2:51820",
        "server_public_key": b64(SERVER_A),
        "probe_public_key": b64(HELD[0][1].public_key),
        "timeout": 0.5,
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def run(req: dict[str, Any], transport: FakeTransport | None = None, **kw: Any) -> dict[str, Any]:
    return asyncio.run(pr.run_probe_request(req, transport or FakeTransport(), KEYS_FOR, **kw))


def test_a_probe_with_the_daemons_key() -> None:
    transport = FakeTransport()
    reply = run(request(preshared_key=b64(PSK_A)), transport)
    assert reply == {
        "held": True,
        "result": {
            "up": True,
            "reason": "ok",
            "rtt_ms": pytest.approx(1.2),
            "invalid_replies": 1,
            "detail": "",
            "local": False,
        },
    }
    [(keys, target, timeout)] = transport.calls
    assert keys == noise.Keys(PROBE_A, SERVER_A, PSK_A)
    assert target == BACKEND and timeout == 0.5


def test_without_a_preshared_key_none_is_used() -> None:
    transport = FakeTransport()
    run(request(), transport)
    assert transport.calls[0][0] == noise.Keys(PROBE_A, SERVER_A)


def test_a_key_the_daemon_does_not_hold_is_not_probed() -> None:
    transport = FakeTransport()
    reply = run(request(probe_public_key=b64(noise.public_key(os.urandom(32)))), transport)
    assert reply == {"held": False} and transport.calls == []


def test_a_service_gives_its_own_keys() -> None:
    transport = FakeTransport()
    run(request(service="wg0", server_public_key=None, probe_public_key=None), transport)
    assert transport.calls[0][0] == HELD[0][1]
    # Its probe key with another server key: no preshared key of the service.
    run(request(service="wg0", server_public_key=b64(SERVER_B)), transport)
    assert transport.calls[1][0] == noise.Keys(PROBE_A, SERVER_B)


def test_a_down_result_is_carried_over() -> None:
    down = pt.ProbeResult(False, pt.LOCAL_ERROR, detail="No buffer space available", local=True)
    reply = run(request(), FakeTransport(down))
    assert reply["result"] == {
        "up": False,
        "reason": "local-error",
        "rtt_ms": None,
        "invalid_replies": 0,
        "detail": "No buffer space available",
        "local": True,
    }


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"target": None}, "'target' must be a string"),
        ({"target": 5}, "'target' must be a string"),
        ({"target": "example.com:51820"}, "example.com"),
        ({"target": "10.0.0.2"}, "10.0.0.2"),
        ({"server_public_key": "short"}, "server_public_key"),
        ({"server_public_key": None}, "'server_public_key' or 'service' is required"),
        ({"probe_public_key": 7}, "'probe_public_key' must be a string"),
        ({"preshared_key": b64(bytes(31))}, "preshared_key"),
        ({"timeout": None}, "'timeout' must be a number"),
        ({"timeout": "1"}, "'timeout' must be a number"),
        ({"timeout": True}, "'timeout' must be a number"),
        ({"timeout": 0}, "above 0"),
        ({"timeout": -1.0}, "above 0"),
        ({"timeout": math.nan}, "above 0"),
        ({"timeout": math.inf}, "above 0"),
        ({"timeout": pr.MAX_TIMEOUT + 1}, "at most"),
        ({"interval": 1}, "unknown field 'interval'"),
        ({"service": "nope"}, "unknown service 'nope'"),
        ({"service": "wg1"}, "probes with another probe key"),
        ({"server_public_key": b64(bytes(32))}, "low-order"),
    ],
)
def test_bad_requests_are_refused_as_usage(fields: dict[str, Any], words: str) -> None:
    transport = FakeTransport()
    with pytest.raises(RequestError) as caught:
        run(request(**fields), transport)
    assert caught.value.code == exitcodes.USAGE and words in str(caught.value)
    assert "\n" not in str(caught.value) and transport.calls == []


def test_a_probe_of_an_address_no_backend_has_closes_its_socket() -> None:
    transport = FakeTransport()
    run(request(), transport, targets=lambda: [BACKEND])
    assert transport.retained == []
    run(request(target="10.0.0.9:51820"), transport, targets=lambda: [BACKEND])
    assert transport.retained == [{BACKEND}]


# --- natfailctl probe against a control socket -------------------------------


async def _responder_server(
    responder: Responder,
) -> tuple[asyncio.DatagramTransport, Endpoint, list[str]]:
    """The test WireGuard responder on loopback; `outcomes` says "ok" or why
    it refused each initiation (a replayed timestamp among them)."""
    outcomes: list[str] = []

    class Server(asyncio.DatagramProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.DatagramTransport, transport)

        def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
            source = ipaddress.ip_address(str(addr[0])).packed + int(addr[1]).to_bytes(2, "big")
            try:
                self.transport.sendto(responder.respond(data, source), addr)
            except Rejected as exc:
                outcomes.append(f"rejected {exc}")
            else:
                outcomes.append("ok")

    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(Server, local_addr=("127.0.0.1", 0))
    port = udp.get_extra_info("sockname")[1]
    return udp, Endpoint(ipaddress.ip_address("127.0.0.1"), port), outcomes


def _config(tmp_path: Path, key_file: Path, server: bytes) -> Path:
    conf = tmp_path / "natfail.toml"
    conf.write_text(
        f'[daemon]\nsocket = "{tmp_path / "natfail.sock"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[probe]\nprivate_key_file = "{key_file}"\n'
        f'[[service]]\nname = "wg0"\npublic = "203.0.113.10:51820"\n'
        f'server_public_key = "{b64(server)}"\n'
        f'[[service.backend]]\nname = "a"\naddress = "10.0.0.2:51820"\npriority = 1\n'
    )
    (tmp_path / "state").mkdir(exist_ok=True)
    return conf


async def _natfailctl(conf: Path, target: Endpoint, server: bytes) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "natfail.cli.ctl",
        "-c",
        str(conf),
        "probe",
        str(target),
        "--server-key",
        b64(server),
        "--count",
        "2",
        "--interval",
        "0.05",
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon probes for root only")


@needs_root
@pytest.mark.parametrize("daemon_holds_the_key", [True, False])
def test_natfailctl_probe_runs_in_the_daemon_and_leaves_its_stamps_alone(
    tmp_path: Path, daemon_holds_the_key: bool
) -> None:
    """The trap: natfailctl alone would start above the daemon's lease (up
    to LEASE ahead of its stamps), and the backend would then refuse the
    daemon's next probes as replays. Asked to probe, the daemon uses its own
    clock, and its next probe is still accepted."""

    async def main() -> None:
        probe_private = os.urandom(32)
        key_file = tmp_path / "probe.key"
        key_file.write_text(b64(probe_private) + "\n")
        key_file.chmod(0o600)
        responder = Responder(os.urandom(32))
        keys = noise.Keys(probe_private, responder.public_key)
        responder.add_peer(keys.public_key)
        conf = _config(tmp_path, key_file, responder.public_key)
        udp, target, outcomes = await _responder_server(responder)
        # The daemon: its transport, its clock on the state dir's file.
        clock = TimestampClock(tmp_path / "state" / STATE_FILE)
        transport = pt.UdpProbeTransport(clock)
        held = [("wg0", keys if daemon_holds_the_key else noise.Keys(os.urandom(32), SERVER_A))]
        keys_for = pr.held_keys(lambda: held)

        async def handler(req: dict[str, Any], peer: Peer) -> dict[str, Any]:
            assert req["command"] == commands.PROBE
            return await pr.run_probe_request(req, transport, keys_for)

        server = ControlServer(tmp_path / "natfail.sock", handler)
        await server.start()
        try:
            assert (await transport.probe(keys, target, 2.0)).up
            code, out, err = await _natfailctl(conf, target, responder.public_key)
            assert code == 0, out + err
            lines = out.splitlines()
            assert len(lines) == 2 and all(f"{target}: up, rtt " in x for x in lines), out
            after = await transport.probe(keys, target, 1.0)
        finally:
            await server.close()
            transport.close()
            udp.close()
        if daemon_holds_the_key:
            # Every initiation was the daemon's: all accepted, its next too.
            assert after.up, (after, outcomes)
            assert outcomes == ["ok"] * 4
        else:
            # Not the daemon's key, so natfailctl probed alone, from the
            # lease: up for it, and the same key's daemon probe after it
            # is refused. That is why the daemon must run the probe when it
            # holds the key.
            assert not after.up and outcomes[-1].startswith("rejected"), outcomes

    asyncio.run(main())


@needs_root
def test_natfailctl_probe_without_a_daemon_takes_the_lease(tmp_path: Path) -> None:
    async def main() -> None:
        probe_private = os.urandom(32)
        key_file = tmp_path / "probe.key"
        key_file.write_text(b64(probe_private) + "\n")
        key_file.chmod(0o600)
        responder = Responder(os.urandom(32))
        responder.add_peer(noise.public_key(probe_private))
        conf = _config(tmp_path, key_file, responder.public_key)
        udp, target, outcomes = await _responder_server(responder)
        try:
            code, out, err = await _natfailctl(conf, target, responder.public_key)
        finally:
            udp.close()
        assert code == 0 and out.count(": up, rtt ") == 2, out + err
        assert outcomes == ["ok", "ok"]
        assert (tmp_path / "state" / STATE_FILE).stat().st_size == 12

    asyncio.run(main())
