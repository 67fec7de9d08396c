"""The probe against real wireguard-go, through `natfailctl probe` as an
operator runs it on the gateway: up only when the real WireGuard process with
the right key answers."""

from __future__ import annotations

import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from natfail.io import timestamps
from natfail.lab import Lab, LabBackend, genkey, pubkey

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def backends_up(lab: Lab) -> Iterator[Lab]:
    for backend in lab.backends:
        if not backend.running:
            backend.start()
    yield lab


def natfailctl_probe(
    lab: Lab,
    target: str,
    *,
    server_key: str | None = None,
    count: int = 1,
    timeout: float = 1.0,
    interval: float = 0.05,
    state_dir: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "natfail.cli.ctl",
        "--config",
        str(lab.dir / "none.toml"),
        "probe",
        target,
        "--server-key",
        server_key or lab.server_key.public_b64,
        "--probe-key-file",
        str(lab.probe_key.file),
        "--count",
        str(count),
        "--timeout",
        str(timeout),
        "--interval",
        str(interval),
    ]
    if lab.psk_file is not None:
        argv += ["--psk-file", str(lab.psk_file)]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    return lab.exec(lab.gateway, argv, check=False, timeout=30, env=env)


@pytest.fixture(autouse=True)
def _no_config(lab: Lab) -> None:
    # natfailctl reads the probe key and state dir from a config; this test
    # passes them explicitly and points --config at a minimal valid file.
    conf = lab.dir / "none.toml"
    # Its own control socket: natfailctl asks a daemon there to probe.
    conf.write_text(
        f'[daemon]\nstate_dir = "{lab.dir / "state"}"\nsocket = "{lab.dir / "natfail.sock"}"\n'
        f'[[service]]\nname = "x"\npublic = "203.0.113.10:51820"\n'
        f'server_public_key = "{lab.server_key.public_b64}"\n'
        f'[[service.backend]]\nname = "a"\naddress = "10.0.0.2:51820"\npriority = 1\n'
    )
    (lab.dir / "state").mkdir(exist_ok=True)


def test_live_backend_is_up(backends_up: Lab) -> None:
    lab = backends_up
    for backend in lab.backends:
        proc = natfailctl_probe(lab, backend.address)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.startswith(f"{backend.address}: up, rtt "), proc.stdout
        # the real WireGuard received the initiation and sent its response
        probe_peer = lab.backend_show(backend).peers[lab.probe_key.public_b64]
        assert probe_peer.rx >= 148 and probe_peer.tx >= 92


def test_live_backend_over_ipv6_is_up(backends_up: Lab) -> None:
    backend = backends_up.backends[0]
    assert backend.address_v6 is not None
    proc = natfailctl_probe(backends_up, backend.address_v6)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": up, rtt " in proc.stdout


def test_wrong_server_key_is_down(backends_up: Lab) -> None:
    proc = natfailctl_probe(
        backends_up, backends_up.backends[0].address, server_key=pubkey(genkey()), timeout=0.5
    )
    assert proc.returncode == 1
    assert ": down, timeout" in proc.stdout, proc.stdout
    # the likely causes are named, the wrong key among them
    assert "--server-key is not the backend's public key" in proc.stdout, proc.stdout


def test_port_with_nothing_behind_it_is_down(backends_up: Lab) -> None:
    proc = natfailctl_probe(backends_up, "10.0.0.2:51999", timeout=0.5)
    assert proc.returncode == 1
    assert ": down, port-unreachable" in proc.stdout, proc.stdout


def test_port_with_nothing_behind_it_over_ipv6_is_down(backends_up: Lab) -> None:
    backend = backends_up.backends[0]
    assert backend.v6 is not None
    proc = natfailctl_probe(backends_up, f"[{backend.v6}]:51999", timeout=0.5)
    assert proc.returncode == 1
    assert ": down, port-unreachable" in proc.stdout, proc.stdout


def test_address_with_no_host_is_down(backends_up: Lab) -> None:
    proc = natfailctl_probe(backends_up, "10.0.0.250:51820", timeout=0.5)
    assert proc.returncode == 1
    assert ": down, " in proc.stdout, proc.stdout


def test_killed_process_is_down_and_restart_is_up(backends_up: Lab) -> None:
    lab = backends_up
    backend = lab.backends[1]
    backend.stop()
    proc = natfailctl_probe(lab, backend.address, timeout=0.5)
    assert proc.returncode == 1
    assert ": down, port-unreachable" in proc.stdout, proc.stdout
    backend.start()
    assert natfailctl_probe(lab, backend.address).returncode == 0


def test_paused_process_is_down_by_timeout(backends_up: Lab) -> None:
    backend = backends_up.backends[1]
    backend.pause()
    try:
        proc = natfailctl_probe(backends_up, backend.address, timeout=0.3)
    finally:
        backend.resume()
    assert proc.returncode == 1
    assert ": down, timeout" in proc.stdout, proc.stdout


