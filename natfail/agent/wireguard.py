"""The backend side of the agent: read a WireGuard interface, and make it start a
handshake towards chosen clients now.

Two ways in, one model out: :class:`Uapi` speaks the text protocol of a UAPI
socket (``/var/run/wireguard/NAME.sock``; ``get=1`` / ``set=1`` of wireguard-go's
``device/uapi.go``, keys in hex) and :class:`WgTool` runs ``wg show NAME dump`` and
``wg set`` (keys in base64) for the kernel module; ``wg`` talks UAPI to
wireguard-go too. Parsing is strict: a peer with a field it cannot read in full
is left out (it must never be removed and re-added with settings missing), a
broken interface line raises :class:`WireGuardError`.

Activation, from the sources of wireguard-go (``device/uapi.go``, ``send.go``,
``peer.go``) and of the kernel (``drivers/net/wireguard/netlink.c``, ``send.c``,
``peer.c``):

* setting an endpoint starts nothing;
* persistent-keepalive going from 0 to N sends a keepalive at once (wireguard-go:
  ``pkaOn`` then ``SendKeepalive`` in ``handlePostConfig``; kernel:
  ``send_keepalive`` in ``set_peer``). The keepalive is staged, and staged packets
  become a handshake initiation only when the peer holds no valid keypair;
* a backend that was active less than 180 s ago (REJECT_AFTER_TIME) still holds
  one and would send the keepalive on the stale keys, which the client, now in
  a session with another backend, drops; and a peer sends at most one
  initiation per 5 s (REKEY_TIMEOUT, ``lastSentHandshake``);
* a peer that holds no session is kicked in place: its endpoint set and its
  keepalive taken from 0 to :data:`KICK_KEEPALIVE` (or, when it has its own
  keepalive N, to 0 and back to N in a second section for the same key), its
  other settings left alone; ``update_only=true`` keeps a peer removed since
  the reading from being created again. wireguard-go does that for two
  X25519 (the initiation's ephemeral key and its DH with the client's key);
* a peer that may still hold a keypair (a handshake in the last 180 s, plus
  :data:`SESSION_MARGIN` for a clock step: :func:`holds_session`) is removed
  and added again within one transaction, with all of its own settings
  (preshared key, allowed IPs, keepalive) and the endpoint the gateway gave. A
  new peer holds no keypair, its ``lastSentHandshake`` lies 6 s in the past
  (``NewPeer``/``Start``; kernel ``wg_peer_create``), and its keepalive starts
  at 0: the re-add with a non-zero keepalive starts an initiation at once.
  Within one ``set=1`` the removal takes the key out of the peer map before
  the next ``public_key=`` line looks it up, so the same key is created
  afresh; the kernel's ``set_peer`` does the same per peer attribute, in
  order. It costs one X25519 more (the static-static DH of the new peer);
* an in-place kick sends nothing when the peer sent a handshake message in
  the last 5 s: an earlier activation's initiation (retried every 5 s for up
  to 90 s while the client stays silent), one the backend's own traffic to
  the client started, or a response. wireguard-go sends synchronously within
  the ``set=1``, so a second ``get=1`` right after shows it: a peer whose
  ``tx_bytes`` did not grow is re-added then (:meth:`Uapi.activate`). The
  kernel hands its initiations to workers and counts them later, so
  :class:`WgTool` re-adds every target (the kernel's workers run the
  handshakes on every core; the re-add's one X25519 is all it adds);
* a peer whose own keepalive is 0 is set back to 0 by a last section for the
  same key later in the SAME transaction: the kick's keepalive has been sent
  by then (wireguard-go sends it synchronously when the next ``public_key=``
  line arrives; the kernel queues the initiation work, which a keepalive of
  0 does not cancel). Turning it off in the kicking section itself would not
  work: only the last value of a section counts (the kernel), and
  wireguard-go keeps ``pkaOn`` from section to section, so every section
  sets the keepalive explicitly.

One transaction per batch of at most :data:`BATCH_SIZE` peers. Through ``wg`` (the
kernel) a short pause separates two batches, because the kernel hands the
initiations to its workers at once and the replies come back together: it
demands cookies above 512 queued handshakes. wireguard-go needs no pause: it
builds and sends each initiation in turn, synchronously, inside the ``set=1``
(measured on a 2-vCPU Xeon VM: about 80 us of its CPU per in-place kick and
135 us per re-add), so its replies come back paced by its own work, one at a
time, and a pause between batches changes nothing about that rate: it would
only leave wireguard-go idle. That serial work, under wireguard-go's UAPI
lock, is nearly all of an activation's time (``bench/bench_activation.py``).

Through UAPI the agent's own work hides behind wireguard-go's: ``activate``
reads the interface once, indexes the answer by public key (:func:`uapi_index`)
and parses only the target peers' sections, each batch's while wireguard-go
carries out the previous one (:meth:`Uapi.activate`); the first batch is
short (:data:`FIRST_BATCH`), so that wireguard-go starts at once. The
transactions stay strictly one after the other. One connection per
transaction: wireguard-go v0.0.20220316 reads a ``set=1`` through a
``bufio.Scanner`` that reads ahead, so a second request pipelined on the same
connection would be lost.

Never reported, logged or put in an exception: private and preshared keys
(``Interface.private_key`` and ``Peer.preshared_key`` are ``repr=False``)."""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Protocol

