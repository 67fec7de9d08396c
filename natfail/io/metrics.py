"""Prometheus metrics, served over HTTP when `daemon.metrics_listen` is set.

The daemon reports events here; the registry is its own, so tests and two
daemons in one process never share counters.

The listener is one thread with a selector, whatever the number of
connections (prometheus_client's own server starts a thread for each and
never times one out): at most `MAX_CONNECTIONS` are open, a connection has
`REQUEST_TIMEOUT` to send its request and `REPLY_TIMEOUT` to take the reply,
and when all are in use the oldest one still waiting for its request makes
room for the newcomer."""

from __future__ import annotations

import contextlib
import gzip
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder

from natfail import __version__
from natfail.io.loop_errors import RepeatLog, accept_failure
from natfail.oneline import error_line

log = logging.getLogger(__name__)

MAX_CONNECTIONS: Final = 64
REQUEST_TIMEOUT: Final = 5.0
REPLY_TIMEOUT: Final = 10.0
MAX_REQUEST_HEAD: Final = 8 * 1024
BACKLOG: Final = 128
ACCEPT_BATCH: Final = 32
ACCEPT_RETRY: Final = 1.0
# How often the thread wakes with nothing to do (to expire and flush counts).
TICK: Final = 1.0
PATHS: Final = frozenset({"/", "/metrics"})


class MetricsError(OSError):
    """The listener cannot be set up; the message is one line."""


@dataclass(eq=False, slots=True)
class _Conn:
    sock: socket.socket
    deadline: float
    head: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None

    @property
    def waiting(self) -> bool:
        """Still waiting for (the rest of) its request."""
        return self.out is None


def _header(head: bytes, name: bytes) -> str:
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == name:
            return value.strip().decode("latin-1")
    return ""


def _response(
    status: str, body: bytes, content_type: str, *, head_only: bool = False, extra: str = ""
) -> bytes:
    top = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
    )
    return top.encode("latin-1") + (b"" if head_only else body)


def _plain(status: str, text: str) -> bytes:
    return _response(status, text.encode() + b"\n", "text/plain; charset=utf-8")


