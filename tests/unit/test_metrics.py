from __future__ import annotations

import socket
import urllib.request

from prometheus_client import generate_latest

from natfail.io.metrics import Metrics


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


def test_serves_http_on_loopback() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = Metrics()
    m.health("wg0", "a", True)
    m.serve("127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert b"natfail_backend_up" in reply.read()
    finally:
        m.close()
