"""The checks before the daemon touches anything, over injected readings."""

from __future__ import annotations

import socket
from pathlib import Path

from natfail import preflight
from natfail.core.model import Config, DaemonSettings, ProbeSettings
from tests.builders import service


def _config(tmp_path: Path, *, metrics: str = "", v6: bool = False) -> Config:
    public, backend = (
        ("[2001:db8::10]:51820", "[fd00::2]:51820")
        if v6
        else (
            "203.0.113.10:51820",
            "10.0.0.2:51820",
        )
    )
    services = (service("wg0", public, [("a", backend)]),)
    daemon = DaemonSettings(socket=tmp_path / "run" / "natfail.sock", metrics_listen=metrics)
    return Config(tmp_path / "natfail.toml", daemon, ProbeSettings(), services)


def test_forwarding_off_is_named_with_its_fix(tmp_path: Path) -> None:
    values = {"/proc/sys/net/ipv4/ip_forward": "0", "/proc/sys/net/ipv6/conf/all/forwarding": "0"}
    (line,) = preflight.forwarding(_config(tmp_path), values.get)
    assert line.startswith("net.ipv4.ip_forward is 0") and "sysctl" in line
    (line,) = preflight.forwarding(_config(tmp_path, v6=True), values.get)
    assert line.startswith("net.ipv6.conf.all.forwarding is 0")
    values["/proc/sys/net/ipv4/ip_forward"] = "1"
    assert preflight.forwarding(_config(tmp_path), values.get) == []


def test_a_missing_capability_is_named() -> None:
    without = "Name:\tx\nCapEff:\t0000000000000000\n"
    with_it = f"Name:\tx\nCapEff:\t{1 << preflight.CAP_NET_ADMIN:016x}\n"
    (line,) = preflight.capabilities(lambda _: without)
    assert "CAP_NET_ADMIN" in line
    assert preflight.capabilities(lambda _: with_it) == []


def test_a_socket_directory_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    assert preflight.socket_directory(_config(tmp_path)) == []  # it can be created
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = _config(tmp_path)
    daemon = DaemonSettings(socket=blocker / "run" / "natfail.sock")
    (line,) = preflight.socket_directory(Config(config.path, daemon, config.probe, ()))
    assert str(blocker) in line and "daemon.socket" in line


def test_a_taken_metrics_address_is_named(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (line,) = preflight.metrics_address(_config(tmp_path, metrics=f"127.0.0.1:{port}"))
        assert "another process listens there" in line and str(port) in line
    assert preflight.metrics_address(_config(tmp_path)) == []