class _Listener:
    """The HTTP listener's thread and its connections."""

    def __init__(self, sock: socket.socket, registry: CollectorRegistry) -> None:
        self._sock = sock
        self._registry = registry
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: dict[int, _Conn] = {}  # by fd, oldest first
        self._stop = False
        self._listening = False
        self._resume_at: float | None = None
        self._repeats = RepeatLog(log)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._listen(True)
        self._thread = threading.Thread(target=self._run, name="natfail-metrics", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        name = self._sock.getsockname()
        return str(name[0]), int(name[1])

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(5)
        for conn in list(self._conns.values()):
            conn.sock.close()
        self._conns.clear()
        self._selector.close()
        for sock in (self._sock, self._wake_r, self._wake_w):
            sock.close()

    def _listen(self, on: bool) -> None:
        if on and not self._listening:
            self._selector.register(self._sock, selectors.EVENT_READ, None)
        elif not on and self._listening:
            self._selector.unregister(self._sock)
        self._listening = on

    def _run(self) -> None:
        while not self._stop:
            try:
                self._step()
            except Exception as exc:  # the listener must outlive any one bad moment
                self._repeats.report(
                    f"metrics: listener error: {type(exc).__name__}: {error_line(exc)}",
                    level=logging.ERROR,
                    exc_info=exc,
                )
                time.sleep(0.1)

    def _step(self) -> None:
        now = time.monotonic()
        deadlines = [c.deadline for c in self._conns.values()]
        if self._resume_at is not None:
            deadlines.append(self._resume_at)
        timeout = max(0.0, min([now + TICK, *deadlines]) - now)
        for key, mask in self._selector.select(timeout):
            if key.fileobj is self._wake_r:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(64)
            elif key.fileobj is self._sock:
                self._accept()
            else:
                conn = key.data
                if isinstance(conn, _Conn):
                    self._service(conn, mask)
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self._drop(conn)
        if self._resume_at is not None and now >= self._resume_at:
            self._resume_at = None
            self._listen(True)
        if not self._listening and self._resume_at is None and len(self._conns) < MAX_CONNECTIONS:
            self._listen(True)
        self._repeats.flush()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self._conns) >= MAX_CONNECTIONS and not self._evict():
                self._listen(False)  # every slot is sending a reply: soon free
                return
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._repeats.report(accept_failure("metrics", exc))
                self._listen(False)
                self._resume_at = time.monotonic() + ACCEPT_RETRY
                return
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + REQUEST_TIMEOUT)
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _evict(self) -> bool:
        """Close the oldest connection that has not sent its request yet."""
        oldest = next((c for c in self._conns.values() if c.waiting), None)
        if oldest is None:
            return False
        self._drop(oldest)
        return True

    def _drop(self, conn: _Conn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        # A descriptor was freed: an accept that failed for want of one may work now.
        self._resume_at = None

    def _service(self, conn: _Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and conn.waiting:
                self._read(conn)
            if mask & selectors.EVENT_WRITE and not conn.waiting:
                self._write(conn)
        except OSError:
            self._drop(conn)

    def _read(self, conn: _Conn) -> None:
        data = conn.sock.recv(4096)
        if not data:
            self._drop(conn)
            return
        conn.head += data
        end = conn.head.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.head) > MAX_REQUEST_HEAD:
                self._reply(
                    conn, _plain("431 Request Header Fields Too Large", "request too large")
                )
            return
        self._reply(conn, self._answer(bytes(conn.head[:end])))

    def _answer(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _plain("400 Bad Request", "bad request")
        method, target = parts[0], parts[1].decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            return _plain("405 Method Not Allowed", "only GET and HEAD")
        if target.split("?", 1)[0] not in PATHS:
            return _plain("404 Not Found", "metrics are at /metrics")
        encoder, content_type = choose_encoder(_header(head, b"accept"))
        body = encoder(self._registry)
        extra = ""
        if "gzip" in _header(head, b"accept-encoding").lower():
            body = gzip.compress(body, compresslevel=5)
            extra = "Content-Encoding: gzip\r\n"
        return _response("200 OK", body, content_type, head_only=method == b"HEAD", extra=extra)

    def _reply(self, conn: _Conn, payload: bytes) -> None:
        conn.out = memoryview(payload)
        conn.deadline = time.monotonic() + REPLY_TIMEOUT
        self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        assert conn.out is not None
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            self._drop(conn)


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise MetricsError(f"metrics_listen {host}:{port}: {error_line(exc)}") from None
    last: OSError | None = None
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    reason = (last.strerror or error_line(last)) if last is not None else "no address"
    raise MetricsError(f"cannot listen for metrics on {host}:{port}: {reason}")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.backend_up = Gauge(
            "natfail_backend_up",
            "1 when the backend answers WireGuard handshakes",
            ["service", "backend"],
            registry=self.registry,
        )
        self.probe_rtt = Gauge(
            "natfail_probe_rtt_seconds",
            "Round-trip time of the last answered probe",
            ["service", "backend"],
            registry=self.registry,
        )
        self.probe_failures = Counter(
            "natfail_probe_failures",
            "Failed probes by reason",
            ["service", "backend", "reason"],
            registry=self.registry,
        )
        self.failovers = Counter(
            "natfail_failovers",
            "Changes of the active backend",
            ["service", "reason"],
            registry=self.registry,
        )
        self.active = Gauge(
            "natfail_active_backend",
            "1 for the backend that receives the service's traffic",
            ["service", "backend"],
            registry=self.registry,
        )
        self.repairs = Counter(
            "natfail_ruleset_repairs",
            "Times natfail's rules were found altered and put back",
            registry=self.registry,
        )
        self.agent_up = Gauge(
            "natfail_agent_up",
            "1 when the backend's natfail agent answers the gateway's polls",
            ["service", "backend"],
            registry=self.registry,
        )
        self.agent_clients = Gauge(
            "natfail_agent_clients",
            "Clients with a recent handshake that the backend's agent reported",
            ["service", "backend"],
            registry=self.registry,
        )
        self.activation_seconds = Gauge(
            "natfail_agent_activation_seconds",
            "Time from sending the last activation to the agent's answer",
            ["service", "backend"],
            registry=self.registry,
        )
        self.peers_activated = Counter(
            "natfail_agent_peers_activated",
            "Clients whose handshake a backend started on the gateway's activation",
            ["service", "backend"],
            registry=self.registry,
        )
        self.activations_unanswered = Counter(
            "natfail_agent_activations_unanswered",
            "Activations the agent did not answer",
            ["service", "backend"],
            registry=self.registry,
        )
        self.deciding = Gauge(
            "natfail_deciding",
            "1 while this gateway decides the service (single, or the pair member "
            "holding its public address), 0 while it follows the other",
            ["service"],
            registry=self.registry,
        )
        self.build_info = Gauge(
            "natfail_build_info",
            "Always 1; the version of the running natfail",
            ["version"],
            registry=self.registry,
        )
        self.build_info.labels(__version__).set(1)
        self._listener: _Listener | None = None

    def serve(self, host: str, port: int) -> None:
        """Listen on host:port (port 0: any); raises MetricsError."""
        sock = _bind(host, port)
        self._listener = _Listener(sock, self.registry)
        log.info(
            "metrics on http://%s:%d/metrics",
            host if ":" not in host else f"[{host}]",
            sock.getsockname()[1],
        )

    @property
    def address(self) -> tuple[str, int] | None:
        if self._listener is None:
            return None
        return self._listener.address

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def probe(self, service: str, backend: str, up: bool, rtt: float | None, reason: str) -> None:
        if up and rtt is not None:
            self.probe_rtt.labels(service, backend).set(rtt)
        if not up:
            self.probe_failures.labels(service, backend, reason).inc()

    def health(self, service: str, backend: str, up: bool) -> None:
        self.backend_up.labels(service, backend).set(1 if up else 0)

    def switched(self, service: str, backends: list[str], active: str, reason: str) -> None:
        self.failovers.labels(service, reason).inc()
        self.set_active(service, backends, active)

    def set_active(self, service: str, backends: list[str], active: str | None) -> None:
        for name in backends:
            self.active.labels(service, name).set(1 if name == active else 0)

    def agent(self, service: str, backend: str, reachable: bool, clients: int) -> None:
        self.agent_up.labels(service, backend).set(1 if reachable else 0)
        self.agent_clients.labels(service, backend).set(clients)

    def activated(
        self, service: str, backend: str, answered: bool, initiated: int, elapsed: float
    ) -> None:
        if answered:
            self.activation_seconds.labels(service, backend).set(elapsed)
            self.peers_activated.labels(service, backend).inc(initiated)
        else:
            self.activations_unanswered.labels(service, backend).inc()

    def declare(
        self, service: str, backends: list[str], active: str | None, role: str, agents: list[str]
    ) -> None:
        """Every series of a service, before its first event: a dashboard and
        an alert see 0 instead of nothing (a backend is 0, not up, until a
        probe says so)."""
        for name in backends:
            self.backend_up.labels(service, name).set(0)
        self.set_active(service, backends, active)
        self.failovers.labels(service, "failover")
        self.role(service, role)
        for name in agents:
            self.agent_up.labels(service, name).set(0)
            self.agent_clients.labels(service, name).set(0)
            self.peers_activated.labels(service, name)
            self.activations_unanswered.labels(service, name)

    def role(self, service: str, role: str) -> None:
        self.deciding.labels(service).set(0 if role == "follow" else 1)

    def forget(self, service: str) -> None:
        """Drop a removed service's series, so a reload leaves no ghosts."""
        metrics: tuple[Gauge | Counter, ...] = (
            self.backend_up,
            self.probe_rtt,
            self.active,
            self.probe_failures,
            self.failovers,
            self.agent_up,
            self.agent_clients,
            self.activation_seconds,
            self.peers_activated,
            self.activations_unanswered,
            self.deciding,
        )
        for metric in metrics:
            # prometheus_client has no public way to list a metric's label sets.
            for labels in list(metric._metrics):
                if labels[0] == service:
                    metric.remove(*labels)