def _has_queued_datagram(backend: LabBackend) -> bool:
    """Whether a datagram waits in the (paused) backend's UDP socket."""
    assert backend.pid is not None
    for name in ("udp", "udp6"):
        table = Path(f"/proc/{backend.pid}/net/{name}")
        rows = table.read_text().splitlines()[1:] if table.exists() else []
        for row in rows:
            # local_address is ADDR:PORT in hex, the 5th field tx_queue:rx_queue
            fields = row.split()
            if fields[1].endswith(f":{backend.port:04X}") and int(fields[4].split(":")[1], 16):
                return True
    return False


def test_a_probe_right_after_a_slow_answer_is_up(backends_up: Lab) -> None:
    """WireGuard drops an initiation it handles within 20 ms of the last one
    it accepted from the same key ("handshake flood"). The backend here
    handles the first initiation late (paused, like a busy host): counted
    from that send, the next probe's 20 ms are long over when the response
    comes, and it would leave at once, then be dropped: "down, timeout". The
    gap is counted from the response's arrival instead."""
    lab = backends_up
    backend = lab.backends[0]
    backend.pause()
    try:
        done = threading.Event()

        def resume_once_queued() -> None:
            while not done.is_set() and not _has_queued_datagram(backend):
                time.sleep(0.01)
            time.sleep(0.1)
            backend.resume()

        resumer = threading.Thread(target=resume_once_queued)
        resumer.start()
        try:
            proc = natfailctl_probe(lab, backend.address, count=2, timeout=3.0, interval=0.0)
        finally:
            done.set()
            resumer.join()
    finally:
        backend.resume()
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(": up, rtt " in x for x in lines), proc.stdout + proc.stderr
    rtts = [float(x.split("rtt ")[1].split(" ms")[0]) for x in lines]
    assert rtts[0] >= 100.0, proc.stdout  # the first one was answered late indeed


