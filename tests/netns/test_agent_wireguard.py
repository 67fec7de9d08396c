"""natfail.agent.wireguard against real wireguard-go: a backend interface and a
client interface in two namespaces joined by a veth.

The client knows the backend as a peer but, unless a test gives it one, not the
backend's endpoint: then it cannot start a handshake at all, and a handshake it
records was started by the backend. The backend knows the client without an
endpoint and with persistent keepalive 0, as a standby that never met it."""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from natfail.agent.wireguard import Interface, Uapi, WgTool, WireGuard
from natfail.core.model import Endpoint
from natfail.lab.processes import ip_batch, ns_argv, run, wait_until
from natfail.lab.wireguard import WgKey, WgProcess, new_key, remove_sockets, write_secret

pytestmark = pytest.mark.netns

BACKEND_IP = "198.18.7.1"
CLIENT_IP = "198.18.7.2"
PORT = 51820
BACKEND_TUNNEL = "10.77.0.1"
CLIENT_TUNNEL = "10.77.0.2"
CLIENT_ENDPOINT = Endpoint.parse(f"{CLIENT_IP}:{PORT}")
DEADLINE = 10.0  # seconds: generous, a handshake takes milliseconds


@dataclass(frozen=True)
class Hosts:
    backend_ns: str
    client_ns: str
    backend_if: str
    client_if: str


@dataclass
class Pair:
    hosts: Hosts
    directory: Path
    backend_key: WgKey
    client_key: WgKey
    psk: bytes | None

    @property
    def backend(self) -> Uapi:
        return Uapi(self.hosts.backend_if)

    @property
    def client(self) -> Uapi:
        return Uapi(self.hosts.client_if)

    def wg(self, *argv: str) -> None:
        # wg finds wireguard-go's socket in /var/run/wireguard from any namespace
        run(["wg", *argv])

    def client_handshake(self) -> float:
        """The client's latest handshake with the backend, in nanosecond resolution."""
        peer = self.client.read().peer(self.backend_key.public)
        assert peer is not None
        return peer.last_handshake

    def give_client_the_backend(self) -> None:
        self.wg("set", self.hosts.client_if, "peer", self.backend_key.public_b64,
                "endpoint", f"{BACKEND_IP}:{PORT}")  # fmt: skip

    def client_pings_backend(self) -> bool:
        done = subprocess.run(
            ns_argv(self.hosts.client_ns, ["ping", "-c", "1", "-W", "1", "-q", BACKEND_TUNNEL]),
            capture_output=True,
            timeout=10,
            check=False,
        )
        return done.returncode == 0

    def backend_pings_client(self) -> bool:
        done = subprocess.run(
            ns_argv(self.hosts.backend_ns, ["ping", "-c", "1", "-W", "1", "-q", CLIENT_TUNNEL]),
            capture_output=True,
            timeout=10,
            check=False,
        )
        return done.returncode == 0


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    tag = secrets.token_hex(3)
    found = Hosts(f"agw{tag}-b", f"agw{tag}-c", f"agw{tag}b", f"agw{tag}c")
    made: list[str] = []
    try:
        for ns in (found.backend_ns, found.client_ns):
            run(["ip", "netns", "add", ns])
            made.append(ns)
        ip_batch(
            found.backend_ns,
            [
                "link set lo up",
                f"link add eth0 type veth peer name eth0 netns {found.client_ns}",
                f"addr add {BACKEND_IP}/24 dev eth0",
                "link set eth0 up",
            ],
        )
        ip_batch(
            found.client_ns,
            ["link set lo up", f"addr add {CLIENT_IP}/24 dev eth0", "link set eth0 up"],
        )
        yield found
    finally:
        for ns in made:
            run(["ip", "netns", "del", ns], check=False)


def _start(ns: str, ifname: str, directory: Path) -> WgProcess:
    proc = WgProcess(ns, ifname, directory / f"{ifname}.log", "error")
    proc.spawn()
    proc.wait_ready()
    return proc


