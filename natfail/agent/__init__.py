"""``natfail agent``, the small daemon on each backend host: it reads the host's
WireGuard interfaces, reports their recent clients to the gateways and, when a
gateway makes this backend active, makes the backend start the handshake
towards each client itself (see DESIGN.md, "Hitless failover: the agent").

:mod:`~natfail.agent.wireguard` reads and steers a WireGuard interface
(wireguard-go through its UAPI socket, the kernel module through ``wg``);
:mod:`~natfail.agent.config` reads ``/etc/natfail/agent.toml``. Nothing here
may import scapy."""
