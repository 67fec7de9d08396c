"""More clients for a lab: ``count`` wireguard-go interfaces in the client's
namespace, each with its own key, source port and tunnel address
(10.99.1.N), all talking to the service at the public address.

Every extra client routes the server's tunnel address through its own
interface for packets from its own address (one policy-routing table each),
so ``ping -I 10.99.1.N 10.99.0.1`` goes through that client's tunnel. The
backends learn each client as a peer with :meth:`ExtraClients.add_to`; a
backend restarted by the lab forgets them and must be told again."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from natfail.lab import leftovers
from natfail.lab.processes import ip_batch, ns_argv, run
from natfail.lab.topology import SERVER_TUNNEL_V4, public_endpoint
from natfail.lab.wireguard import WgKey, WgProcess, client_peer_argv, new_key

if TYPE_CHECKING:
    from natfail.lab.lab import Lab
    from natfail.lab.topology import LabBackend

EXTRA_NET: Final = "10.99.1"
TABLE_BASE: Final = 1000
MAX_EXTRA: Final = 100


class ExtraClient:
    def __init__(self, lab: Lab, index: int, keepalive: int | None) -> None:
        self.index = index
        self.ifname = f"wx{lab.id}{index}"
        self.address = f"{EXTRA_NET}.{index}"
        self.keepalive = keepalive
        self.key: WgKey = new_key(lab.dir, f"extra-client-{index}")
        lab.ifnames.add(self.ifname)
        self.wg: WgProcess = lab._wg(lab.client.ns, self.ifname, f"extra-client-{index}")


class ExtraClients:
    """``count`` more clients in ``lab``'s client namespace; those whose index
    is in ``keepalive_every`` steps (every ``keepalive_every``-th, 0: none)
    send a PersistentKeepalive every ``keepalive`` seconds."""

    def __init__(
        self, lab: Lab, count: int, *, keepalive: int = 25, keepalive_every: int = 0
    ) -> None:
        if not 1 <= count <= MAX_EXTRA:
            raise ValueError(f"count must be 1..{MAX_EXTRA}")
        self.lab = lab
        self.clients = [
            ExtraClient(
                lab,
                i,
                keepalive if keepalive_every and i % keepalive_every == 0 else None,
            )
            for i in range(1, count + 1)
        ]
        # The lab's marker names them too, so a dead lab's cleanup finds them.
        leftovers.write_marker(lab.id, lab.prefix, lab.namespaces, lab.ifnames, [lab.dir])
        ns = lab.client.ns
        for c in self.clients:
            c.wg.spawn()
        for c in self.clients:
            c.wg.wait_ready()
            lab.exec(ns, ["wg", "set", c.ifname, "private-key", str(c.key.file)])
            lab.exec(
                ns,
                client_peer_argv(
                    c.ifname,
                    lab.server_key.public_b64,
                    public_endpoint(4),
                    f"{SERVER_TUNNEL_V4}/32",
                    c.keepalive,
                ),
            )
        commands: list[str] = []
        for c in self.clients:
            table = TABLE_BASE + c.index
            commands += [
                f"addr add {c.address}/32 dev {c.ifname}",
                f"link set {c.ifname} up",
                f"route add {SERVER_TUNNEL_V4}/32 dev {c.ifname} table {table}",
                f"rule add from {c.address} lookup {table}",
            ]
        ip_batch(ns, commands)

    def add_to(self, backend: LabBackend) -> None:
        """Makes every extra client a peer of ``backend``, and routes their
        addresses into its tunnel."""
        argv = ["wg", "set", backend.wg_if]
        for c in self.clients:
            argv += ["peer", c.key.public_b64, "allowed-ips", f"{c.address}/32"]
        run(ns_argv(backend.ns, argv))
        run(
            ns_argv(
                backend.ns,
                ["ip", "route", "replace", f"{EXTRA_NET}.0/24", "dev", backend.wg_if],
            )
        )

    def ping(self, client: ExtraClient, timeout: float = 3.0) -> bool:
        """One ping from ``client`` through its tunnel."""
        cp = self.lab.exec(
            self.lab.client,
            ["ping", "-n", "-q", "-c", "1", "-W", f"{timeout:g}", "-I", client.address,
             SERVER_TUNNEL_V4],
            check=False,
            timeout=timeout + 5,
        )  # fmt: skip
        return cp.returncode == 0

    def handshakes(self) -> dict[int, float]:
        """Each extra client's latest handshake (Unix time; 0: none)."""
        out: dict[int, float] = {}
        for c in self.clients:
            cp = self.lab.exec(
                self.lab.client, ["wg", "show", c.ifname, "latest-handshakes"], check=False
            )
            fields = cp.stdout.split()
            out[c.index] = float(fields[1]) if len(fields) >= 2 else 0.0
        return out

    def rehandshake_all(self) -> None:
        """Every extra client forgets its session and pings, so that each has
        a fresh handshake with whichever backend the gateway sends it to."""
        ns = self.lab.client.ns
        for c in self.clients:
            self.lab.exec(ns, ["wg", "set", c.ifname, "peer", self.lab.server_key.public_b64,
                               "remove"])  # fmt: skip
            self.lab.exec(
                ns,
                client_peer_argv(
                    c.ifname,
                    self.lab.server_key.public_b64,
                    public_endpoint(4),
                    f"{SERVER_TUNNEL_V4}/32",
                    c.keepalive,
                ),
            )
        time.sleep(0.1)