def _make_pair(hosts: Hosts, directory: Path, psk: bytes | None) -> Iterator[Pair]:
    """Fresh wireguard-go processes on both sides: no session, no endpoint."""
    procs: list[WgProcess] = []
    try:
        procs.append(_start(hosts.backend_ns, hosts.backend_if, directory))
        procs.append(_start(hosts.client_ns, hosts.client_if, directory))
        pair = Pair(
            hosts, directory, new_key(directory, "backend"), new_key(directory, "client"), psk
        )
        psk_args: list[str] = []
        if psk is not None:
            write_secret(directory / "psk", base64.b64encode(psk).decode())
            psk_args = ["preshared-key", str(directory / "psk")]
        pair.wg("set", hosts.backend_if, "listen-port", str(PORT),
                "private-key", str(pair.backend_key.file),
                "peer", pair.client_key.public_b64, "allowed-ips", f"{CLIENT_TUNNEL}/32",
                *psk_args)  # fmt: skip
        pair.wg("set", hosts.client_if, "listen-port", str(PORT),
                "private-key", str(pair.client_key.file),
                "peer", pair.backend_key.public_b64, "allowed-ips", f"{BACKEND_TUNNEL}/32",
                *psk_args)  # fmt: skip
        for ns, ifname, address in (
            (hosts.backend_ns, hosts.backend_if, BACKEND_TUNNEL),
            (hosts.client_ns, hosts.client_if, CLIENT_TUNNEL),
        ):
            # no IPv6 link-local: nothing but the test's own packets may enter the tunnel
            commands = [
                f"link set {ifname} addrgenmode none",
                f"addr add {address}/24 dev {ifname}",
            ]
            ip_batch(ns, [*commands, f"link set {ifname} up"])
        yield pair
    finally:
        for proc in procs:
            proc.stop()
        remove_sockets({hosts.backend_if, hosts.client_if})


@pytest.fixture
def pair(hosts: Hosts, tmp_path: Path) -> Iterator[Pair]:
    yield from _make_pair(hosts, tmp_path, None)


@pytest.fixture
def psk_pair(hosts: Hosts, tmp_path: Path) -> Iterator[Pair]:
    yield from _make_pair(hosts, tmp_path, secrets.token_bytes(32))


def _secrets_absent(text: str, *keys: bytes) -> None:
    for key in keys:
        assert key.hex() not in text
        assert base64.b64encode(key).decode() not in text
        assert repr(key) not in text


def _wait_backend_initiated(pair: Pair, before: float = 0.0) -> float:
    seen: list[float] = []

    def advanced() -> bool:
        seen[:] = [pair.client_handshake()]
        return seen[0] > before

    assert wait_until(advanced, DEADLINE, 0.02), "the client saw no new handshake"
    return seen[0]


def test_read_shows_the_peer_and_its_handshake_and_no_secret(psk_pair: Pair) -> None:
    pair = psk_pair
    assert pair.psk is not None
    iface = pair.backend.read()
    assert iface.name == pair.hosts.backend_if
    assert iface.public_key == pair.backend_key.public
    assert iface.private_key == pair.backend_key.private
    assert iface.listen_port == PORT
    (peer,) = iface.peers
    assert peer.public_key == pair.client_key.public
    assert peer.endpoint is None
    assert peer.last_handshake == 0.0
    assert peer.persistent_keepalive == 0
    assert peer.allowed_ips == (f"{CLIENT_TUNNEL}/32",)
    assert peer.preshared_key == pair.psk

    pair.give_client_the_backend()
    assert wait_until(pair.client_pings_backend, DEADLINE, 0.1)

    def met() -> Interface | None:
        now = pair.backend.read()
        return now if now.peers and now.peers[0].last_handshake > 0 else None

    assert wait_until(lambda: met() is not None, DEADLINE, 0.05)
    after = met()
    assert after is not None
    (peer,) = after.peers
    assert peer.endpoint == CLIENT_ENDPOINT
    assert peer.last_handshake > 0
    for shown in (repr(after), repr(peer), str(after), str(peer), repr(after.peers)):
        _secrets_absent(shown, pair.backend_key.private, pair.psk)


