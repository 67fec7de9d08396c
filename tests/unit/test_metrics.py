from __future__ import annotations

import gzip
import socket
import threading
import urllib.request

import pytest
from prometheus_client import generate_latest

from natfail.io import metrics as metrics_mod
from natfail.io.metrics import Metrics, MetricsError
from natfail.lab import wait_until


def _text(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_events_become_series() -> None:
    m = Metrics()
    m.probe("wg0", "a", True, 0.0012, "ok")
    m.probe("wg0", "b", False, None, "timeout")
    m.health("wg0", "a", True)
    m.health("wg0", "b", False)
    m.switched("wg0", ["a", "b"], "a", "failover")
    text = _text(m)
    assert 'natfail_probe_rtt_seconds{backend="a",service="wg0"} 0.0012' in text
    assert 'natfail_probe_failures_total{backend="b",reason="timeout",service="wg0"} 1.0' in text
    assert 'natfail_backend_up{backend="b",service="wg0"} 0.0' in text
    assert 'natfail_failovers_total{reason="failover",service="wg0"} 1.0' in text
    assert 'natfail_active_backend{backend="a",service="wg0"} 1.0' in text
    assert 'natfail_active_backend{backend="b",service="wg0"} 0.0' in text
    m.forget("wg0")
    assert 'service="wg0"' not in _text(m)


def test_every_series_exists_before_its_first_event() -> None:
    m = Metrics()
    m.declare("wg0", ["a", "b"], None, "follow", ["b"])
    text = _text(m)
    for series in (
        'natfail_backend_up{backend="a",service="wg0"} 0.0',
        'natfail_active_backend{backend="b",service="wg0"} 0.0',
        'natfail_failovers_total{reason="failover",service="wg0"} 0.0',
        'natfail_deciding{service="wg0"} 0.0',
        'natfail_agent_up{backend="b",service="wg0"} 0.0',
        'natfail_agent_peers_activated_total{backend="b",service="wg0"} 0.0',
        'natfail_build_info{version="',
    ):
        assert series in text, series
    assert 'natfail_agent_up{backend="a"' not in text  # a has no agent
    m.forget("wg0")
    assert 'service="wg0"' not in _text(m)


def _serving() -> tuple[Metrics, int]:
    m = Metrics()
    m.health("wg0", "a", True)
    m.serve("127.0.0.1", 0)
    assert m.address is not None
    return m, m.address[1]


def _scrape(port: int, path: str = "/metrics") -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        data: bytes = reply.read()
        return data


def test_serves_http_on_loopback() -> None:
    m, port = _serving()
    try:
        assert b"natfail_backend_up" in _scrape(port)
        assert b"natfail_backend_up" in _scrape(port, "/")
        with pytest.raises(urllib.error.HTTPError) as err:
            _scrape(port, "/nope")
        assert err.value.code == 404
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", headers={"Accept-Encoding": "gzip"}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.headers["Content-Encoding"] == "gzip"
            assert b"natfail_backend_up" in gzip.decompress(reply.read())
        head = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", method="HEAD")
        with urllib.request.urlopen(head, timeout=10) as reply:
            assert int(reply.headers["Content-Length"]) > 0 and reply.read() == b""
    finally:
        m.close()


def test_garbage_and_oversized_requests_get_an_error() -> None:
    m, port = _serving()
    try:
        for payload, status in (
            (b"hello\r\n\r\n", b"400"),
            (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
            (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000, b"431"),
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(payload)
                assert s.recv(64).split()[1] == status
        assert b"natfail_backend_up" in _scrape(port)
    finally:
        m.close()


def test_a_port_in_use_is_one_clear_error() -> None:
    m, port = _serving()
    try:
        with pytest.raises(MetricsError, match=f"cannot listen for metrics on 127.0.0.1:{port}"):
            Metrics().serve("127.0.0.1", port)
    finally:
        m.close()


def test_idle_connections_are_bounded_and_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """950 idle connections made 952 threads with prometheus_client's server."""
    monkeypatch.setattr(metrics_mod, "REQUEST_TIMEOUT", 1.0)
    threads_before = threading.active_count()
    m, port = _serving()
    idle: list[socket.socket] = []
    try:
        for _ in range(200):
            s = socket.socket()
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            idle.append(s)
        # one thread, whatever the number of connections
        assert threading.active_count() <= threads_before + 1
        # a scrape gets in meanwhile: the oldest idle connection makes room
        assert b"natfail_backend_up" in _scrape(port)
        assert threading.active_count() <= threads_before + 1

        def all_closed() -> bool:
            for s in idle:
                s.settimeout(0.01)
                try:
                    if s.recv(1) != b"":
                        return False
                except TimeoutError:
                    return False
                except OSError:
                    pass
            return True

        # every idle connection is closed by the server: evicted or timed out
        assert wait_until(all_closed, 20, 0.2)
        assert b"natfail_backend_up" in _scrape(port)
    finally:
        for s in idle:
            s.close()
        m.close()
    assert wait_until(lambda: threading.active_count() <= threads_before, 5)
