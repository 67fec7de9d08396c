"""Run a benchmark inside a fresh, empty network namespace (created and removed here).

The data path code works in the namespace of its process, like the daemon does inside
the gateway namespace; a benchmark re-executes itself with ``ip netns exec``.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys


def reexec_in_fresh_netns(marker: str = "NATFAIL_BENCH_NETNS") -> None:
    """Returns at once inside the namespace; outside it runs this script in a new
    namespace and exits with its status."""
    if os.environ.get(marker):
        return
    ns = f"nfbench{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        env = {**os.environ, marker: ns}
        rc = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, *sys.argv], env=env
        ).returncode
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    raise SystemExit(rc)