def test_activate_makes_a_fresh_backend_initiate(pair: Pair) -> None:
    assert pair.client_handshake() == 0.0
    stranger = secrets.token_bytes(32)
    result = pair.backend.activate(
        [(pair.client_key.public, CLIENT_ENDPOINT), (stranger, CLIENT_ENDPOINT)]
    )
    assert (result.known, result.initiated, result.cleared) == (1, 1, 0)  # kicked in place
    assert result.elapsed > 0
    _wait_backend_initiated(pair)
    # the client learnt the backend's endpoint from the backend's initiation
    seen = pair.client.read().peer(pair.backend_key.public)
    assert seen is not None and seen.endpoint == Endpoint.parse(f"{BACKEND_IP}:{PORT}")
    peer = pair.backend.read().peer(pair.client_key.public)
    assert peer is not None
    assert peer.endpoint == CLIENT_ENDPOINT
    assert peer.persistent_keepalive == 0  # its own value, restored
    assert peer.allowed_ips == (f"{CLIENT_TUNNEL}/32",)
    assert wait_until(pair.backend_pings_client, DEADLINE, 0.1)


@pytest.mark.parametrize("own_keepalive", [0, 7])
def test_activate_clears_a_live_session_and_restores_the_peer(
    psk_pair: Pair, own_keepalive: int
) -> None:
    pair = psk_pair
    if own_keepalive:
        pair.wg("set", pair.hosts.backend_if, "peer", pair.client_key.public_b64,
                "persistent-keepalive", str(own_keepalive))  # fmt: skip
    pair.give_client_the_backend()
    assert wait_until(pair.client_pings_backend, DEADLINE, 0.1)
    backend_before = pair.backend.read().peer(pair.client_key.public)
    assert backend_before is not None and backend_before.last_handshake > 0
    first = pair.client_handshake()
    assert first > 0

    result = pair.backend.activate([(pair.client_key.public, CLIENT_ENDPOINT)])
    assert (result.known, result.initiated, result.cleared) == (1, 1, 1)
    second = _wait_backend_initiated(pair, first)
    assert second > first

    peer = pair.backend.read().peer(pair.client_key.public)
    assert peer is not None
    assert peer.preshared_key == pair.psk == backend_before.preshared_key
    assert peer.allowed_ips == backend_before.allowed_ips == (f"{CLIENT_TUNNEL}/32",)
    assert peer.persistent_keepalive == own_keepalive
    assert peer.endpoint == CLIENT_ENDPOINT
    # the new session works both ways, with the restored preshared key
    assert wait_until(pair.backend_pings_client, DEADLINE, 0.1)
    assert wait_until(pair.client_pings_backend, DEADLINE, 0.1)


def _transfer(ifname: str) -> dict[bytes, tuple[int, int]]:
    """rx and tx bytes per peer, from ``wg show IF transfer``."""
    out = run(["wg", "show", ifname, "transfer"]).stdout
    fields = [line.split("\t") for line in out.splitlines() if line]
    return {base64.b64decode(f[0]): (int(f[1]), int(f[2])) for f in fields}


INITIATION_BYTES = 148  # a handshake initiation on the wire


