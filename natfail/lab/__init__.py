"""A lab of network namespaces with real WireGuard, for tests, benchmarks and the demo.

One client, one gateway and N backends, each in its own namespace, with
wireguard-go on the client and on every backend; natfail (or a test's own
rules) runs in the gateway. The parts:

* :mod:`natfail.lab.topology`: the namespaces, veths, addresses and routes;
  the picture of the topology is there;
* :mod:`natfail.lab.processes`: running and killing processes in namespaces;
* :mod:`natfail.lab.wireguard`: keys, wireguard-go processes, ``wg set`` and
  ``wg show``; :mod:`natfail.lab.readings`: what the lab's interfaces say;
* :mod:`natfail.lab.lab`: :class:`Lab`, which builds and tears down the whole;
* :mod:`natfail.lab.leftovers`: markers of live labs, and removing dead ones;
* :mod:`natfail.lab.config_file`: natfail.toml for a lab;
* :mod:`natfail.lab.runner`: the daemon in the gateway, and its status and
  switch records through its control socket;
* :mod:`natfail.lab.pings`: pings from the client, and reading their output;
* :mod:`natfail.lab.agents`: ``natfail agent`` on the backends.

Command line (by hand)::

    python -m natfail.lab up [--backends N] [--keepalive S] [--no-ipv6] [--psk]
    python -m natfail.lab list
    python -m natfail.lab down          # remove leftovers of dead labs
"""

from natfail.lab.agents import AGENT_PORT, LabAgents, agent_address
from natfail.lab.cli import main
from natfail.lab.config_file import probe_table
from natfail.lab.lab import Lab
from natfail.lab.leftovers import MARKER_DIR, cleanup_stale
from natfail.lab.pings import Pinger
from natfail.lab.processes import LabError, wait_until
from natfail.lab.runner import DAEMON_ENV, DaemonRunner, decided_at
from natfail.lab.topology import (
    BACKEND_NAMES,
    CLIENT_TUNNEL_V4,
    CLIENT_TUNNEL_V6,
    CLIENT_WAN_V4,
    CLIENT_WAN_V6,
    GATEWAY_LAN_V4,
    GATEWAY_LAN_V6,
    GATEWAY_WAN_V4,
    GATEWAY_WAN_V6,
    PUBLIC_PORT,
    PUBLIC_V4,
    PUBLIC_V6,
    SERVER_TUNNEL_V4,
    SERVER_TUNNEL_V6,
    LabBackend,
    LabClient,
    LabGateway,
)
from natfail.lab.wireguard import WG_RUN_DIR, Transfer, WgKey, WgPeer, WgShow, genkey, pubkey

__all__ = [
    "AGENT_PORT",
    "BACKEND_NAMES",
    "CLIENT_TUNNEL_V4",
    "CLIENT_TUNNEL_V6",
    "CLIENT_WAN_V4",
    "CLIENT_WAN_V6",
    "DAEMON_ENV",
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
    "DaemonRunner",
    "Lab",
    "LabAgents",
    "LabBackend",
    "LabClient",
    "LabError",
    "LabGateway",
    "Pinger",
    "Transfer",
    "WgKey",
    "WgPeer",
    "WgShow",
    "agent_address",
    "cleanup_stale",
    "decided_at",
    "genkey",
    "main",
    "probe_table",
    "pubkey",
    "wait_until",
]
