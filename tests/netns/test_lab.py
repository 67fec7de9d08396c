"""The lab itself: real wireguard-go behind a static nftables DNAT in the gateway."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from natfail import exitcodes
from natfail.lab import (
    MARKER_DIR,
    PUBLIC_V4,
    PUBLIC_V6,
    WG_RUN_DIR,
    Lab,
    LabError,
    Transfer,
    cleanup_stale,
    decided_at,
    pings,
    probe_table,
    pubkey,
)

from .conftest import StaticDnat


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _wg_processes(ifnames: set[str]) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if argv and argv[0].endswith("wireguard-go") and ifnames & set(argv[1:]):
                pids.append(int(entry.name))
    return pids


def _assert_gone(namespaces: list[str], ifnames: set[str], lab_id: str, tmp: Path) -> None:
    assert not set(namespaces) & _netns()
    assert _wg_processes(ifnames) == []
    assert [i for i in ifnames if (WG_RUN_DIR / f"{i}.sock").exists()] == []
    assert not tmp.exists()
    assert not (MARKER_DIR / f"{lab_id}.json").exists()


def test_dnat_to_a_carries_pings_through_a(fresh: Lab, static_dnat: StaticDnat) -> None:
    lab = fresh
    a, b = lab.backends[:2]
    static_dnat(lab, a, None)
    before = lab.transfers()
    assert before == {"a": Transfer(0, 0), "b": Transfer(0, 0)}

    assert lab.client_ping(count=3, interval=0.1)
    assert lab.carrying_backends(before) == ["a"]
    assert lab.transfers()["b"] == Transfer(0, 0)
    assert lab.client_endpoint() == f"{PUBLIC_V4}:51820"
    assert lab.latest_handshake(a) > 0
    assert lab.latest_handshake(b) == 0
    # the gateway's conntrack entry shows the DNAT: the reply comes from backend a
    table = lab.exec(lab.gateway, ["conntrack", "-L", "-p", "udp"]).stdout
    assert f"dst={PUBLIC_V4}" in table
    assert f"src={a.v4} dst={lab.client.v4} sport=51820" in table


def test_retarget_dnat_to_b(fresh: Lab, static_dnat: StaticDnat) -> None:
    lab = fresh
    a, b = lab.backends[:2]
    static_dnat(lab, a, None)
    assert lab.client_ping(count=2, interval=0.1)

    static_dnat(lab, b, None)
    lab.flush_conntrack()
    # b has no session with the client: without a new handshake the client would only
    # notice after ~15 s of silence, so make it start one now
    lab.client_rehandshake()
    before = lab.transfers()
    assert lab.client_ping(count=3, interval=0.1)
    assert lab.carrying_backends(before) == ["b"]
    assert lab.latest_handshake(b) > 0
    assert lab.client_endpoint() == f"{PUBLIC_V4}:51820"


def test_ipv6_endpoint_through_dnat(fresh: Lab, static_dnat: StaticDnat) -> None:
    lab = fresh
    b = lab.backends[1]
    static_dnat(lab, None, b)
    lab.set_client_endpoint(6)
    try:
        lab.client_rehandshake()
        before = lab.transfers()
        assert lab.client_ping("fd99::1", count=3, interval=0.1)
        assert lab.carrying_backends(before) == ["b"]
        assert lab.client_endpoint() == f"[{PUBLIC_V6}]:51820"
        table = lab.exec(lab.gateway, ["conntrack", "-L", "-f", "ipv6", "-p", "udp"]).stdout
        assert f"src={b.v6} dst={lab.client.v6} sport=51820" in table
    finally:
        lab.set_client_endpoint(4)


def test_stopped_backend_answers_nothing_and_restarts(fresh: Lab, static_dnat: StaticDnat) -> None:
    lab = fresh
    a = lab.backends[0]
    static_dnat(lab, a, None)
    assert lab.client_ping(count=1)
    pid = a.pid
    assert pid is not None

    a.stop()
    assert not a.running
    assert not (WG_RUN_DIR / f"{a.wg_if}.sock").exists()
    assert _wg_processes({a.wg_if}) == []
    assert lab.transfers()["a"] == Transfer(0, 0)
    lab.client_rehandshake()
    assert not lab.client_ping(count=1, timeout=1.0)

    a.start()
    assert a.running and a.pid != pid
    lab.client_rehandshake()
    assert lab.client_ping(count=2, interval=0.1)


def test_paused_backend_is_silent_until_resumed(fresh: Lab, static_dnat: StaticDnat) -> None:
    lab = fresh
    b = lab.backends[1]
    static_dnat(lab, b, None)
    b.pause()
    try:
        assert b.running and b.paused
        assert not lab.client_ping(count=1, timeout=1.0)
    finally:
        b.resume()
    assert not b.paused
    # the handshake queued in b's socket is answered once it runs again
    assert lab.client_ping(count=2, interval=0.1, timeout=8.0)
    assert lab.latest_handshake(b) > 0


def test_keys_and_files(lab: Lab) -> None:
    for key in (lab.server_key, lab.client_key, lab.probe_key):
        assert len(key.private) == 32 and len(key.public) == 32
        assert pubkey(key.private_b64) == key.public_b64
        assert stat.S_IMODE(key.file.stat().st_mode) == 0o600
        assert key.file.read_text().strip() == key.private_b64
    # every backend knows the client (with its tunnel addresses) and the probe key
    for b in lab.backends:
        peers = lab.backend_show(b).peers
        assert lab.backend_show(b).listen_port == 51820
        assert set(peers[lab.client_key.public_b64].allowed_ips) == {
            "10.99.0.2/32",
            "fd99::2/128",
        }
        assert peers[lab.probe_key.public_b64].allowed_ips == ()
        assert lab.backend_show(b).public_key == lab.server_key.public_b64


def test_misuse_and_command_errors(lab: Lab) -> None:
    with pytest.raises(LabError, match=r"ip netns exec \S+-gw false: exit 1"):
        lab.exec(lab.gateway, ["false"])
    assert lab.exec(lab.gateway, ["false"], check=False).returncode == 1
    with pytest.raises(ValueError, match="not a namespace"):
        lab.exec("some-other-ns", ["true"])
    with pytest.raises(TypeError):
        lab.exec(lab.client, "true")
    with pytest.raises(ValueError):
        Lab(backends=0)
    with pytest.raises(ValueError):
        Lab(ipv6=False, client_endpoint_family=6)


def test_two_labs_at_once_then_close_leaves_nothing(static_dnat: StaticDnat) -> None:
    one = Lab(backends=2, preshared_key=True)
    two = Lab(backends=3, ipv6=False)
    labs = [one, two]
    try:
        assert one.id != two.id
        assert not set(one.namespaces) & set(two.namespaces)
        assert not one.ifnames & two.ifnames
        assert all(len(name) <= 15 for lab in labs for name in lab.ifnames)
        # both work side by side, each through its own DNAT target
        static_dnat(one, one.backends[1], one.backends[1])
        static_dnat(two, two.backends[2], None)
        before = [lab.transfers() for lab in labs]
        assert one.client_ping(count=2, interval=0.1)
        assert two.client_ping(count=2, interval=0.1)
        assert one.carrying_backends(before[0]) == ["b"]
        assert two.carrying_backends(before[1]) == ["c"]
        # the probe peer carries the preshared key only where asked for
        assert one.psk_file is not None and one.psk is not None
        assert stat.S_IMODE(one.psk_file.stat().st_mode) == 0o600
        assert one.backend_show("a").peers[one.probe_key.public_b64].preshared_key
        assert not one.backend_show("a").peers[one.client_key.public_b64].preshared_key
        assert two.psk is None
        assert not two.backend_show("a").peers[two.probe_key.public_b64].preshared_key
    finally:
        snapshots = [(lab.namespaces, set(lab.ifnames), lab.id, lab.dir) for lab in labs]
        for lab in labs:
            lab.close()
    for namespaces, ifnames, lab_id, tmp in snapshots:
        _assert_gone(namespaces, ifnames, lab_id, tmp)
    one.close()  # idempotent
    assert one.closed
    with pytest.raises(RuntimeError, match="closed"):
        one.exec(one.gateway, ["true"])


# The orphan uses a prefix of its own, so that a lab built by another test run at the
# same time (which cleans stale "nf" labs) cannot clean it up before this test does.
_ORPHAN = textwrap.dedent(
    """
    import json, sys, time
    from natfail.lab import Lab
    lab = Lab(backends=2, prefix="nfzt", clean_stale=False)
    print(json.dumps({"id": lab.id, "namespaces": lab.namespaces,
                      "ifnames": sorted(lab.ifnames), "dir": str(lab.dir)}), flush=True)
    time.sleep(60)
    """
)


def test_cleanup_stale_removes_a_killed_lab(lab: Lab) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no atexit, no cleanup: a crashed owner
        proc.wait(5)
    ifnames = set(info["ifnames"])
    assert set(info["namespaces"]) <= _netns()
    assert len(_wg_processes(ifnames)) == 3  # its wireguard-go processes outlive it
    assert (MARKER_DIR / f"{info['id']}.json").exists()

    assert cleanup_stale("nfzt") == [info["id"]]
    _assert_gone(info["namespaces"], ifnames, info["id"], Path(info["dir"]))
    # a live lab is never touched
    assert lab.id not in cleanup_stale()
    assert set(lab.namespaces) <= _netns()
    assert all(b.running for b in lab.backends)


def test_ping_output_and_switch_records_are_read_in_one_place() -> None:
    assert pings.received("3 packets transmitted, 2 received, 33% packet loss") == 2
    assert pings.received("no summary") == 0
    line = "[1700000000.250000] 64 bytes from 10.99.0.1: icmp_seq=7 ttl=64 time=0.1 ms"
    assert pings.reply_time(line) == 1700000000.25
    assert pings.reply_time("From 10.99.0.2 icmp_seq=8 Destination Host Unreachable") is None
    record = {"unix_time": 100.5, "swap_ms": 200.0, "cleanup_ms": 300.0}
    assert decided_at(record) == 100.0
    assert probe_table(0.5, 0.3, 1, 2) == (
        "[service.probe]\ninterval = 0.5\ntimeout = 0.3\nrise = 1\nfall = 2"
    )


def test_command_line_lists_labs(lab: Lab) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "natfail.lab", "list"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == exitcodes.OK, proc.stderr
    assert f"{lab.id} pid {os.getpid()} live" in proc.stdout
