"""Checks before the daemon touches anything: what an operator can get wrong
on the host, each found problem one line that names it and says how to fix
it (never an "internal error" later).

- IP forwarding for each family a service uses: with it off every backend
  probes up and the clients get nothing through.
- CAP_NET_ADMIN, which the firewall, conntrack and the probes' sockets need.
- A socket directory the daemon can create its socket in.
- A free metrics address."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Final

from natfail.config import Config, parse_listen

CAP_NET_ADMIN: Final = 12
FORWARDING: Final = {
    4: ("/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward"),
    6: ("/proc/sys/net/ipv6/conf/all/forwarding", "net.ipv6.conf.all.forwarding"),
}


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def forwarding(config: Config, read: Callable[[str], str | None] = _read) -> list[str]:
    families = sorted({s.public.family for s in config.services})
    problems = []
    for family in families:
        path, key = FORWARDING[family]
        if read(path) == "0":
            problems.append(
                f"{key} is 0: this gateway would not forward the clients' packets to the "
                f"backends (set {key} = 1 in /etc/sysctl.d/ and run sysctl --system)"
            )
    return problems


def capabilities(read: Callable[[str], str | None] = _read) -> list[str]:
    status = read("/proc/self/status") or ""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            if not effective >> CAP_NET_ADMIN & 1:
                return [
                    "no CAP_NET_ADMIN: natfail needs it for its firewall rules, conntrack "
                    "and probes (run it as root, or through systemd/natfail.service, which "
                    "grants it)"
                ]
    return []


def socket_directory(config: Config) -> list[str]:
    directory = config.daemon.socket.parent
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        return [
            f"cannot create the control socket {config.daemon.socket}: {probe} is not "
            "writable by this user (daemon.socket, or RuntimeDirectory= in the unit)"
        ]
    return []


def metrics_address(config: Config) -> list[str]:
    if not config.daemon.metrics_listen:
        return []
    host, port = parse_listen(config.daemon.metrics_listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                why = "another process listens there"
            else:
                why = exc.strerror or str(exc)
            return [
                f"metrics_listen {config.daemon.metrics_listen}: {why} (choose another "
                'address, or "" to turn metrics off)'
            ]
    return []


def check(config: Config) -> list[str]:
    """Every problem found, one line each."""
    return [
        *capabilities(),
        *forwarding(config),
        *socket_directory(config),
        *metrics_address(config),
    ]