from nacl.bindings import crypto_scalarmult_base

from natfail.agent.config import interface_name_problem
from natfail.core.model import Endpoint
from natfail.oneline import one_line

UAPI_DIR: Final = "/var/run/wireguard"
KEY_LEN: Final = 32
NO_KEY: Final = bytes(KEY_LEN)  # WireGuard's "no preshared key"
RECENT_WINDOW: Final = 180.0  # REJECT_AFTER_TIME: an older keypair is dead anyway
SESSION_MARGIN: Final = 5.0  # seconds a wall clock step may hide a live keypair by
BATCH_SIZE: Final = 256
BATCH_PAUSE: Final = 0.002  # seconds between two batches of an activation through `wg`
FIRST_BATCH: Final = 32  # peers in an activation's first UAPI batch (Uapi.activate)
UAPI_BATCH_PAUSE: Final = 0.0  # wireguard-go paces its initiations itself (module docstring)
KICK_KEEPALIVE: Final = 25  # the non-zero keepalive a re-added peer briefly gets
IO_TIMEOUT: Final = 5.0  # seconds for one UAPI transaction or one `wg` run
UAPI_LIMIT: Final = 256 * 1024 * 1024  # a get of 2**20 peers with a few prefixes each
_ALLOWED_IPS_PER_ARG: Final = 512  # keeps one argv string far below MAX_ARG_STRLEN

_HEX_KEY_RE: Final = re.compile(r"[0-9a-fA-F]{64}")
_B64_KEY_RE: Final = re.compile(r"[A-Za-z0-9+/]{43}=")
_UINT_RE: Final = re.compile(r"[0-9]{1,20}")
_ERRNO_RE: Final = re.compile(rb"errno=(-?[0-9]{1,10})")
_FIRST_PEER_RE: Final = re.compile(r"^public_key=", re.MULTILINE)
# Statistics and fields the model has no use for; any other peer key is a
# setting this module does not know, and a peer with one is never re-added.
_IGNORED_PEER_KEYS: Final = frozenset({"protocol_version", "tx_bytes", "rx_bytes"})


class WireGuardError(Exception):
    """An interface that cannot be read or steered: missing, its socket refused,
    an errno from UAPI, a failed ``wg``. The message names the interface and
    never holds key material."""

    def __init__(self, interface: str, message: str) -> None:
        super().__init__(interface, message)
        self.interface = interface
        self.message = message

    def __str__(self) -> str:
        return f"{self.interface}: {self.message}"


@dataclass(frozen=True, slots=True)
class Peer:
    public_key: bytes
    endpoint: Endpoint | None
    last_handshake: float  # unix seconds, 0.0 if never
    persistent_keepalive: int  # seconds, 0 = off
    allowed_ips: tuple[str, ...]  # normalised prefixes, "10.0.0.2/32"
    # Needed to re-add the peer; NEVER reported anywhere. NO_KEY when none.
    preshared_key: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Interface:
    name: str
    # The agent's channel identity; never reported.
    private_key: bytes = field(repr=False)
    public_key: bytes
    listen_port: int
    peers: tuple[Peer, ...]

    def peer(self, public_key: bytes) -> Peer | None:
        return next((p for p in self.peers if p.public_key == public_key), None)


@dataclass(frozen=True, slots=True)
class Activation:
    known: int  # targets that are peers of this interface
    initiated: int  # peers kicked into a handshake
    elapsed: float  # seconds, from the call to the last transaction's answer
    cleared: int = 0  # of those, removed and re-added to clear a session


Target = tuple[bytes, Endpoint]