def test_activate_in_batches_restores_every_peer_and_starts_one_initiation_each(
    pair: Pair,
) -> None:
    """Eight more peers with their own mixes of settings, activated in batches
    of three (and the pair's client, the one peer that answers): each ends
    with its own settings and the endpoint given, having sent exactly one
    initiation. None had a session: all are kicked in place, with their own
    keepalive or KICK_KEEPALIVE, but the four with a keepalive of their own
    tried an initiation when it was set (with no endpoint to send it to), so
    wireguard-go swallows their kicks and they are re-added. A peer not
    targeted is left alone, an unknown target is skipped."""
    backend_if = pair.hosts.backend_if
    psk_file = pair.directory / "psk8"
    psk = secrets.token_bytes(32)
    write_secret(psk_file, base64.b64encode(psk).decode())
    keys = [secrets.token_bytes(32) for _ in range(8)]  # any 32 bytes are a peer key
    argv = ["set", backend_if]
    for i, key in enumerate(keys):
        argv += ["peer", base64.b64encode(key).decode(),
                 "allowed-ips", f"10.78.{i}.0/24,fd78::{i}/128",
                 "persistent-keepalive", str(0 if i % 2 else 13 + i)]  # fmt: skip
        if i % 3 == 0:
            argv += ["preshared-key", str(psk_file)]
    pair.wg(*argv)
    before = {p.public_key: p for p in pair.backend.read().peers}
    untouched = keys[-1]
    # distinct ports at the client's address: delivered, never answered
    targets = [(key, Endpoint.parse(f"{CLIENT_IP}:{40000 + i}")) for i, key in enumerate(keys)]
    targets = [*targets[:-1], (secrets.token_bytes(32), CLIENT_ENDPOINT)]
    targets.append((pair.client_key.public, CLIENT_ENDPOINT))

    result = Uapi(backend_if, batch_size=3).activate(targets)

    transfer = _transfer(backend_if)
    after = {p.public_key: p for p in pair.backend.read().peers}
    assert (result.known, result.initiated, result.cleared) == (8, 8, 4)
    assert after.keys() == before.keys()
    for key, endpoint in targets:
        if key not in before:
            continue
        old, new = before[key], after[key]
        assert new.endpoint == endpoint
        assert new.persistent_keepalive == old.persistent_keepalive
        assert new.allowed_ips == old.allowed_ips
        assert new.preshared_key == old.preshared_key
        if key != pair.client_key.public:
            assert transfer[key] == (0, INITIATION_BYTES), key.hex()
    assert after[untouched] == before[untouched]
    assert transfer[untouched] == (0, 0)
    assert sum(1 for p in after.values() if p.preshared_key == psk) == 3
    _wait_backend_initiated(pair)


_LISTENER = """
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data = sock.recv(2048)
    if len(data) == 148 and data[0] == 1:  # a handshake initiation
        print("initiation", flush=True)
"""


class Initiations:
    """Counts the handshake initiations reaching a UDP port of the client's
    host where nothing answers them."""

    def __init__(self, ns: str, endpoint: Endpoint) -> None:
        argv = [sys.executable, "-c", _LISTENER, str(endpoint.ip), str(endpoint.port)]
        self.proc = subprocess.Popen(ns_argv(ns, argv), stdout=subprocess.PIPE)
        self.seen = b""
        assert self.proc.stdout is not None
        self.out = self.proc.stdout.fileno()
        os.set_blocking(self.out, False)
        assert wait_until(lambda: self._read().startswith(b"ready\n"), DEADLINE, 0.02)

    def _read(self) -> bytes:
        with contextlib.suppress(BlockingIOError):
            self.seen += os.read(self.out, 4096) or b""
        return self.seen

    def count(self) -> int:
        return self._read().count(b"initiation\n")

    def wait(self, count: int, timeout: float) -> bool:
        return wait_until(lambda: self.count() >= count, timeout, 0.01)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()


QUICK = 3.0
"""Seconds within which an initiation the activation sent arrives (it takes
milliseconds); wireguard-go's own retry could come only 5 s after the one
before, which this test sends less than a second before the activation."""


@pytest.mark.parametrize("cause", ["activation", "own traffic"])
def test_a_peer_that_just_sent_an_initiation_is_re_added_and_initiates_now(
    pair: Pair, cause: str
) -> None:
    """wireguard-go sends a peer at most one initiation per 5 s: a kick in place
    right after one, whether an earlier activation sent it (to a client that
    never answered) or the backend's own traffic to the client did, would
    send nothing, and the client would wait for the retry. The activation
    sees that the peer's tx_bytes did not grow and re-adds it."""
    silent = Endpoint.parse(f"{CLIENT_IP}:40001")
    client = pair.client_key.public
    listener = Initiations(pair.hosts.client_ns, silent)
    try:
        if cause == "activation":
            first = pair.backend.activate([(client, silent)])
            assert (first.initiated, first.cleared) == (1, 0)
        else:
            pair.wg("set", pair.hosts.backend_if, "peer", pair.client_key.public_b64,
                    "endpoint", str(silent))  # fmt: skip
            run(ns_argv(pair.hosts.backend_ns, [sys.executable, "-c",
                "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM)"
                f".sendto(b'x', ('{CLIENT_TUNNEL}', 9))"]))  # fmt: skip
        assert listener.wait(1, DEADLINE)
        again = pair.backend.activate([(client, silent)])
        assert (again.known, again.initiated, again.cleared) == (1, 1, 1)
        assert listener.wait(2, QUICK), "the re-added peer sent no initiation"
    finally:
        listener.close()
    peer = pair.backend.read().peer(client)
    assert peer is not None
    assert (peer.endpoint, peer.persistent_keepalive) == (silent, 0)
    assert peer.allowed_ips == (f"{CLIENT_TUNNEL}/32",)


