"""systemd's notify protocol: one datagram to $NOTIFY_SOCKET per message.

No dependency needed: the protocol is a unix datagram of newline-separated
KEY=VALUE lines. Without NOTIFY_SOCKET (not under systemd) it does nothing."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import Protocol

log = logging.getLogger(__name__)


class Notifier(Protocol):
    def notify(self, *lines: str) -> None: ...

    @property
    def watchdog_interval(self) -> float | None: ...


class SdNotify:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket: a leading NUL byte on the wire.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._watchdog = self._watchdog_from(env)

    @staticmethod
    def _watchdog_from(env: Mapping[str, str]) -> float | None:
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if not usec.isdigit() or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 1_000_000

    @property
    def watchdog_interval(self) -> float | None:
        """systemd's WatchdogSec, when it asked for pings."""
        return self._watchdog

    def notify(self, *lines: str) -> None:
        if not self._address:
            return
        message = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self._address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self._address.lstrip("\0"), exc.strerror)
