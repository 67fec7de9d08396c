"""Prometheus metrics, served over HTTP when `daemon.metrics_listen` is set.

The daemon reports events here; the registry is its own, so tests and two
daemons in one process never share counters."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import start_http_server

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.backend_up = Gauge(
            "natfail_backend_up", "1 when the backend answers WireGuard handshakes",
            ["service", "backend"], registry=self.registry,
        )
        self.probe_rtt = Gauge(
            "natfail_probe_rtt_seconds", "Round-trip time of the last answered probe",
            ["service", "backend"], registry=self.registry,
        )
        self.probe_failures = Counter(
            "natfail_probe_failures", "Failed probes by reason",
            ["service", "backend", "reason"], registry=self.registry,
        )
        self.failovers = Counter(
            "natfail_failovers", "Changes of the active backend",
            ["service", "reason"], registry=self.registry,
        )
        self.active = Gauge(
            "natfail_active_backend", "1 for the backend that receives the service's traffic",
            ["service", "backend"], registry=self.registry,
        )
        self.repairs = Counter(
            "natfail_ruleset_repairs", "Times natfail's rules were found altered and put back",
            registry=self.registry,
        )
        self._server: Any = None

    def serve(self, host: str, port: int) -> None:
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

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

    def forget(self, service: str) -> None:
        """Drop a removed service's series, so a reload leaves no ghosts."""
        metrics: tuple[Gauge | Counter, ...] = (
            self.backend_up, self.probe_rtt, self.active, self.probe_failures, self.failovers
        )
        for metric in metrics:
            # prometheus_client has no public way to list a metric's label sets.
            for labels in list(metric._metrics):
                if labels[0] == service:
                    metric.remove(*labels)
