"""Reading the files a config names, and the config itself, without letting
them hurt the reader: a FIFO, a device or a huge file in their place must not
hang it or exhaust its memory, and a file another user may change is refused."""

from __future__ import annotations

import os
import pwd

# The bounded reader itself lives outside this package, so that natfailctl can
# read a config's [daemon] table without importing the whole config package.
from natfail.regular_file import Unreadable, os_reason, read_regular

__all__ = [
    "SERVICE_USER",
    "Unreadable",
    "foreign_owner",
    "os_reason",
    "read_regular",
    "service_uid",
]


SERVICE_USER = "natfail"
"""The user systemd/natfail.service runs the daemon as: root checking a config
(`natfailctl check-config`, `probe`) must accept the key the daemon will read."""


def service_uid() -> int | None:
    try:
        return pwd.getpwnam(SERVICE_USER).pw_uid
    except KeyError:
        return None


def foreign_owner(uid: int, what: str) -> str | None:
    """Why a file another user owns is refused: its owner can change it at will
    (a key to impersonate the probe, a hook to run as natfail, CAP_NET_ADMIN)."""
    if uid in (0, os.geteuid(), service_uid()):
        return None
    return (
        f"is owned by uid {uid}: {what} must be owned by root or by the user natfail "
        "runs as (chown)"
    )
