"""The iptables dataplane's helper processes with real iptables (legacy) in a lab.

A helper killed with SIGKILL is replaced at the next call, in the gateway's namespace,
and that call installs what it was asked to; a helper ends, without a word on stderr,
when the process that forked it is SIGKILLed, even when some other process still holds
its channel open.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from natfail.config import Service
from natfail.core import ruleset
from natfail.core.ruleset import Ruleset
from natfail.io.iptables import IptablesDataplane
from natfail.lab import PUBLIC_PORT, PUBLIC_V4, PUBLIC_V6, Lab, wait_until
from tests.builders import service
from tests.netns.nsworker import NsWorker
from tests.unit.test_iptables_helper import _dead

# --- code that runs in the gateway namespace (in the worker) ---------------------------

_LOG: list[str] = []


class _Keep(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _LOG.append(record.getMessage())


def capture_log() -> None:
    logger = logging.getLogger("natfail.io.iptables")
    logger.addHandler(_Keep(logging.WARNING))
    logger.setLevel(logging.WARNING)


def logged() -> list[str]:
    return list(_LOG)


# --- helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services(lab: Lab) -> list[Service]:
    return [
        service("wg0", f"{PUBLIC_V4}:{PUBLIC_PORT}", [(b.name, b.address) for b in lab.backends]),
        service(
            "wg6",
            f"[{PUBLIC_V6}]:{PUBLIC_PORT}",
            [(b.name, b.address_v6 or "") for b in lab.backends],
            iif=lab.gateway.wan_if,
        ),
    ]


@pytest.fixture
def worker(lab: Lab) -> Iterator[NsWorker]:
    with NsWorker(lab.gateway.ns) as w:
        yield w
    for tool in ("iptables-legacy", "ip6tables-legacy"):  # leave the lab as we found it
        for args in (
            ["-D", "PREROUTING", "-j", "NATFAIL-PRE"],
            ["-D", "POSTROUTING", "-j", "NATFAIL-POST"],
            ["-F", "NATFAIL-PRE"],
            ["-F", "NATFAIL-POST"],
            ["-X", "NATFAIL-PRE"],
            ["-X", "NATFAIL-POST"],
        ):
            lab.exec(lab.gateway, [tool, "-t", "nat", *args], check=False)


def _dnat_targets(lab: Lab, tool: str) -> list[str]:
    out = lab.exec(lab.gateway, [tool, "-t", "nat", "-S", "NATFAIL-PRE"]).stdout
    return [
        ln.split("--to-destination ", 1)[1].split()[0]
        for ln in out.splitlines()
        if "--to-destination" in ln
    ]


def _netns_inode(path: str) -> int:
    return os.stat(path).st_ino


# --- tests -------------------------------------------------------------------------------


def test_a_killed_helper_is_replaced_and_the_next_apply_installs_the_rules(
    lab: Lab, worker: NsWorker, services: list[Service]
) -> None:
    a, b = lab.backends[0], lab.backends[1]
    worker.call(capture_log)
    dp = worker.create(IptablesDataplane)
    dp.remove_all()
    state_a = ruleset.build(services, {"wg0": a.name, "wg6": a.name})
    state_b = ruleset.build(services, {"wg0": b.name, "wg6": b.name})
    dp.apply(state_a)
    assert _dnat_targets(lab, "iptables-legacy") == [a.address]
    assert _dnat_targets(lab, "ip6tables-legacy") == [a.address_v6]
    before: dict[int, int] = dp.helper_pids()
    for pid in before.values():
        os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: all(_dead(pid) for pid in before.values()), 10)

    dp.apply(state_b)  # the daemon's next switch: no error, and it is installed
    assert _dnat_targets(lab, "iptables-legacy") == [b.address]
    assert _dnat_targets(lab, "ip6tables-legacy") == [b.address_v6]
    assert dp.read() == state_b
    assert dp.intact()

    after: dict[int, int] = dp.helper_pids()
    gateway_ns = _netns_inode(f"/run/netns/{lab.gateway.ns}")
    for family, pid in after.items():
        assert pid != before[family] and not _dead(pid)
        assert _netns_inode(f"/proc/{pid}/ns/net") == gateway_ns
    lines: list[str] = worker.call(logged)
    assert len(lines) == 2, lines  # one per family
    for family, pid in before.items():
        [line] = [ln for ln in lines if f"(pid {pid})" in ln]
        assert f"IPv{family}" in line and "killed by SIGKILL" in line
        assert f"pid {after[family]}" in line

    dp.remove_all()
    assert dp.read() == Ruleset()


DAEMON = r"""
import json, os, sys, time
from natfail.io.iptables import IptablesDataplane

dp = IptablesDataplane()
dp.read()
# a process that holds all our descriptors, the helpers' channels too, as a leaked or
# inherited descriptor would: EOF alone would never reach the helpers
holder = os.fork()
if holder == 0:
    time.sleep(300)
    os._exit(0)
# requests whose replies we never read: a dead reader's unread data resets the channel
for p in dp._procs.values():
    p._conn.send(("read", ()))
    assert p._conn.poll(30)
print(json.dumps({"helpers": list(dp.helper_pids().values()), "holder": holder}), flush=True)
time.sleep(300)
"""


def test_helpers_end_quietly_when_their_daemon_is_sigkilled(lab: Lab) -> None:
    with tempfile.TemporaryFile("w+") as err:
        proc = lab.popen(
            lab.gateway,
            [sys.executable, "-c", DAEMON],
            stdout=subprocess.PIPE,
            stderr=err,
            env={"PYTHONPATH": str(Path(__file__).parents[2])},
        )
        holder = None
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, "the daemon stand-in ended early"
            started: dict[str, Any] = json.loads(line)
            helpers: list[int] = started["helpers"]
            holder = started["holder"]
            assert len(helpers) == 2 and not any(_dead(pid) for pid in helpers)
            proc.kill()
            proc.wait(10)
            assert wait_until(lambda: all(_dead(pid) for pid in helpers), 10), (
                "a helper outlived its daemon"
            )
            err.seek(0)
            text = err.read()
            assert "Traceback" not in text and "Error" not in text, text
        finally:
            if holder is not None and not _dead(holder):
                os.kill(holder, signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
