"""The open file limit: the probe keeps one socket per backend open (3000 at
the design scale), beside conntrack, netlink, the control socket's clients
and the hooks' pipes; the usual soft limit of 1024 is too low for that."""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Final

RESERVED: Final = 512
"""Descriptors kept for everything but the probe sockets: conntrack and
netlink sockets, up to 128 control connections, the metrics server, hooks,
files being written."""

_NR_OPEN = Path("/proc/sys/fs/nr_open")
_NR_OPEN_DEFAULT = 1 << 20


def _nr_open() -> int:
    try:
        return int(_NR_OPEN.read_text())
    except (OSError, ValueError):
        return _NR_OPEN_DEFAULT


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the soft
    limit in force afterwards. Never raises: where it may not (a system
    call filter without setrlimit and prlimit64), the limit stays as it is,
    and the systemd unit's LimitNOFILE= has set it already."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit (root may set one) is capped by the kernel's nr_open.
    target = _nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft >= target:  # (a soft limit cannot be unlimited: nr_open caps it)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return soft
    return target


def needed(backends: int) -> int:
    """The open file limit `backends` probed backends need."""
    return backends + RESERVED
