"""Two daemons with one config on one gateway: the second one used to delete
the first one's control socket and take over, and both rewrote the rules
~90 times a second. Now the second exits 1 with one line and touches
nothing; a dead daemon's stale socket is still replaced."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from natfail.lab import Lab
from tests.netns.gateway import ENV, KINDS, Gateway, running


@pytest.fixture(params=KINDS)
def gw(request: pytest.FixtureRequest, fresh: Lab) -> Iterator[Gateway]:
    with running(fresh, request.param) as gateway:
        yield gateway


def _rules(gw: Gateway) -> str:
    lab = gw.lab
    if gw.firewall == "nftables":
        return lab.exec(lab.gateway, ["nft", "list", "table", "inet", "natfail"]).stdout
    return "".join(
        lab.exec(lab.gateway, [tool, "-t", "nat", "-S"]).stdout
        for tool in ("iptables-legacy", "ip6tables-legacy")
    )


def _socket(gw: Gateway) -> Path:
    return gw.lab.dir / "natfail.sock"


def _run_to_exit(lab: Lab, config: Path) -> tuple[int, str, str]:
    """A daemon with ``config`` in the gateway that is expected to exit on its own."""
    proc = lab.popen(
        lab.gateway,
        [sys.executable, "-m", "natfail", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_a_second_daemon_exits_and_touches_nothing(gw: Gateway) -> None:
    lab = gw.lab
    assert gw.proc is not None
    first_pid = gw.proc.pid  # ip netns exec execs the daemon
    inode = _socket(gw).stat().st_ino
    rules = _rules(gw)
    log_before = gw.logs()

    code, out, err = _run_to_exit(lab, gw.config)
    assert code == 1, (out, err)
    assert err.splitlines() == [f"natfail: another natfail (pid {first_pid}) is running"]
    assert out == ""

    time.sleep(1.0)  # long enough for a rival to have rewritten the rules many times
    assert gw.proc.poll() is None
    assert _socket(gw).stat().st_ino == inode
    assert gw.ctl("status").returncode == 0
    assert gw.status()["active"] == "a"
    assert _rules(gw) == rules
    # the first daemon saw nothing to repair, so nobody else wrote its rules
    assert "repaired" not in gw.logs()[len(log_before) :], gw.logs()


def test_a_dead_daemons_stale_socket_is_replaced(gw: Gateway) -> None:
    gw.stop(signal.SIGKILL)
    assert _socket(gw).exists()  # left behind by the killed daemon
    gw.start()  # it waits for `natfailctl status` to succeed on the new socket
    assert gw.status()["active"] == "a"
    assert "another natfail" not in gw.logs()


def test_a_socket_another_program_listens_on_is_never_taken(fresh: Lab) -> None:
    gw = Gateway(fresh, "nftables")
    gw.remove_rules()
    path = _socket(gw)
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen(1)
        inode = path.stat().st_ino
        code, out, err = _run_to_exit(fresh, gw.config)
        assert code == 1, (out, err)
        lines = err.splitlines()
        assert lines[-1] == f"natfail: another process listens on {path}; not replacing its socket"
        assert "Traceback" not in err
        assert path.stat().st_ino == inode
    path.unlink()
    gw.remove_rules()
