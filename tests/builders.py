"""Models built in code for the tests and benchmarks that need a Service
without a config file (ruleset and dataplane tests)."""

from __future__ import annotations

from natfail.core.model import Backend, Endpoint, ProbeSettings, Service, SourceNat


def service(
    name: str,
    public: str,
    backends: list[tuple[str, str]],
    *,
    iif: str | None = None,
    source_nat: SourceNat = "preserve",
) -> Service:
    """A service with the given (name, address) backends, priorities falling
    from 100 in the order given, and defaults for everything else."""
    return Service(
        name=name,
        public=Endpoint.parse(public),
        inbound_interface=iif,
        server_public_key=b"\0" * 32,
        preshared_key_file=None,
        failback="sticky",
        preempt_delay=30.0,
        source_nat=source_nat,
        notify=None,
        probe=ProbeSettings(),
        backends=tuple(
            Backend(n, Endpoint.parse(a), 100 - 10 * i) for i, (n, a) in enumerate(backends)
        ),
    )