class WireGuard(Protocol):
    def read(self) -> Interface: ...

    def activate(self, targets: Sequence[Target]) -> Activation: ...


def check_name(name: str) -> None:
    """Refuses what the kernel would not take as an interface name (and what
    would leave the socket directory in a UAPI path); our own misuse."""
    if not isinstance(name, str):
        raise TypeError(f"an interface name must be a string, not {type(name).__name__}")
    problem = interface_name_problem(name)
    if problem is not None:
        raise ValueError(problem)


def recent(interface: Interface, now: float, window: float = RECENT_WINDOW) -> list[Peer]:
    """The peers worth reporting: an endpoint and a handshake in the last
    ``window`` seconds. A handshake "in the future" (the clock stepped back)
    counts as recent."""
    return [
        p
        for p in interface.peers
        if p.endpoint is not None and p.last_handshake > 0 and now - p.last_handshake <= window
    ]


# --- parsing -----------------------------------------------------------------------------


def _hex_key(text: str) -> bytes | None:
    return bytes.fromhex(text) if _HEX_KEY_RE.fullmatch(text) else None


def _b64_key(text: str) -> bytes | None:
    if not _B64_KEY_RE.fullmatch(text):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == KEY_LEN else None


def _uint(text: str, high: int) -> int | None:
    if not _UINT_RE.fullmatch(text):
        return None
    value = int(text)
    return value if value <= high else None


