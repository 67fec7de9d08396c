"""Policy for the whole suite: the namespace tests and when they may skip.

Tests under tests/netns build network namespaces with real wireguard-go, nftables
and conntrack. They need root, a working ``ip netns`` and the tools below; without
them they SKIP with the reason. In CI (environment variable ``CI=true``) a namespace
test that does not run is a FAILURE instead: a skip of any kind there (from this
policy, a fixture or the test itself) is turned into a failed report.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

NETNS_DIR = Path(__file__).resolve().parent / "netns"
NETNS_TOOLS = ("ip", "sysctl", "wireguard-go", "wg", "nft", "conntrack", "ping")


def in_ci() -> bool:
    """True when CI=true (also 1/yes): namespace tests must run then, not skip."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _is_netns(path: Path | str) -> bool:
    p = Path(path).resolve()
    return p == NETNS_DIR or NETNS_DIR in p.parents


@functools.cache
def netns_unavailable() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "root (they build network namespaces)"
    missing = [tool for tool in NETNS_TOOLS if shutil.which(tool) is None]
    if missing:
        return "these programs on PATH: " + ", ".join(missing)
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun (wireguard-go creates a TUN device)"
    name = f"nfcheck{os.getpid()}"
    try:
        add = subprocess.run(
            ["ip", "netns", "add", name], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"a working `ip netns add` ({e})"
    if add.returncode != 0:
        return f"a working `ip netns add` ({add.stderr.strip() or 'exit ' + str(add.returncode)})"
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_netns(item.path):
            item.add_marker(pytest.mark.netns)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if not _is_netns(item.path):
        return
    reason = netns_unavailable()
    if reason is None:
        return
    if in_ci():
        pytest.fail(f"namespace test cannot run and CI=true forbids skipping: needs {reason}")
    pytest.skip(f"namespace tests need {reason}")


def _skip_reason(longrepr: object) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail") and _is_netns(item.path):
        report.outcome = "failed"
        report.longrepr = (
            f"namespace test skipped with CI=true, which counts as a failure: "
            f"{_skip_reason(report.longrepr)}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if in_ci() and report.skipped and _is_netns(collector.path):
        report.outcome = "failed"
        report.longrepr = (
            f"namespace test module skipped with CI=true, which counts as a failure: "
            f"{_skip_reason(report.longrepr)}"
        )
