"""WireGuard in the lab: keys and key files, wireguard-go processes, the ``wg set``
lines that configure them, and ``wg show dump`` parsed.

wireguard-go facts this module lives with: its control socket is
``/var/run/wireguard/<ifname>.sock``, a directory shared by all namespaces, so
interface names are unique system-wide; deleting a namespace does not stop a
wireguard-go inside it; SIGTERM removes its socket and interface, SIGKILL
leaves the socket file behind."""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from nacl.bindings import crypto_scalarmult_base

from natfail.lab.processes import LabError, kill_pids, ns_argv, wait_until
from natfail.oneline import one_line

WG_RUN_DIR: Final = Path("/var/run/wireguard")
START_TIMEOUT: Final = 5.0

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
    pub = crypto_scalarmult_base(raw)  # clamps the scalar, as X25519 does
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


def write_secret(path: Path, text: str) -> None:
    """``text`` as a new file only its owner can read (refuses to overwrite one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def new_key(directory: Path, name: str) -> WgKey:
    private = genkey()
    path = directory / f"{name}.key"
    write_secret(path, private)
    return WgKey(private_b64=private, public_b64=pubkey(private), file=path)


# --- wg set and ip lines ----------------------------------------------------------------------


def tunnel_cmds(ifname: str, v4: str, v6: str | None) -> list[str]:
    """``ip`` lines giving a WireGuard interface its tunnel addresses (``v6`` None: IPv4 only)."""
    cmds = [f"addr add {v4}/24 dev {ifname}"]
    if v6 is not None:
        # like the kernel module: no link-local address, no router solicitations
        cmds = [f"link set {ifname} addrgenmode none", *cmds]
        cmds.append(f"addr add {v6}/64 dev {ifname} nodad")
    cmds.append(f"link set {ifname} up")
    return cmds


def server_argv(
    ifname: str,
    port: int,
    private_key: Path,
    client: str,
    client_ips: str,
    probe: str,
    probe_psk: Path | None,
) -> list[str]:
    """``wg set`` for a backend: the server key on ``port``, the client as a peer with its
    tunnel addresses, the probe key as a peer without any (its preshared key if given)."""
    argv = [
        "wg", "set", ifname,
        "listen-port", str(port),
        "private-key", str(private_key),
        "peer", client, "allowed-ips", client_ips,
        "peer", probe,
    ]  # fmt: skip
    if probe_psk is not None:
        argv += ["preshared-key", str(probe_psk)]
    return argv


def client_peer_argv(
    ifname: str, server: str, endpoint: str, allowed: str, keepalive: int | None
) -> list[str]:
    """``wg set`` for the client's one peer, the server at ``endpoint``."""
    argv = [
        "wg", "set", ifname,
        "peer", server,
        "endpoint", endpoint,
        "allowed-ips", allowed,
    ]  # fmt: skip
    if keepalive is not None:
        argv += ["persistent-keepalive", str(keepalive)]
    return argv


# --- wg show --------------------------------------------------------------------------------


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


def parse_dump(ifname: str, text: str) -> WgShow:
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


# --- wireguard-go processes -------------------------------------------------------------------


def wg_pids(ifnames: set[str]) -> list[int]:
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


def remove_sockets(ifnames: set[str]) -> None:
    for ifname in ifnames:
        with contextlib.suppress(OSError):
            (WG_RUN_DIR / f"{ifname}.sock").unlink()


class WgProcess:
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
                ns_argv(self.ns, ["wireguard-go", "-f", self.ifname]),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
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
            kill_pids([proc.pid])
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1.0)
        elif proc is not None:
            proc.poll()
        self.paused = False
        remove_sockets({self.ifname})

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"wireguard-go {self.ifname} is not running")
        os.kill(self.proc.pid, sig)
        if sig == signal.SIGSTOP:
            self.paused = True
        elif sig == signal.SIGCONT:
            self.paused = False