def test_wg_tool_activates_through_wireguard_go(psk_pair: Pair) -> None:
    pair = psk_pair
    tool: WireGuard = WgTool(pair.hosts.backend_if)
    iface = tool.read()
    assert iface.public_key == pair.backend_key.public
    (peer,) = iface.peers
    assert peer.preshared_key == pair.psk
    assert pair.client_handshake() == 0.0

    result = tool.activate([(pair.client_key.public, CLIENT_ENDPOINT)])
    assert (result.known, result.initiated) == (1, 1)
    _wait_backend_initiated(pair)
    after = tool.read().peer(pair.client_key.public)
    assert after is not None
    assert after.preshared_key == pair.psk
    assert after.persistent_keepalive == 0
    assert after.allowed_ips == (f"{CLIENT_TUNNEL}/32",)
    assert after.endpoint == CLIENT_ENDPOINT
    assert wait_until(pair.backend_pings_client, DEADLINE, 0.1)


_GATEWAY_SCRIPT = """
import asyncio, base64, sys, time
from natfail.core import agent_messages as msg
from natfail.core.model import Endpoint
from natfail.core.tai64n import next_timestamp
from natfail.io.agent_link import AgentLink

key, agent, server, client, client_ep = sys.argv[1:6]
link = AgentLink(base64.b64decode(key), lambda: next_timestamp(time.time_ns(), None))
target = msg.Target(base64.b64decode(client), Endpoint.parse(client_ep))
replies = asyncio.run(
    link.activate(Endpoint.parse(agent), base64.b64decode(server), 1, (target,))
)
reply = replies[0]
print("none" if reply is None else f"{reply.known} {reply.initiated}")
"""


def test_the_agent_process_brings_a_client_over_on_a_gateway_request(pair: Pair) -> None:
    """`natfail agent` in the backend's namespace, commanded over the channel by a
    gateway (here: a process in the client's namespace holding a listed key)."""
    gateway = new_key(pair.directory, "gateway")
    agent_at = f"{BACKEND_IP}:51821"
    config = pair.directory / "agent.toml"
    config.write_text(
        f'listen = "{agent_at}"\ngateways = ["{gateway.public_b64}"]\n'
        f'interfaces = ["{pair.hosts.backend_if}"]\n'
    )
    log = (pair.directory / "agent.log").open("w")
    agent = subprocess.Popen(
        ns_argv(
            pair.hosts.backend_ns,
            [sys.executable, "-m", "natfail.cli.daemon_main", "agent", "-c", str(config)],
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        assert wait_until(lambda: "listening" in (pair.directory / "agent.log").read_text(), 10)
        assert pair.client_handshake() == 0.0
        done = run(
            ns_argv(
                pair.hosts.client_ns,
                [
                    sys.executable,
                    "-c",
                    _GATEWAY_SCRIPT,
                    base64.b64encode(gateway.private).decode(),
                    agent_at,
                    pair.backend_key.public_b64,
                    pair.client_key.public_b64,
                    str(CLIENT_ENDPOINT),
                ],
            ),
            timeout=20,
        )
        assert done.stdout.strip() == "1 1", (
            done.stdout,
            (pair.directory / "agent.log").read_text(),
        )
        _wait_backend_initiated(pair)
        assert wait_until(pair.backend_pings_client, DEADLINE, 0.1)
    finally:
        agent.terminate()
        assert agent.wait(10) == 0
        log.close()
