"""A lab of network namespaces with real WireGuard, for tests, benchmarks and the demo.

Topology (every name carries the lab's random id, so two labs never collide)::

    client  nf<id>-cl          gateway  nf<id>-gw               backend  nf<id>-b0, -b1 ...
    eth0 198.51.100.2/24 ─veth─ wan 198.51.100.1/24   br0 ─veth─ eth0 10.0.0.2/24, .3 ...
         2001:db8:1::2/64           2001:db8:1::1/64  (vb0..)         fd00::2/64, ::3 ...
    route 203.0.113.0/24,           public 203.0.113.10/32          default via 10.0.0.1,
          2001:db8::/64 via gw             2001:db8::10/128                     fd00::1
    wc<id> 10.99.0.2/24             br0 10.0.0.1/24 fd00::1/64      wb<id>0 10.99.0.1/24
           fd99::2/64               ip_forward, ipv6 forwarding             fd99::1/64, :51820

Every backend runs wireguard-go with the same server key, the client as a peer
(AllowedIPs 10.99.0.2/32, fd99::2/128) and the probe key as a peer without
AllowedIPs (optionally with a preshared key). The client's only peer is the
server, at the gateway's public address. The client has no default route: if
its WireGuard ever roams to a backend's private address, it cannot reach it
(which is exactly the failure natfail's SNAT prevents).

The lab installs no firewall rule: forwarding, DNAT and conntrack in the
gateway namespace are up to the test or to natfail.

wireguard-go facts this module lives with: its control socket is
``/var/run/wireguard/<ifname>.sock``, a directory shared by all namespaces,
so interface names are unique system-wide; deleting a namespace does not stop
a wireguard-go inside it; SIGTERM removes its socket and interface, SIGKILL
leaves the socket file behind. A client whose handshake went unanswered only
retries after 5 s, and a client whose session went to another backend only
re-handshakes after 15 s without replies: :meth:`Lab.client_rehandshake`
forces a fresh handshake at once.

Command line (by hand)::

    python -m natfail.lab up [--backends N] [--keepalive S] [--no-ipv6]
    python -m natfail.lab list
    python -m natfail.lab down          # remove leftovers of dead labs
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, NamedTuple, Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from natfail.oneline import one_line

__all__ = [
    "BACKEND_NAMES",
    "CLIENT_TUNNEL_V4",
    "CLIENT_TUNNEL_V6",
    "CLIENT_WAN_V4",
    "CLIENT_WAN_V6",
    "GATEWAY_LAN_V4",
    "GATEWAY_LAN_V6",
    "GATEWAY_WAN_V4",
    "GATEWAY_WAN_V6",
    "MARKER_DIR",
    "PUBLIC_PORT",
    "PUBLIC_V4",
    "PUBLIC_V6",
    "SERVER_TUNNEL_V4",
    "SERVER_TUNNEL_V6",
    "WG_RUN_DIR",
    "Lab",
    "LabBackend",
    "LabClient",
    "LabError",
    "LabGateway",
    "Transfer",
    "WgKey",
    "WgPeer",
    "WgShow",
    "cleanup_stale",
    "genkey",
    "main",
    "pubkey",
    "wait_until",
]

log = logging.getLogger(__name__)

# --- addresses and names ------------------------------------------------------------------

PUBLIC_V4: Final = "203.0.113.10"
PUBLIC_V6: Final = "2001:db8::10"
PUBLIC_PORT: Final = 51820
PUBLIC_NET_V4: Final = "203.0.113.0/24"
PUBLIC_NET_V6: Final = "2001:db8::/64"

GATEWAY_WAN_V4: Final = "198.51.100.1"
CLIENT_WAN_V4: Final = "198.51.100.2"
WAN_PREFIXLEN_V4: Final = 24
GATEWAY_WAN_V6: Final = "2001:db8:1::1"
CLIENT_WAN_V6: Final = "2001:db8:1::2"
WAN_PREFIXLEN_V6: Final = 64

GATEWAY_LAN_V4: Final = "10.0.0.1"
GATEWAY_LAN_V6: Final = "fd00::1"
LAN_PREFIXLEN_V4: Final = 24
LAN_PREFIXLEN_V6: Final = 64

SERVER_TUNNEL_V4: Final = "10.99.0.1"
SERVER_TUNNEL_V6: Final = "fd99::1"
CLIENT_TUNNEL_V4: Final = "10.99.0.2"
CLIENT_TUNNEL_V6: Final = "fd99::2"

GATEWAY_WAN_IF: Final = "wan"
GATEWAY_LAN_IF: Final = "br0"
NODE_IF: Final = "eth0"  # the one link of the client and of each backend

BACKEND_NAMES: Final = "abcdefghijklmnopqrstuvwxyz"

WG_RUN_DIR: Final = Path("/var/run/wireguard")
MARKER_DIR: Final = Path("/run/natfail-lab")

_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789"
_ID_LEN: Final = 6
_PREFIX_RE: Final = re.compile(r"[a-z]{1,4}")
_WG_SOCK_RE: Final = re.compile(r"^w[cb]([a-z0-9]{6})\d*\.sock$")
_STOP_GRACE: Final = 2.0
_START_TIMEOUT: Final = 5.0


class LabError(RuntimeError):
    """A command of the lab failed; the message is one line with the command and its stderr."""

    def __init__(
        self, message: str, argv: Sequence[str] = (), returncode: int | None = None
    ) -> None:
        super().__init__(message)
        self.argv: tuple[str, ...] = tuple(argv)
        self.returncode = returncode


# --- keys -----------------------------------------------------------------------------------


def genkey() -> str:
    """A new WireGuard private key, base64, clamped like ``wg genkey``."""
    raw = bytearray(secrets.token_bytes(32))
    raw[0] &= 248
    raw[31] &= 127
    raw[31] |= 64
    return base64.b64encode(bytes(raw)).decode("ascii")


def pubkey(private_b64: str) -> str:
    """The public key of a base64 private key, like ``wg pubkey``."""
    raw = base64.b64decode(private_b64, validate=True)
    if len(raw) != 32:
        raise ValueError("a WireGuard key is 32 bytes")
    pub = X25519PrivateKey.from_private_bytes(raw).public_key().public_bytes_raw()
    return base64.b64encode(pub).decode("ascii")


@dataclass(frozen=True)
class WgKey:
    """A key pair whose private half is also a file (mode 0600) for ``wg set private-key``."""

    private_b64: str
    public_b64: str
    file: Path

    @property
    def private(self) -> bytes:
        return base64.b64decode(self.private_b64)

    @property
    def public(self) -> bytes:
        return base64.b64decode(self.public_b64)


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def _new_key(directory: Path, name: str) -> WgKey:
    private = genkey()
    path = directory / f"{name}.key"
    _write_secret(path, private)
    return WgKey(private_b64=private, public_b64=pubkey(private), file=path)


# --- running commands ---------------------------------------------------------------------


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 10.0,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    cmd = shlex.join(argv)
    try:
        cp = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise LabError(f"{cmd}: timed out after {timeout:g} s", argv) from None
    except OSError as e:
        raise LabError(f"{cmd}: {e.strerror or e}", argv) from None
    if check and cp.returncode != 0:
        detail = one_line(cp.stderr) or one_line(cp.stdout) or "no output"
        raise LabError(f"{cmd}: exit {cp.returncode}: {detail}", argv, cp.returncode)
    return cp


def _ns_argv(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _ip_batch(ns: str, commands: Sequence[str]) -> None:
    """Runs ``ip`` commands in one namespace through one ``ip -batch``."""
    if commands:
        _run(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n")


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.05) -> bool:
    """Polls ``predicate`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# --- processes ----------------------------------------------------------------------------


def _proc_starttime(pid: int) -> str | None:
    """The start time of a process (field 22 of /proc/PID/stat), None if it is gone or a
    zombie (a dead child that nobody has waited for yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) <= 19 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _wg_pids(ifnames: set[str]) -> list[int]:
    """Pids of wireguard-go processes serving any of ``ifnames`` (found through /proc)."""
    pids: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or os.path.basename(argv[0].decode(errors="replace")) != "wireguard-go":
            continue
        if any(a.decode(errors="replace") in ifnames for a in argv[1:]):
            pids.append(int(entry.name))
    return pids


def _ns_pids(ns: str) -> list[int]:
    try:
        cp = _run(["ip", "netns", "pids", ns], check=False, timeout=5.0)
    except LabError:
        return []
    return [int(p) for p in cp.stdout.split() if p.isdigit()]


def _kill_pids(pids: Sequence[int], grace: float = _STOP_GRACE) -> None:
    """SIGTERM (and SIGCONT, for paused ones), then SIGKILL whatever is left after ``grace``."""
    alive = {pid: _proc_starttime(pid) for pid in pids if pid != os.getpid()}
    alive = {pid: st for pid, st in alive.items() if st is not None}
    for pid in alive:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)

    def gone() -> bool:
        return all(_proc_starttime(pid) != st for pid, st in alive.items())

    if not wait_until(gone, grace):
        for pid, st in alive.items():
            if _proc_starttime(pid) == st:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        wait_until(gone, 1.0)


def _remove_sockets(ifnames: set[str]) -> None:
    for ifname in ifnames:
        with contextlib.suppress(OSError):
            (WG_RUN_DIR / f"{ifname}.sock").unlink()


def _netns_list() -> list[str]:
    try:
        cp = _run(["ip", "netns", "list"], check=False, timeout=5.0)
    except LabError:
        return []
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def _destroy(namespaces: Sequence[str], ifnames: set[str], paths: Sequence[Path]) -> None:
    """Kills, unlinks and deletes everything given; logs problems, never raises."""
    try:
        pids = set(_wg_pids(ifnames))
        for ns in namespaces:
            pids.update(_ns_pids(ns))
        _kill_pids(sorted(pids))
    except Exception as e:
        log.warning("lab cleanup: killing processes: %s", e)
    _remove_sockets(ifnames)
    existing = set(_netns_list())
    for ns in namespaces:
        if ns in existing:
            try:
                _run(["ip", "netns", "del", ns], timeout=5.0)
            except Exception as e:
                log.warning("lab cleanup: %s", e)
    for path in paths:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except Exception as e:
            log.warning("lab cleanup: removing %s: %s", path, e)


def _marker_path(lab_id: str) -> Path:
    return MARKER_DIR / f"{lab_id}.json"


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _marker_alive(data: dict[str, Any]) -> bool:
    pid = data.get("pid")
    return isinstance(pid, int) and _proc_starttime(pid) == data.get("starttime")


def _list_str(data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key)
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _tmpdirs_of(lab_id: str) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"natfail-lab-{lab_id}-*"))


def cleanup_stale(prefix: str = "nf") -> list[str]:
    """Removes what dead labs left behind; returns the ids of the labs it cleaned.

    A lab is dead when the process that built it (pid and start time in its
    marker file under /run/natfail-lab/) is gone. Namespaces named
    ``<prefix><id>-...`` and wireguard-go sockets ``wc<id>``/``wb<id>N`` whose lab
    has no marker at all are leftovers too. Labs of live processes are never
    touched. Never raises.
    """
    cleaned: list[str] = []
    try:
        ns_re = re.compile(rf"^{re.escape(prefix)}([a-z0-9]{{{_ID_LEN}}})-(?:gw|cl|b\d+)$")
        markers = sorted(MARKER_DIR.glob("*.json")) if MARKER_DIR.is_dir() else []
        for path in markers:
            data = _read_marker(path)
            if data is None or _marker_alive(data):
                continue
            if data.get("prefix") != prefix:
                continue
            lab_id = path.stem
            namespaces = _list_str(data, "namespaces")
            paths = [Path(p) for p in _list_str(data, "paths")] + _tmpdirs_of(lab_id)
            _destroy(namespaces, set(_list_str(data, "ifnames")), [*paths, path])
            cleaned.append(lab_id)

        # Leftovers without a marker: a marker is written before anything else of a
        # lab exists and removed after everything else, so "no marker" means dead.
        orphans: dict[str, tuple[list[str], set[str]]] = {}
        for ns in _netns_list():
            m = ns_re.match(ns)
            if m:
                orphans.setdefault(m.group(1), ([], set()))[0].append(ns)
        if WG_RUN_DIR.is_dir():
            for sock in WG_RUN_DIR.iterdir():
                m = _WG_SOCK_RE.match(sock.name)
                if m:
                    orphans.setdefault(m.group(1), ([], set()))[1].add(sock.name[: -len(".sock")])
        for lab_id, (namespaces, ifnames) in sorted(orphans.items()):
            if _marker_path(lab_id).exists():
                continue
            _destroy(namespaces, ifnames, _tmpdirs_of(lab_id))
            if lab_id not in cleaned:
                cleaned.append(lab_id)
    except Exception as e:
        log.warning("lab cleanup_stale: %s", e)
    return cleaned


# --- wg show ------------------------------------------------------------------------------


class Transfer(NamedTuple):
    """Bytes a WireGuard interface received from / sent to one peer."""

    rx: int
    tx: int


@dataclass(frozen=True)
class WgPeer:
    public_key: str
    preshared_key: bool
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    latest_handshake: int  # unix seconds, 0 = never
    rx: int
    tx: int
    keepalive: int | None


@dataclass(frozen=True)
class WgShow:
    """One interface as ``wg show IF dump`` describes it."""

    ifname: str
    public_key: str
    listen_port: int
    peers: dict[str, WgPeer]


def _parse_dump(ifname: str, text: str) -> WgShow:
    lines = [line.split("\t") for line in text.splitlines() if line.strip()]
    if not lines or len(lines[0]) < 3:
        raise LabError(f"wg show {ifname} dump: unexpected output: {one_line(text)!r}")
    head = lines[0]
    peers: dict[str, WgPeer] = {}
    for f in lines[1:]:
        if len(f) < 8:
            continue
        peers[f[0]] = WgPeer(
            public_key=f[0],
            preshared_key=f[1] != "(none)",
            endpoint=None if f[2] == "(none)" else f[2],
            allowed_ips=() if f[3] == "(none)" else tuple(f[3].split(",")),
            latest_handshake=int(f[4]),
            rx=int(f[5]),
            tx=int(f[6]),
            keepalive=None if f[7] in ("off", "0") else int(f[7]),
        )
    return WgShow(ifname=ifname, public_key=head[1], listen_port=int(head[2]), peers=peers)


# --- nodes --------------------------------------------------------------------------------


class _HasNs(Protocol):
    @property
    def ns(self) -> str: ...


NsLike = str | _HasNs


def _ns_name(ns: NsLike) -> str:
    return ns if isinstance(ns, str) else ns.ns


@dataclass(frozen=True)
class LabGateway:
    """The gateway namespace: owns the public addresses, routes between wan and br0."""

    ns: str
    wan_if: str = GATEWAY_WAN_IF
    lan_if: str = GATEWAY_LAN_IF
    wan_v4: str = GATEWAY_WAN_V4
    wan_v6: str = GATEWAY_WAN_V6
    lan_v4: str = GATEWAY_LAN_V4
    lan_v6: str = GATEWAY_LAN_V6


@dataclass(frozen=True)
class LabClient:
    """The client namespace with its wireguard-go interface."""

    ns: str
    wg_if: str
    v4: str = CLIENT_WAN_V4
    v6: str = CLIENT_WAN_V6
    tunnel_v4: str = CLIENT_TUNNEL_V4
    tunnel_v6: str = CLIENT_TUNNEL_V6


class _WgProcess:
    """One foreground wireguard-go in a namespace."""

    def __init__(self, ns: str, ifname: str, log_path: Path, log_level: str) -> None:
        self.ns = ns
        self.ifname = ifname
        self.log_path = log_path
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def socket(self) -> Path:
        return WG_RUN_DIR / f"{self.ifname}.sock"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        if self.running:
            raise RuntimeError(f"wireguard-go {self.ifname} is already running")
        env = dict(os.environ, WG_PROCESS_FOREGROUND="1", LOG_LEVEL=self.log_level)
        self.paused = False
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(
                _ns_argv(self.ns, ["wireguard-go", "-f", self.ifname]),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = _START_TIMEOUT) -> None:
        def ready() -> bool:
            return self.socket.exists() or not self.running

        wait_until(ready, timeout, 0.01)
        if not self.running or not self.socket.exists():
            tail = ""
            with contextlib.suppress(OSError):
                tail = one_line(self.log_path.read_text(errors="replace")[-500:])
            state = "exited" if not self.running else "has no control socket"
            raise LabError(
                f"wireguard-go {self.ifname} in {self.ns} {state} after start: {tail or 'no log'}",
                ["wireguard-go", "-f", self.ifname],
            )

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            # ip netns exec execs wireguard-go, so this pid is wireguard-go itself.
            _kill_pids([proc.pid])
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1.0)
        elif proc is not None:
            proc.poll()
        self.paused = False
        _remove_sockets({self.ifname})

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"wireguard-go {self.ifname} is not running")
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGSTOP:
            self.paused = True
        elif sig == signal.SIGCONT:
            self.paused = False


@dataclass
class LabBackend:
    """One backend namespace with its wireguard-go (port 51820, the shared server key)."""

    name: str
    index: int
    ns: str
    wg_if: str
    v4: str
    v6: str | None
    port: int = PUBLIC_PORT
    tunnel_v4: str = SERVER_TUNNEL_V4
    tunnel_v6: str = SERVER_TUNNEL_V6
    _lab: Lab | None = field(default=None, repr=False, compare=False)
    _wg: _WgProcess | None = field(default=None, repr=False, compare=False)

    @property
    def address(self) -> str:
        """``10.0.0.2:51820``, as natfail's config wants a backend address."""
        return f"{self.v4}:{self.port}"

    @property
    def address_v6(self) -> str | None:
        return f"[{self.v6}]:{self.port}" if self.v6 else None

    @property
    def running(self) -> bool:
        return self._wg is not None and self._wg.running

    @property
    def paused(self) -> bool:
        return self.running and self._wg is not None and self._wg.paused

    @property
    def pid(self) -> int | None:
        return self._wg.proc.pid if self._wg and self._wg.proc and self.running else None

    def stop(self) -> None:
        """Kills the backend's wireguard-go: a dead backend (UDP port closed, no interface)."""
        if self._wg is not None:
            self._wg.stop()

    def start(self) -> None:
        """Starts wireguard-go again with the same configuration (fresh sessions)."""
        if self._lab is None:
            raise RuntimeError("backend does not belong to a lab")
        self._lab._start_backends([self])

    def pause(self) -> None:
        """SIGSTOP: a hung backend; packets queue, nothing answers, no ICMP error. Its
        control socket does not answer either, so the lab reports no counters for it."""
        if self._wg is None:
            raise RuntimeError("backend was never started")
        self._wg.signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._wg is None:
            raise RuntimeError("backend was never started")
        self._wg.signal(signal.SIGCONT)


# --- the lab ------------------------------------------------------------------------------


def _new_id() -> str:
    while True:
        lab_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LEN))
        if not _marker_path(lab_id).exists() and not _tmpdirs_of(lab_id):
            return lab_id


class Lab:
    """A client, a gateway and N backends in network namespaces, with real WireGuard.

    Building happens in the constructor (``Lab(...)``); use it
    as a context manager or call :meth:`close` (idempotent, never raises, also
    registered with atexit).
    """

    public_v4: Final = PUBLIC_V4
    public_v6: Final = PUBLIC_V6
    public_port: Final = PUBLIC_PORT

    def __init__(
        self,
        backends: int = 2,
        *,
        keepalive: int | None = None,
        ipv6: bool = True,
        client_endpoint_family: int = 4,
        preshared_key: bool = False,
        prefix: str = "nf",
        wg_log_level: str = "error",
        clean_stale: bool = True,
    ) -> None:
        if isinstance(backends, bool) or not isinstance(backends, int):
            raise TypeError("backends must be an int")
        if not 1 <= backends <= len(BACKEND_NAMES):
            raise ValueError(f"backends must be 1..{len(BACKEND_NAMES)}, not {backends}")
        if keepalive is not None and not 1 <= keepalive <= 65535:
            raise ValueError("keepalive must be None or 1..65535 seconds")
        if client_endpoint_family not in (4, 6):
            raise ValueError("client_endpoint_family must be 4 or 6")
        if client_endpoint_family == 6 and not ipv6:
            raise ValueError("client_endpoint_family=6 needs ipv6=True")
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError("prefix must be 1-4 lowercase letters")
        if wg_log_level not in ("verbose", "error", "silent"):
            raise ValueError("wg_log_level must be verbose, error or silent")

        self.keepalive = keepalive
        self.ipv6 = ipv6
        self.client_endpoint_family = client_endpoint_family
        self.prefix = prefix
        self._log_level = wg_log_level
        self._closed = False
        self._owner_pid = os.getpid()
        self._popens: list[subprocess.Popen[str]] = []

        if clean_stale:
            cleanup_stale(prefix)
        self.id = _new_id()
        base = f"{prefix}{self.id}"
        self.gateway = LabGateway(ns=f"{base}-gw")
        self.client = LabClient(ns=f"{base}-cl", wg_if=f"wc{self.id}")
        self.backends: list[LabBackend] = [
            LabBackend(
                name=BACKEND_NAMES[i],
                index=i,
                ns=f"{base}-b{i}",
                wg_if=f"wb{self.id}{i}",
                v4=f"10.0.0.{i + 2}",
                v6=f"fd00::{i + 2:x}" if ipv6 else None,
                _lab=self,
            )
            for i in range(backends)
        ]
        self.namespaces: list[str] = [self.gateway.ns, self.client.ns] + [
            b.ns for b in self.backends
        ]
        self.ifnames: set[str] = {self.client.wg_if} | {b.wg_if for b in self.backends}
        self.dir = Path(tempfile.mkdtemp(prefix=f"natfail-lab-{self.id}-"))
        atexit.register(self._close_at_exit)
        try:
            self._write_marker()
            self.server_key = _new_key(self.dir, "server")
            self.client_key = _new_key(self.dir, "client")
            self.probe_key = _new_key(self.dir, "probe")
            self.psk: str | None = None
            self.psk_file: Path | None = None
            if preshared_key:
                self.psk = genkey()
                self.psk_file = self.dir / "probe.psk"
                _write_secret(self.psk_file, self.psk)
            self._client_wg = _WgProcess(
                self.client.ns, self.client.wg_if, self.dir / "client.log", wg_log_level
            )
            for b in self.backends:
                b._wg = _WgProcess(b.ns, b.wg_if, self.dir / f"backend-{b.name}.log", wg_log_level)
            self._build_network()
            self._start_backends(self.backends)
            self._start_client()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "up"
        return f"<Lab {self.id} {state}: {len(self.backends)} backends>"

    # -- building ---------------------------------------------------------------------------

    def _write_marker(self) -> None:
        MARKER_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        data = {
            "id": self.id,
            "prefix": self.prefix,
            "pid": os.getpid(),
            "starttime": _proc_starttime(os.getpid()),
            "namespaces": self.namespaces,
            "ifnames": sorted(self.ifnames),
            "paths": [str(self.dir)],
            "created": time.time(),
        }
        tmp = MARKER_DIR / f".{self.id}.tmp"
        tmp.write_text(json.dumps(data))
        tmp.replace(_marker_path(self.id))

    def _build_network(self) -> None:
        v6 = self.ipv6
        for ns in self.namespaces:
            _run(["ip", "netns", "add", ns])
        for ns in self.namespaces:
            sysctls = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
            if v6:
                sysctls += ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]
            if ns == self.gateway.ns:
                sysctls.append("net.ipv4.ip_forward=1")
                if v6:
                    sysctls.append("net.ipv6.conf.all.forwarding=1")
            _run(_ns_argv(ns, ["sysctl", "-q", "-w", *sysctls]))

        gw, cl = self.gateway, self.client
        cmds = [
            "link set lo up",
            f"link add {gw.wan_if} type veth peer name {NODE_IF} netns {cl.ns}",
            f"addr add {gw.wan_v4}/{WAN_PREFIXLEN_V4} dev {gw.wan_if}",
            f"addr add {PUBLIC_V4}/32 dev {gw.wan_if}",
            f"link add {gw.lan_if} type bridge stp_state 0 mcast_snooping 0",
            f"addr add {gw.lan_v4}/{LAN_PREFIXLEN_V4} dev {gw.lan_if}",
        ]
        if v6:
            cmds += [
                f"addr add {gw.wan_v6}/{WAN_PREFIXLEN_V6} dev {gw.wan_if} nodad",
                f"addr add {PUBLIC_V6}/128 dev {gw.wan_if} nodad",
                f"addr add {gw.lan_v6}/{LAN_PREFIXLEN_V6} dev {gw.lan_if} nodad",
            ]
        cmds += [f"link set {gw.wan_if} up", f"link set {gw.lan_if} up"]
        for b in self.backends:
            port = f"vb{b.index}"
            cmds += [
                f"link add {port} type veth peer name {NODE_IF} netns {b.ns}",
                f"link set {port} master {gw.lan_if}",
                f"link set {port} up",
            ]
        _ip_batch(gw.ns, cmds)

        cmds = [
            "link set lo up",
            f"addr add {cl.v4}/{WAN_PREFIXLEN_V4} dev {NODE_IF}",
            f"link set {NODE_IF} up",
            f"route add {PUBLIC_NET_V4} via {gw.wan_v4}",
        ]
        if v6:
            cmds[2:2] = [f"addr add {cl.v6}/{WAN_PREFIXLEN_V6} dev {NODE_IF} nodad"]
            cmds.append(f"route add {PUBLIC_NET_V6} via {gw.wan_v6}")
        _ip_batch(cl.ns, cmds)

        for b in self.backends:
            cmds = [
                "link set lo up",
                f"addr add {b.v4}/{LAN_PREFIXLEN_V4} dev {NODE_IF}",
                f"link set {NODE_IF} up",
                f"route add default via {gw.lan_v4}",
            ]
            if b.v6:
                cmds[2:2] = [f"addr add {b.v6}/{LAN_PREFIXLEN_V6} dev {NODE_IF} nodad"]
                cmds.append(f"route add ::/0 via {gw.lan_v6}")
            _ip_batch(b.ns, cmds)

    def _tunnel_cmds(self, ifname: str, v4: str, v6: str) -> list[str]:
        cmds = [f"addr add {v4}/24 dev {ifname}"]
        if self.ipv6:
            # like the kernel module: no link-local address, no router solicitations
            cmds = [f"link set {ifname} addrgenmode none", *cmds]
            cmds.append(f"addr add {v6}/64 dev {ifname} nodad")
        cmds.append(f"link set {ifname} up")
        return cmds

    def _start_backends(self, backends: Sequence[LabBackend]) -> None:
        self._check_open()
        started: list[LabBackend] = []
        for b in backends:
            assert b._wg is not None
            b._wg.spawn()
            started.append(b)
        client_ips = f"{CLIENT_TUNNEL_V4}/32" + (f",{CLIENT_TUNNEL_V6}/128" if self.ipv6 else "")
        for b in started:
            assert b._wg is not None
            b._wg.wait_ready()
            argv = [
                "wg", "set", b.wg_if,
                "listen-port", str(b.port),
                "private-key", str(self.server_key.file),
                "peer", self.client_key.public_b64, "allowed-ips", client_ips,
                "peer", self.probe_key.public_b64,
            ]  # fmt: skip
            if self.psk_file is not None:
                argv += ["preshared-key", str(self.psk_file)]
            _run(_ns_argv(b.ns, argv))
            _ip_batch(b.ns, self._tunnel_cmds(b.wg_if, SERVER_TUNNEL_V4, SERVER_TUNNEL_V6))

    def _endpoint(self, family: int) -> str:
        return f"[{PUBLIC_V6}]:{PUBLIC_PORT}" if family == 6 else f"{PUBLIC_V4}:{PUBLIC_PORT}"

    def _client_peer_argv(self) -> list[str]:
        allowed = "10.99.0.0/24" + (",fd99::/64" if self.ipv6 else "")
        argv = [
            "wg", "set", self.client.wg_if,
            "peer", self.server_key.public_b64,
            "endpoint", self._endpoint(self.client_endpoint_family),
            "allowed-ips", allowed,
        ]  # fmt: skip
        if self.keepalive is not None:
            argv += ["persistent-keepalive", str(self.keepalive)]
        return argv

    def _start_client(self) -> None:
        self._client_wg.spawn()
        self._client_wg.wait_ready()
        cl = self.client
        _run(self._ns(cl, ["wg", "set", cl.wg_if, "private-key", str(self.client_key.file)]))
        _run(self._ns(cl, self._client_peer_argv()))
        _ip_batch(cl.ns, self._tunnel_cmds(cl.wg_if, CLIENT_TUNNEL_V4, CLIENT_TUNNEL_V6))

    def _ns(self, ns: NsLike, argv: Sequence[str]) -> list[str]:
        return _ns_argv(_ns_name(ns), argv)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"lab {self.id} is closed")

    # -- running things -------------------------------------------------------------------

    def exec(
        self,
        ns: NsLike,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 10.0,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs ``argv`` in a namespace of this lab (``ip netns exec``; no shell). ``env``
        adds to (and overrides) the current environment."""
        self._check_open()
        if isinstance(argv, str):
            raise TypeError("argv must be a sequence of arguments, not a string")
        name = _ns_name(ns)
        if name not in self.namespaces:
            raise ValueError(f"{name} is not a namespace of lab {self.id}")
        full_env = None if env is None else {**os.environ, **env}
        return _run(self._ns(name, argv), check=check, timeout=timeout, input=input, env=full_env)

    def popen(
        self,
        ns: NsLike,
        argv: Sequence[str],
        *,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[str]:
        """Starts ``argv`` in a namespace (text mode, own session); the lab kills it on
        close. ``env`` adds to (and overrides) the current environment."""
        self._check_open()
        if isinstance(argv, str):
            raise TypeError("argv must be a sequence of arguments, not a string")
        name = _ns_name(ns)
        if name not in self.namespaces:
            raise ValueError(f"{name} is not a namespace of lab {self.id}")
        proc = subprocess.Popen(
            self._ns(name, argv),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=None if env is None else {**os.environ, **env},
            text=True,
            start_new_session=True,
        )
        self._popens.append(proc)
        return proc

    def backend(self, name: str) -> LabBackend:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(f"lab {self.id} has no backend {name!r}")

    # -- WireGuard state -------------------------------------------------------------------

    def wg_show(self, ns: NsLike, ifname: str) -> WgShow:
        """``wg show IFNAME dump`` in a namespace, parsed."""
        cp = self.exec(ns, ["wg", "show", ifname, "dump"])
        return _parse_dump(ifname, cp.stdout)

    def client_show(self) -> WgShow:
        return self.wg_show(self.client, self.client.wg_if)

    def backend_show(self, backend: LabBackend | str) -> WgShow:
        b = self.backend(backend) if isinstance(backend, str) else backend
        return self.wg_show(b, b.wg_if)

    def client_endpoint(self) -> str | None:
        """The server endpoint the client's WireGuard uses now, e.g. ``203.0.113.10:51820``."""
        peer = self.client_show().peers.get(self.server_key.public_b64)
        return peer.endpoint if peer else None

    def latest_handshake(self, backend: LabBackend | str, peer: str = "client") -> int:
        """Unix time of a backend's latest handshake with ``peer`` ("client", "probe" or a
        base64 public key); 0 for never or for a backend that is stopped or paused."""
        b = self.backend(backend) if isinstance(backend, str) else backend
        if not b.running or b.paused:
            return 0
        key = {"client": self.client_key.public_b64, "probe": self.probe_key.public_b64}.get(
            peer, peer
        )
        p = self.backend_show(b).peers.get(key)
        return p.latest_handshake if p else 0

    def transfers(self) -> dict[str, Transfer]:
        """Per backend name, the bytes its WireGuard exchanged with the client
        (0, 0 for a stopped or paused backend; counters restart with the process)."""
        out: dict[str, Transfer] = {}
        for b in self.backends:
            t = Transfer(0, 0)
            if b.running and not b.paused:
                p = self.backend_show(b).peers.get(self.client_key.public_b64)
                if p:
                    t = Transfer(p.rx, p.tx)
            out[b.name] = t
        return out

    def carrying_backends(self, before: dict[str, Transfer]) -> list[str]:
        """Names of the backends that received client traffic since ``before`` (a
        :meth:`transfers` snapshot). A counter that went down means a restart."""
        now = self.transfers()
        names = []
        for name, t in now.items():
            old = before.get(name, Transfer(0, 0))
            grew = t.rx > old.rx if t.rx >= old.rx else t.rx > 0
            if grew:
                names.append(name)
        return names

    # -- client actions --------------------------------------------------------------------

    def client_ping(
        self,
        target: str = SERVER_TUNNEL_V4,
        count: int = 3,
        interval: float = 0.2,
        timeout: float = 5.0,
    ) -> bool:
        """Pings ``target`` from the client namespace (through the tunnel for 10.99.0.1 or
        fd99::1); True when ``count`` replies came back within ``timeout`` seconds."""
        if count < 1 or interval <= 0 or timeout <= 0:
            raise ValueError("count must be >= 1, interval and timeout > 0")
        argv = [
            "ping", "-n", "-q",
            "-c", str(count),
            "-i", f"{interval:g}",
            "-w", str(max(1, int(timeout + 0.999))),
            target,
        ]  # fmt: skip
        cp = self.exec(self.client, argv, check=False, timeout=timeout + 5.0)
        m = re.search(r"(\d+) (?:packets )?received", cp.stdout)
        return m is not None and int(m.group(1)) >= count

    def client_rehandshake(self) -> None:
        """Makes the client forget its session, so its next packet starts a handshake at
        once (removes and re-adds the server peer). Without this, a client whose backend
        changed only re-handshakes after ~15 s without replies, and a client whose
        handshake went unanswered retries every 5 s."""
        cl = self.client
        self.exec(cl, ["wg", "set", cl.wg_if, "peer", self.server_key.public_b64, "remove"])
        self.exec(cl, self._client_peer_argv())

    def reset_sessions(self) -> None:
        """Fresh WireGuard state everywhere: restarts every running backend's wireguard-go
        and makes the client forget its session and any roamed endpoint.

        Useful between tests that share a lab: a backend that carried traffic and then
        stopped hearing from the client (because the DNAT moved away) initiates a
        handshake towards the client about 15 s later; without natfail's SNAT that
        packet reaches the client from the backend's private address and the client
        roams its endpoint there."""
        running = [b for b in self.backends if b.running]
        for b in running:
            b.stop()
        self._start_backends(running)
        self.client_rehandshake()

    def set_client_endpoint(self, family: int) -> None:
        """Points the client's peer at the public IPv4 (4) or IPv6 (6) address:port."""
        if family not in (4, 6) or (family == 6 and not self.ipv6):
            raise ValueError("family must be 4, or 6 in a lab with ipv6")
        self.client_endpoint_family = family
        cl = self.client
        argv = ["wg", "set", cl.wg_if, "peer", self.server_key.public_b64]
        self.exec(cl, [*argv, "endpoint", self._endpoint(family)])

    # -- gateway helpers -------------------------------------------------------------------

    def write_config(
        self,
        path: Path | None = None,
        *,
        firewall: str = "nftables",
        service: str = "wg0",
        extra_service: str = "",
    ) -> Path:
        """A natfail config for this lab (one service, every backend, priorities
        descending from a), state and socket under the lab's directory."""
        path = path or self.dir / "natfail.toml"
        state = self.dir / "state"
        state.mkdir(mode=0o700, exist_ok=True)
        lines = [
            "[daemon]",
            f'firewall = "{firewall}"',
            f'socket = "{self.dir / "natfail.sock"}"',
            f'state_dir = "{state}"',
            "",
            "[probe]",
            f'private_key_file = "{self.probe_key.file}"',
            "",
            "[[service]]",
            f'name = "{service}"',
            f'public = "{PUBLIC_V4}:{PUBLIC_PORT}"',
            f'server_public_key = "{self.server_key.public_b64}"',
        ]
        if self.psk_file is not None:
            lines.append(f'preshared_key_file = "{self.psk_file}"')
        if extra_service:
            lines.append(extra_service)
        for i, b in enumerate(self.backends):
            lines += [
                "",
                "[[service.backend]]",
                f'name = "{b.name}"',
                f'address = "{b.address}"',
                f"priority = {100 - 10 * i}",
            ]
        path.write_text("\n".join(lines) + "\n")
        return path

    def set_static_dnat(self, v4: LabBackend | None, v6: LabBackend | None = None) -> None:
        """Points public:51820 at the given backend(s) with a fixed DNAT in tables of the
        lab's own (``ip labstatic`` / ``ip6 labstatic``), replaced in one nft transaction;
        None removes it. Not natfail: scaffolding for tests that prove the lab itself."""
        table = "labstatic"
        script = [f"table ip {table} {{}}", f"delete table ip {table}"]
        if self.ipv6:
            script += [f"table ip6 {table} {{}}", f"delete table ip6 {table}"]
        chain = "type nat hook prerouting priority dstnat; policy accept;"
        if v4 is not None:
            script.append(
                f"table ip {table} {{\n chain pre {{\n  {chain}\n"
                f"  ip daddr {PUBLIC_V4} udp dport {PUBLIC_PORT} dnat to {v4.address}\n }}\n}}"
            )
        if v6 is not None:
            script.append(
                f"table ip6 {table} {{\n chain pre {{\n  {chain}\n"
                f"  ip6 daddr {PUBLIC_V6} udp dport {PUBLIC_PORT} dnat to {v6.address_v6}\n }}\n}}"
            )
        self.exec(self.gateway, ["nft", "-f", "-"], input="\n".join(script) + "\n")

    def flush_conntrack(self) -> None:
        """Empties the gateway's conntrack table (IPv4 and IPv6)."""
        for family in ("ipv4", "ipv6") if self.ipv6 else ("ipv4",):
            self.exec(self.gateway, ["conntrack", "-F", "-f", family], timeout=5.0)

    def describe(self) -> str:
        lines = [
            f"lab {self.id}: gateway {self.gateway.ns} (public {PUBLIC_V4}"
            + (f", {PUBLIC_V6}" if self.ipv6 else "")
            + f" port {PUBLIC_PORT}, wan if {self.gateway.wan_if}, lan if {self.gateway.lan_if})",
            f"  client {self.client.ns} wg {self.client.wg_if} tunnel {CLIENT_TUNNEL_V4}"
            f" -> endpoint {self._endpoint(self.client_endpoint_family)}",
        ]
        for b in self.backends:
            v6 = f" {b.address_v6}" if b.address_v6 else ""
            lines.append(f"  backend {b.name}: {b.ns} wg {b.wg_if} {b.address}{v6}")
        lines += [
            f"  server public key {self.server_key.public_b64}",
            f"  probe public key  {self.probe_key.public_b64} (private key file"
            f" {self.probe_key.file})",
        ]
        if self.psk_file:
            lines.append(f"  probe preshared key file {self.psk_file}")
        return "\n".join(lines)

    # -- teardown --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def _close_at_exit(self) -> None:
        # a forked child inherits atexit handlers: only the process that built the lab
        # tears it down at exit
        if os.getpid() == self._owner_pid:
            self.close()

    def close(self) -> None:
        """Kills every process, removes sockets, namespaces, the temp dir and the marker.

        Idempotent; never raises."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self._close_at_exit)
        procs: list[_WgProcess] = []
        if hasattr(self, "_client_wg"):
            procs.append(self._client_wg)
        procs += [b._wg for b in self.backends if b._wg is not None]
        pids = [p.proc.pid for p in procs if p.proc is not None and p.proc.poll() is None]
        pids += [p.pid for p in self._popens if p.poll() is None]
        try:
            _kill_pids(pids)
        except Exception as e:
            log.warning("lab %s close: %s", self.id, e)
        for w in procs:
            if w.proc is not None:
                with contextlib.suppress(Exception):
                    w.proc.wait(0.5)
        for p in self._popens:
            with contextlib.suppress(Exception):
                p.wait(0.5)
        _destroy(self.namespaces, self.ifnames, [self.dir])
        with contextlib.suppress(Exception):
            _marker_path(self.id).unlink(missing_ok=True)


# --- command line -------------------------------------------------------------------------


def _cmd_up(args: argparse.Namespace) -> int:
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with Lab(
        args.backends,
        keepalive=args.keepalive,
        ipv6=not args.no_ipv6,
        preshared_key=args.psk,
    ) as lab:
        print(lab.describe(), flush=True)
        print("up; Ctrl-C or SIGTERM tears it down", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    markers = sorted(MARKER_DIR.glob("*.json")) if MARKER_DIR.is_dir() else []
    for path in markers:
        data = _read_marker(path) or {}
        state = "live" if _marker_alive(data) else "dead"
        print(
            f"{path.stem} pid {data.get('pid')} {state}: {' '.join(_list_str(data, 'namespaces'))}"
        )
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    cleaned = cleanup_stale(args.prefix)
    print(f"removed {len(cleaned)} dead lab(s)" + (f": {' '.join(cleaned)}" if cleaned else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m natfail.lab", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build a lab and keep it until interrupted")
    up.add_argument("--backends", type=int, default=2)
    up.add_argument("--keepalive", type=int, default=None)
    up.add_argument("--no-ipv6", action="store_true")
    up.add_argument("--psk", action="store_true", help="give the probe peer a preshared key")
    up.set_defaults(func=_cmd_up)
    ls = sub.add_parser("list", help="list labs and whether their owner lives")
    ls.set_defaults(func=_cmd_list)
    down = sub.add_parser("down", help="remove leftovers of dead labs")
    down.add_argument("--prefix", default="nf")
    down.set_defaults(func=_cmd_down)
    args = parser.parse_args(argv)
    try:
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except (LabError, ValueError, RuntimeError) as e:
        print(f"natfail.lab: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