def _fake(lab: Lab, backend: LabBackend, module: str, *args: str) -> subprocess.Popen[str]:
    """Starts ``python -m tests.netns.MODULE HOST PORT ARGS...`` in the backend's
    namespace (a fake server or a spoofer) and waits until it says "ready"."""
    proc = lab.popen(
        backend,
        [sys.executable, "-m", f"tests.netns.{module}", backend.v4, str(backend.port), *args],
        stdout=subprocess.PIPE,
        env={"PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise AssertionError(f"tests.netns.{module} did not start")
    return proc


def test_forged_responses_are_down(backends_up: Lab) -> None:
    lab = backends_up
    backend = lab.backends[1]
    backend.stop()
    forger = _fake(lab, backend, "forger", lab.probe_key.public_b64)
    try:
        proc = natfailctl_probe(lab, backend.address, count=2, timeout=0.5)
    finally:
        forger.kill()
        forger.wait()
        backend.start()
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        assert ": down, invalid-replies, 1 invalid reply" in line, proc.stdout


def test_restarted_probe_is_still_answered(backends_up: Lab) -> None:
    """Two processes right after each other with the same probe key: the
    second one's timestamp must be newer, or WireGuard drops it silently."""
    lab = backends_up
    backend = lab.backends[0]
    first = natfailctl_probe(lab, backend.address, count=3)
    started = time.monotonic()
    second = natfailctl_probe(lab, backend.address, count=3)
    assert first.returncode == 0 and second.returncode == 0, first.stdout + second.stdout
    assert all(": up, " in line for line in (first.stdout + second.stdout).splitlines())
    assert time.monotonic() - started < 10


def test_cookie_replies_alone_are_down(backends_up: Lab) -> None:
    """A fake backend that knows only the server's public key answers every
    initiation with a valid cookie reply: natfail answers with mac2 at once,
    and without a handshake response the backend is down."""
    lab = backends_up
    backend = lab.backends[1]
    backend.stop()
    forger = _fake(lab, backend, "cookie_forger", lab.server_key.public_b64)
    try:
        proc = natfailctl_probe(lab, backend.address, timeout=1.0)
    finally:
        forger.kill()
        out, _ = forger.communicate()
        backend.start()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"{backend.address}: down, cookie-only ("), proc.stdout
    # The first initiation had no cookie; each one after it had a valid mac2.
    seen = out.split()
    assert seen[:2] == ["initiation", "mac2=none"], out
    assert seen[2:] and seen[2::2] == ["initiation"] * (len(seen) // 2 - 1), out
    assert set(seen[3::2]) == {"mac2=valid"}, out


@pytest.mark.parametrize("mode", ["wrong", "right"])
def test_spoofed_port_unreachable_does_not_beat_the_response(backends_up: Lab, mode: str) -> None:
    """Three forged ICMP port-unreachables reach the gateway before the
    real response. "wrong": they do not quote this probe's initiation and
    are ignored; "right": they do, but the valid response still wins."""
    lab = backends_up
    backend = lab.backends[0]
    assert backend.pid is not None
    spoofer = _fake(lab, backend, "icmp_spoofer", mode, str(backend.pid))
    assert spoofer.stdout is not None
    try:
        backend.pause()
        proc = natfailctl_probe(lab, backend.address, timeout=5.0)
        assert spoofer.stdout.readline().strip() == "spoofed"
    finally:
        spoofer.kill()
        spoofer.wait()
        backend.resume()  # the spoofer sent SIGCONT; this resets the lab's flag
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"{backend.address}: up, rtt "), proc.stdout
    if mode == "wrong":
        assert proc.stdout.rstrip().endswith(", 3 invalid replies"), proc.stdout
    else:
        assert "invalid" not in proc.stdout, proc.stdout


# tests.netns.cookie_load, with the probe timestamp file natfailctl uses
# here: natfailctl's stamps start at the file's lease, up to 10 s ahead of
# the wall clock, and wireguard-go drops a later initiation with an older
# stamp from the same key (a clock without the file would be older).
_SHARED_CLOCK = """
import runpy, sys
from pathlib import Path
from natfail.io import timestamps

class Shared(timestamps.TimestampClock):
    def __init__(self, path, *args, **kwargs):
        super().__init__(Path("{stamps}"), *args, **kwargs)

timestamps.TimestampClock = Shared
sys.argv[0] = "cookie_load"
runpy.run_module("tests.netns.cookie_load", run_name="__main__", alter_sys=True)
"""


def test_real_wireguard_under_load_is_up(backends_up: Lab) -> None:
    """Real wireguard-go under load answers with a cookie reply; the probe's
    answer with mac2 gets the handshake response: up, "under-load"."""
    lab = backends_up
    backend = lab.backends[0]
    assert backend.pid is not None
    before = lab.backend_show(backend).peers[lab.probe_key.public_b64].tx
    argv = [
        sys.executable,
        "-c",
        _SHARED_CLOCK.format(stamps=lab.dir / "state" / timestamps.STATE_FILE),
        backend.v4,
        str(backend.port),
        lab.server_key.public_b64,
        str(lab.probe_key.file),
        str(backend.pid),
    ]
    if lab.psk_file is not None:
        argv.append(str(lab.psk_file))
    try:
        proc = lab.exec(lab.gateway, argv, check=False, timeout=60, env={"PYTHONPATH": str(REPO)})
    finally:
        backend.resume()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "under-load up", proc.stdout
    # The real WireGuard sent its handshake response (92 bytes), not only
    # cookie replies (which it does not count for the peer).
    assert lab.backend_show(backend).peers[lab.probe_key.public_b64].tx >= before + 92


# A stand-in for the daemon (whose wiring is natfail/daemon.py's): the
# probe transport, the clock on the state dir's file and the control
# socket's "probe" handler, probing one backend every 0.1 s meanwhile.
_DAEMON = """
import asyncio, sys
from pathlib import Path
from natfail import config as cfg
from natfail.core import noise
from natfail.io import probe_request as pr
from natfail.io.control import ControlServer
from natfail.io.probe_transport import UdpProbeTransport
from natfail.io.timestamps import STATE_FILE, TimestampClock

sock, state, key_file, server, target, psk_file = sys.argv[1:7]

async def main() -> None:
    psk = cfg.load_key_file(psk_file) if psk_file != "-" else bytes(32)
    keys = noise.Keys(cfg.load_key_file(key_file), cfg.decode_key(server), psk)
    transport = UdpProbeTransport(TimestampClock(Path(state) / STATE_FILE))
    keys_for = pr.held_keys(lambda: [("x", keys)])

    async def handler(request, peer):
        return await pr.run_probe_request(request, transport, keys_for)

    await ControlServer(Path(sock), handler).start()
    endpoint = cfg.Endpoint.parse(target)
    print("ready", flush=True)
    while True:
        result = await transport.probe(keys, endpoint, 0.5)
        print("up" if result.up else "down-" + result.reason, flush=True)
        await asyncio.sleep(0.1)

asyncio.run(main())
"""


def _lines(proc: subprocess.Popen[str], count: int, timeout: float = 20.0) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while len(lines) < count:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"only {lines} from the daemon stand-in")
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the daemon stand-in ended after {lines}")
        lines.append(line.strip())
    return lines


def test_with_a_daemon_running_it_probes_and_its_own_probes_stay_up(backends_up: Lab) -> None:
    """The trap: natfailctl alone starts above the timestamp file's lease,
    up to 10 s ahead of the daemon's stamps; wireguard-go would record that
    stamp and drop the daemon's own probes as replays for as long. So
    natfailctl asks the running daemon to probe, with its clock."""
    lab = backends_up
    backend = lab.backends[0]
    argv = [
        sys.executable,
        "-c",
        _DAEMON,
        str(lab.dir / "natfail.sock"),
        str(lab.dir / "state"),
        str(lab.probe_key.file),
        lab.server_key.public_b64,
        backend.address,
        str(lab.psk_file or "-"),
    ]
    daemon = lab.popen(lab.gateway, argv, stdout=subprocess.PIPE, env={"PYTHONPATH": str(REPO)})
    try:
        assert _lines(daemon, 1) == ["ready"]
        assert _lines(daemon, 3) == ["up"] * 3
        proc = natfailctl_probe(lab, backend.address, count=3)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        assert len(lines) == 3 and all(": up, rtt " in x for x in lines), proc.stdout
        # The daemon's probes after it (two seconds of them) are all still up.
        assert set(_lines(daemon, 15)) == {"up"}
    finally:
        daemon.kill()
        daemon.wait()