def _prefix(text: str) -> str | None:
    """A prefix in canonical form (host bits cleared), or None. inet_pton and
    inet_ntop, not ipaddress: a thousand peers are read within milliseconds."""
    address, sep, length_text = text.partition("/")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    bits = 128 if family == socket.AF_INET6 else 32
    length = _uint(length_text, bits) if sep else None
    if length is None:
        return None
    try:
        packed = socket.inet_pton(family, address)
    except OSError:
        return None
    mask = ((1 << bits) - 1) ^ ((1 << (bits - length)) - 1)
    masked = (int.from_bytes(packed, "big") & mask).to_bytes(bits // 8, "big")
    return f"{socket.inet_ntop(family, masked)}/{length}"


_V4_NOT_UNICAST: Final = (bytes(4), b"\xff\xff\xff\xff")


def _endpoint(text: str) -> Endpoint | None:
    """An endpoint as WireGuard prints it, or None: an IPv6 scope id or anything
    else Endpoint refuses is unknown, not an error (activation brings its own
    endpoint). IPv4 takes a fast path with Endpoint.parse's rules."""
    host, sep, port_text = text.rpartition(":")
    if sep and "." in host and ":" not in host:
        port = _uint(port_text, 65535)
        try:
            packed = socket.inet_pton(socket.AF_INET, host)
        except OSError:
            return None
        if not port or packed in _V4_NOT_UNICAST or 224 <= packed[0] <= 239:
            return None
        return Endpoint(ipaddress.IPv4Address(packed), port)
    try:
        return Endpoint.parse(text)
    except ValueError:
        return None


def _public_of(name: str, private_key: bytes) -> bytes:
    if private_key == NO_KEY:
        raise WireGuardError(name, "has no private key")
    return bytes(crypto_scalarmult_base(private_key))


class _Draft:
    """A peer while its UAPI lines come in; ``broken`` once any setting a re-add
    would need could not be read."""

    __slots__ = ("allowed", "broken", "endpoint", "keepalive", "nsec", "psk", "public", "sec")

    def __init__(self, public: bytes | None) -> None:
        self.public = public
        self.broken = public is None
        self.psk = NO_KEY
        self.endpoint: Endpoint | None = None
        self.sec = 0
        self.nsec = 0
        self.keepalive = 0
        self.allowed: list[str] = []

    def line(self, key: str, value: str) -> None:
        """One line of the peer; parse_uapi skips the _IGNORED_PEER_KEYS first."""
        if key == "preshared_key":
            psk = _hex_key(value)
            self.broken |= psk is None
            self.psk = psk or NO_KEY
        elif key == "endpoint":
            self.endpoint = _endpoint(value)
        elif key == "last_handshake_time_sec":
            self.sec = _uint(value, 2**63) or 0
        elif key == "last_handshake_time_nsec":
            nsec = _uint(value, 999_999_999)
            self.nsec = nsec or 0
        elif key == "persistent_keepalive_interval":
            keepalive = _uint(value, 65535)
            self.broken |= keepalive is None
            self.keepalive = keepalive or 0
        elif key == "allowed_ip":
            prefix = _prefix(value)
            self.broken |= prefix is None
            if prefix is not None:
                self.allowed.append(prefix)
        else:
            self.broken = True

    def peer(self) -> Peer | None:
        if self.broken or self.public is None:
            return None
        last = self.sec + self.nsec / 1e9 if self.sec else 0.0
        return Peer(
            public_key=self.public,
            endpoint=self.endpoint,
            last_handshake=last,
            persistent_keepalive=self.keepalive,
            allowed_ips=tuple(self.allowed),
            preshared_key=self.psk,
        )


class _Device:
    """The device lines of a UAPI answer, the ones before the first peer."""

    __slots__ = ("name", "port", "private")

    def __init__(self, name: str) -> None:
        self.name = name
        self.private = NO_KEY
        self.port = 0

    def line(self, number: int, key: str, value: str) -> None:
        if key == "private_key":
            key_bytes = _hex_key(value)
            if key_bytes is None:
                raise WireGuardError(
                    self.name, f"UAPI answer line {number}: private_key is not hex"
                )
            self.private = key_bytes
        elif key == "listen_port":
            listen = _uint(value, 65535)
            if listen is None:
                raise WireGuardError(self.name, f"UAPI answer line {number}: bad listen_port")
            self.port = listen
        # fwmark and any device key of a fork (amneziawg's jc, ...) do not matter here


def parse_uapi(name: str, text: str) -> Interface:
    """The body of a UAPI ``get=1`` answer (without its ``errno=`` line)."""
    device = _Device(name)
    peers: list[Peer] = []
    seen: set[bytes] = set()
    draft: _Draft | None = None

    def finish() -> None:
        peer = draft.peer() if draft is not None else None
        if peer is not None and peer.public_key not in seen:
            seen.add(peer.public_key)
            peers.append(peer)

    for number, line in enumerate(text.split("\n"), start=1):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise WireGuardError(name, f"UAPI answer line {number} is not key=value")
        if key == "public_key":
            finish()
            draft = _Draft(_hex_key(value))
        elif draft is not None:
            if key not in _IGNORED_PEER_KEYS:
                draft.line(key, value)
        else:
            device.line(number, key, value)
    finish()
    private = device.private
    return Interface(name, private, _public_of(name, private), device.port, tuple(peers))


def uapi_index(name: str, text: str) -> dict[bytes, list[str]]:
    """The same answer as :func:`parse_uapi` reads, for an activation: each
    peer's public key mapped to the rest of its section (the text after its
    ``public_key=`` line; a list, in order, should a key come twice), without
    reading any peer's settings yet: :func:`section_peer` reads one, so only
    the peers an activation needs cost anything. Raises what ``parse_uapi``
    raises, in the same order: a broken device line, a line that is not
    key=value, no private key. A section whose key is not hex is left out
    with its lines."""
    start = _FIRST_PEER_RE.search(text)
    cut = start.start() if start is not None else len(text)
    head, rest = text[:cut], text[cut:]
    device = _Device(name)
    for number, line in enumerate(head.split("\n"), start=1):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise WireGuardError(name, f"UAPI answer line {number} is not key=value")
        device.line(number, key, value)
    lines = rest.split("\n")
    if [line for line in lines if line and "=" not in line]:  # a list: faster than a regex
        first = next(i for i, line in enumerate(lines) if line and "=" not in line)
        number = head.count("\n") + first + 1
        raise WireGuardError(name, f"UAPI answer line {number} is not key=value")
    if device.private == NO_KEY:
        raise WireGuardError(name, "has no private key")
    index: dict[bytes, list[str]] = {}
    # rest is empty or starts with "public_key=": the first piece is empty
    for section in ("\n" + rest).split("\npublic_key=")[1:]:
        key_text, _, body = section.partition("\n")
        peer_key = _hex_key(key_text)
        if peer_key is not None:
            index.setdefault(peer_key, []).append(body)
    return index


def section_peer(key: bytes, sections: Sequence[str]) -> Peer | None:
    """The peer ``key`` from its sections of a :func:`uapi_index`: the first one
    :func:`parse_uapi` could read in full, as it keeps; None if none."""
    for body in sections:
        draft = _Draft(key)
        for line in body.split("\n"):
            if line:
                field_key, _, value = line.partition("=")
                if field_key not in _IGNORED_PEER_KEYS:
                    draft.line(field_key, value)
        peer = draft.peer()
        if peer is not None:
            return peer
    return None


def parse_dump(name: str, text: str) -> Interface:
    """The output of ``wg show NAME dump``: one tab-separated line for the
    interface (private key, public key, port, fwmark), one per peer (public key,
    preshared key, endpoint, allowed IPs, latest handshake, rx, tx, keepalive)."""
    lines = [line for line in text.split("\n") if line]
    if not lines:
        raise WireGuardError(name, "wg show dump printed nothing")
    head = lines[0].split("\t")
    if len(head) != 4:
        raise WireGuardError(name, f"wg show dump: {len(head)} fields on the first line, not 4")
    if head[0] == "(none)":
        raise WireGuardError(name, "has no private key")
    private = _b64_key(head[0])
    if private is None:
        raise WireGuardError(name, "wg show dump: the private key is not base64")
    port = _uint(head[2], 65535)
    if port is None:
        raise WireGuardError(name, "wg show dump: bad listen port")
    public = _b64_key(head[1]) or _public_of(name, private)
    peers: list[Peer] = []
    seen: set[bytes] = set()
    for line in lines[1:]:
        peer = _dump_peer(line.split("\t"))
        if peer is not None and peer.public_key not in seen:
            seen.add(peer.public_key)
            peers.append(peer)
    return Interface(name, private, public, port, tuple(peers))


def _dump_peer(f: list[str]) -> Peer | None:
    if len(f) != 8:
        return None
    public = _b64_key(f[0])
    psk = NO_KEY if f[1] == "(none)" else _b64_key(f[1])
    keepalive = 0 if f[7] == "off" else _uint(f[7], 65535)
    allowed: list[str | None] = [] if f[3] == "(none)" else [_prefix(p) for p in f[3].split(",")]
    if public is None or psk is None or keepalive is None or None in allowed:
        return None
    handshake = _uint(f[4], 2**63) or 0
    return Peer(
        public_key=public,
        endpoint=None if f[2] == "(none)" else _endpoint(f[2]),
        last_handshake=float(handshake),
        persistent_keepalive=keepalive,
        allowed_ips=tuple(p for p in allowed if p is not None),
        preshared_key=psk,
    )


# --- activation plans --------------------------------------------------------------------

Batch = list[tuple[Peer, Endpoint]]


def plan_activation(
    interface: Interface, targets: Sequence[Target], batch_size: int = BATCH_SIZE
) -> tuple[int, list[Batch]]:
    """Which peers to kick, in batches: the targets that are peers of the
    interface, each once (its first endpoint), in the order given. Returns the
    number known and the batches."""
    _check_batch_size(batch_size)
    by_key = {p.public_key: p for p in interface.peers}
    items = [(by_key[k], e) for k, e in activation_targets(targets).items() if k in by_key]
    return len(items), [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")


def activation_targets(targets: Sequence[Target]) -> dict[bytes, Endpoint]:
    """Each target key once, with its first endpoint, in the order given;
    refuses a malformed target (our own misuse) before anything is sent."""
    chosen: dict[bytes, Endpoint] = {}
    for key, endpoint in targets:
        if not isinstance(key, bytes) or len(key) != KEY_LEN:
            raise ValueError("a target's public key must be 32 bytes")
        if not isinstance(endpoint, Endpoint):
            raise TypeError(f"a target's endpoint must be an Endpoint, not {endpoint!r}")
        chosen.setdefault(key, endpoint)
    return chosen


def holds_session(peer: Peer, now: float) -> bool:
    """Whether ``peer`` may still hold a keypair it would send a kick on: a
    handshake less than REJECT_AFTER_TIME (plus :data:`SESSION_MARGIN`) before
    ``now``, or one "in the future" (the clock stepped back)."""
    return peer.last_handshake > 0 and now - peer.last_handshake < RECENT_WINDOW + SESSION_MARGIN


def section_tx(sections: Sequence[str]) -> int | None:
    """The ``tx_bytes`` of a peer's first section of a :func:`uapi_index`, or
    None when it has none that reads."""
    if not sections:
        return None
    body = "\n" + sections[0]
    start = body.find("\ntx_bytes=")
    if start < 0:
        return None
    start += len("\ntx_bytes=")
    end = body.find("\n", start)
    return _uint(body[start : end if end >= 0 else None], 2**64)


def uapi_activation(batch: Batch, in_place: Collection[bytes] = frozenset()) -> bytes:
    """One ``set=1`` transaction kicking every peer of the batch (see the module
    docstring for why it has this shape): the peers in ``in_place`` by their
    keepalive alone, every other one removed and re-added."""
    lines = ["set=1"]
    for peer, endpoint in batch:
        key = peer.public_key.hex()
        if peer.public_key in in_place:
            # update_only: a peer removed since the reading is not created again
            lines += [f"public_key={key}", "update_only=true", f"endpoint={endpoint}"]
            if peer.persistent_keepalive:
                lines += [
                    "persistent_keepalive_interval=0",
                    f"public_key={key}",
                    "update_only=true",
                ]
            lines.append(
                f"persistent_keepalive_interval={peer.persistent_keepalive or KICK_KEEPALIVE}"
            )
            continue
        lines += [f"public_key={key}", "remove=true", f"public_key={key}"]
        if peer.preshared_key != NO_KEY:
            lines.append(f"preshared_key={peer.preshared_key.hex()}")
        lines.append(f"endpoint={endpoint}")
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive or KICK_KEEPALIVE}")
        lines += [f"allowed_ip={prefix}" for prefix in peer.allowed_ips]
    for peer, _ in batch:
        if peer.persistent_keepalive == 0:
            lines += [f"public_key={peer.public_key.hex()}", "update_only=true"]
            lines.append("persistent_keepalive_interval=0")
    return ("\n".join(lines) + "\n\n").encode("ascii")


def wg_activation_argv(
    wg: str, name: str, batch: Batch, psk_file: Callable[[Peer], str]
) -> list[str]:
    """The ``wg set`` argv of the same transaction. ``wg`` reads a preshared key
    only from a file: ``psk_file(peer)`` names one (a /dev/fd/N pipe)."""
    argv = [wg, "set", name]
    for peer, endpoint in batch:
        key = base64.b64encode(peer.public_key).decode("ascii")
        argv += ["peer", key, "remove", "peer", key]
        if peer.preshared_key != NO_KEY:
            argv += ["preshared-key", psk_file(peer)]
        argv += ["endpoint", str(endpoint)]
        argv += ["persistent-keepalive", str(peer.persistent_keepalive or KICK_KEEPALIVE)]
        # Several allowed-ips arguments add up (wg's parse_allowedips appends).
        for i in range(0, len(peer.allowed_ips), _ALLOWED_IPS_PER_ARG):
            argv += ["allowed-ips", ",".join(peer.allowed_ips[i : i + _ALLOWED_IPS_PER_ARG])]
    for peer, _ in batch:
        if peer.persistent_keepalive == 0:
            key = base64.b64encode(peer.public_key).decode("ascii")
            argv += ["peer", key, "persistent-keepalive", "0"]
    return argv


def _run_batches(
    batches: list[Batch], apply: Callable[[Batch], None], pause: float, started: float, known: int
) -> Activation:
    initiated = 0
    for index, batch in enumerate(batches):
        if index and pause > 0:
            time.sleep(pause)
        apply(batch)
        initiated += len(batch)
    return Activation(known, initiated, time.monotonic() - started, initiated)


# --- wireguard-go: the UAPI socket --------------------------------------------------------


class Uapi:
    """A WireGuard interface through its UAPI socket (wireguard-go, or anything
    serving ``SOCKET_DIR/NAME.sock``). One connection per transaction; the
    calls block (run them in a thread from asyncio)."""

    def __init__(
        self,
        name: str,
        socket_dir: str = UAPI_DIR,
        *,
        timeout: float = IO_TIMEOUT,
        batch_size: int = BATCH_SIZE,
        pause: float = UAPI_BATCH_PAUSE,
    ) -> None:
        check_name(name)
        self.name = name
        self.socket_path = Path(socket_dir) / f"{name}.sock"
        self.timeout = timeout
        self.batch_size = batch_size
        self.pause = pause

    def __repr__(self) -> str:
        return f"Uapi({self.name!r}, {str(self.socket_path.parent)!r})"

    def read(self) -> Interface:
        return parse_uapi(self.name, self._transact(b"get=1\n\n", "get"))

    def activate(self, targets: Sequence[Target]) -> Activation:
        """One ``get=1``, then one ``set=1`` per batch: a target that holds no
        session (:func:`holds_session`) is kicked in place, any other removed
        and re-added (:func:`uapi_activation`). A second ``get=1`` then shows
        which in-place kicks sent nothing (their ``tx_bytes`` did not grow:
        the peer had sent a handshake message less than 5 s before, by its own
        timers or an earlier activation); those are re-added, which always
        initiates. Each batch's peers are read from the answer and its request
        built while wireguard-go carries out the previous batch (its answer is
        awaited before the next is sent)."""
        started = time.monotonic()
        _check_batch_size(self.batch_size)
        wanted = activation_targets(targets)
        now = time.time()
        index = uapi_index(self.name, self._transact(b"get=1\n\n", "get"))
        sent_before: dict[bytes, int] = {}  # the in-place kicks, by their tx_bytes
        moves: Batch = []

        def first_pass() -> Iterator[tuple[Batch, Collection[bytes]]]:
            batch: Batch = []
            for key, endpoint in wanted.items():
                sections = index.get(key)
                peer = section_peer(key, sections) if sections else None
                if peer is None:
                    continue
                tx = None if holds_session(peer, now) else section_tx(sections or ())
                if tx is not None:
                    sent_before[key] = tx
                batch.append((peer, endpoint))
                # a short first batch: wireguard-go starts while the rest is read
                if len(batch) == (self.batch_size if moves else min(self.batch_size, FIRST_BATCH)):
                    moves.extend(batch)
                    yield batch, sent_before
                    batch = []
            if batch:
                moves.extend(batch)
                yield batch, sent_before

        self._pipeline(first_pass())
        cleared = len(moves) - len(sent_before)
        if sent_before:
            after = uapi_index(self.name, self._transact(b"get=1\n\n", "get"))
            again: Batch = []
            for peer, endpoint in moves:
                key = peer.public_key
                sections = after.get(key)
                if key not in sent_before or not sections:
                    continue  # re-added already, or removed since: not ours to bring back
                tx = section_tx(sections)
                if tx is None or tx <= sent_before[key]:
                    now_peer = section_peer(key, sections)
                    if now_peer is not None:
                        again.append((now_peer, endpoint))
            size = self.batch_size
            self._pipeline((again[i : i + size], ()) for i in range(0, len(again), size))
            cleared += len(again)
        return Activation(len(moves), len(moves), time.monotonic() - started, cleared)

    def _pipeline(self, batches: Iterable[tuple[Batch, Collection[bytes]]]) -> None:
        """One ``set=1`` per batch, strictly one after the other; the next
        batch is drawn and its request built before the answer to the
        current one is awaited."""
        pending: socket.socket | None = None  # a set sent, its answer unread
        try:
            for count, (batch, in_place) in enumerate(batches):
                request = uapi_activation(batch, in_place)
                if pending is not None:
                    with pending:
                        self._answer(pending, "set")
                    pending = None
                if count and self.pause > 0:
                    time.sleep(self.pause)
                pending = self._send(request, "set")
            if pending is not None:
                with pending:
                    self._answer(pending, "set")
                pending = None
        finally:
            if pending is not None:
                pending.close()

    def _transact(self, request: bytes, what: str) -> str:
        """Sends one request; the body of the answer (``errno=0`` removed)."""
        with self._send(request, what) as sock:
            return self._answer(sock, what)

    def _send(self, request: bytes, what: str) -> socket.socket:
        """A new connection carrying ``request``, its answer still to be read."""
        path = self.socket_path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._errors(what):
                sock.settimeout(self.timeout)
                sock.connect(str(path))
                # One sendall: wireguard-go applies what it has read when the
                # connection ends early, so a request is never sent in pieces.
                sock.sendall(request)
        except BaseException:
            sock.close()
            raise
        return sock

    def _answer(self, sock: socket.socket, what: str) -> str:
        """The body of the answer on ``sock`` (``errno=0`` removed)."""
        answer = bytearray()
        with self._errors(what):
            while not answer.endswith(b"\n\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise WireGuardError(self.name, f"UAPI {what}: closed before answering")
                answer += chunk
                if len(answer) > UAPI_LIMIT:
                    raise WireGuardError(self.name, f"UAPI {what}: answer too large")
        body, _, last = bytes(answer[:-2]).rpartition(b"\n")
        status = _ERRNO_RE.fullmatch(last)
        if status is None:
            raise WireGuardError(self.name, f"UAPI {what}: the answer does not end in errno=")
        code = int(status.group(1))
        if code != 0:
            reason = os.strerror(abs(code))
            raise WireGuardError(self.name, f"UAPI {what} failed: errno={code} ({reason})")
        return body.decode("utf-8", errors="replace")

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Socket errors as WireGuardError naming the interface."""
        path = self.socket_path
        try:
            yield
        except FileNotFoundError:
            raise WireGuardError(self.name, f"no such interface (no UAPI socket {path})") from None
        except ConnectionRefusedError:
            raise WireGuardError(
                self.name, f"UAPI socket {path} refused the connection (wireguard-go is gone?)"
            ) from None
        except TimeoutError:
            raise WireGuardError(
                self.name, f"UAPI {what}: no answer within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            raise WireGuardError(self.name, f"UAPI {what}: {exc.strerror or exc}") from None


# --- the kernel module: wg -----------------------------------------------------------------


class WgTool:
    """A WireGuard interface through the ``wg`` program (the kernel module's
    netlink, or UAPI when wireguard-go serves the name). No shell; preshared
    keys go through pipes, never argv or a file on disk."""

    def __init__(
        self,
        name: str,
        wg: str = "wg",
        *,
        timeout: float = IO_TIMEOUT,
        batch_size: int = BATCH_SIZE,
        pause: float = BATCH_PAUSE,
    ) -> None:
        check_name(name)
        self.name = name
        self.wg = wg
        self.timeout = timeout
        self.batch_size = batch_size
        self.pause = pause

    def __repr__(self) -> str:
        return f"WgTool({self.name!r}, {self.wg!r})"

    def read(self) -> Interface:
        return parse_dump(self.name, self._run([self.wg, "show", self.name, "dump"], ()))

    def activate(self, targets: Sequence[Target]) -> Activation:
        started = time.monotonic()
        known, batches = plan_activation(self.read(), targets, self.batch_size)
        return _run_batches(batches, self._apply, self.pause, started, known)

    def _apply(self, batch: Batch) -> None:
        fds: list[int] = []
        files: dict[bytes, str] = {}
        try:
            for peer, _ in batch:
                if peer.preshared_key == NO_KEY:
                    continue
                read_end, write_end = os.pipe()
                fds.append(read_end)
                try:
                    # 45 bytes: far below a pipe's buffer, so this never blocks.
                    os.write(write_end, base64.b64encode(peer.preshared_key) + b"\n")
                finally:
                    os.close(write_end)
                files[peer.public_key] = f"/dev/fd/{read_end}"
            argv = wg_activation_argv(self.wg, self.name, batch, lambda p: files[p.public_key])
            self._run(argv, fds)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _run(self, argv: list[str], fds: Sequence[int]) -> str:
        what = " ".join(argv[1:2])
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=self.timeout,
                pass_fds=tuple(fds),
                check=False,
            )
        except FileNotFoundError:
            raise WireGuardError(self.name, f"cannot run {self.wg!r}: not found") from None
        except subprocess.TimeoutExpired:
            raise WireGuardError(
                self.name, f"wg {what}: no answer within {self.timeout:g} s"
            ) from None
        except OSError as exc:
            raise WireGuardError(self.name, f"cannot run {self.wg!r}: {exc.strerror}") from None
        if done.returncode != 0:
            # stderr only: stdout of `show dump` holds the private key.
            detail = one_line(done.stderr)[:300] or f"exit status {done.returncode}"
            raise WireGuardError(self.name, f"wg {what} failed: {detail}")
        return done.stdout


def open_interface(name: str, socket_dir: str = UAPI_DIR) -> WireGuard:
    """:class:`Uapi` when wireguard-go's socket exists, else :class:`WgTool`."""
    check_name(name)
    if (Path(socket_dir) / f"{name}.sock").exists():
        return Uapi(name, socket_dir)
    return WgTool(name)


# --- a fake for the agent's tests ---------------------------------------------------------


class FakeWireGuard:
    """An interface in memory: :meth:`activate` records its targets and gives the
    known peers their new endpoint (as a real one would, before the handshake)."""

    def __init__(self, interface: Interface, *, fail: str | None = None) -> None:
        self.interface = interface
        self.activations: list[list[Target]] = []
        self.fail = fail  # a WireGuardError message for every call, while set

    def read(self) -> Interface:
        if self.fail is not None:
            raise WireGuardError(self.interface.name, self.fail)
        return self.interface

    def activate(self, targets: Sequence[Target]) -> Activation:
        known, batches = plan_activation(self.read(), targets)
        self.activations.append(list(targets))
        moved = {peer.public_key: endpoint for batch in batches for peer, endpoint in batch}
        peers = tuple(
            replace(p, endpoint=moved[p.public_key]) if p.public_key in moved else p
            for p in self.interface.peers
        )
        self.interface = replace(self.interface, peers=peers)
        return Activation(known, known, 0.0)
