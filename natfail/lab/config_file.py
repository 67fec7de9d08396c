"""natfail.toml for a lab: one service on the public address with every backend,
and the probe settings the demo, the tests and the benchmarks shorten."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from natfail.lab.agents import agent_address
from natfail.lab.topology import PUBLIC_PORT, PUBLIC_V4

if TYPE_CHECKING:
    from natfail.lab.lab import Lab


def probe_table(interval: float, timeout: float, rise: int, fall: int) -> str:
    """A ``[service.probe]`` table, for ``write_config(extra_service=...)``."""
    return (
        f"[service.probe]\ninterval = {interval:g}\ntimeout = {timeout:g}\n"
        f"rise = {rise}\nfall = {fall}"
    )


def write_config(
    lab: Lab,
    path: Path | None = None,
    *,
    firewall: str = "nftables",
    service: str = "wg0",
    extra_service: str = "",
    agents: bool = False,
    directory: Path | None = None,
    probe_key_file: Path | None = None,
    pair: bool = False,
    inbound_interface: str | None = None,
) -> Path:
    """A natfail config for ``lab`` (one service, every backend, priorities descending
    from a), state and socket under ``directory`` (the lab's by default);
    ``extra_service`` goes at the end of the service's table, before its backends;
    ``agents``: every backend has its agent (see :mod:`natfail.lab.agents`);
    ``probe_key_file``: the gateway's probe key (the lab's by default); ``pair``:
    ``[daemon] pair = true``; ``inbound_interface``: the service's."""
    directory = directory or lab.dir
    path = path or directory / "natfail.toml"
    state = directory / "state"
    state.mkdir(mode=0o700, exist_ok=True)
    lines = [
        "[daemon]",
        f'firewall = "{firewall}"',
        f'socket = "{directory / "natfail.sock"}"',
        f'state_dir = "{state}"',
    ]
    if pair:
        lines.append("pair = true")
    lines += [
        "",
        "[probe]",
        f'private_key_file = "{probe_key_file or lab.probe_key.file}"',
        "",
        "[[service]]",
        f'name = "{service}"',
        f'public = "{PUBLIC_V4}:{PUBLIC_PORT}"',
        f'server_public_key = "{lab.server_key.public_b64}"',
    ]
    if inbound_interface is not None:
        lines.append(f'inbound_interface = "{inbound_interface}"')
    if lab.psk_file is not None:
        lines.append(f'preshared_key_file = "{lab.psk_file}"')
    if extra_service:
        lines.append(extra_service)
    for i, b in enumerate(lab.backends):
        lines += [
            "",
            "[[service.backend]]",
            f'name = "{b.name}"',
            f'address = "{b.address}"',
            f"priority = {100 - 10 * i}",
        ]
        if agents:
            lines.append(f'agent = "{agent_address(b)}"')
    path.write_text("\n".join(lines) + "\n")
    return path
