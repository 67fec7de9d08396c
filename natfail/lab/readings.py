"""What the lab's WireGuard interfaces say (``wg show``): endpoints, handshakes and the
bytes each backend exchanged with the client."""

from __future__ import annotations

from natfail.lab.processes import Namespaces, NsLike
from natfail.lab.topology import LabBackend, LabClient
from natfail.lab.wireguard import Transfer, WgKey, WgShow, parse_dump


class WireGuardReadings(Namespaces):
    """The read-only half of :class:`natfail.lab.Lab`: its nodes and keys, as ``wg show``
    in their namespaces reports them."""

    id: str
    client: LabClient
    backends: list[LabBackend]
    server_key: WgKey
    client_key: WgKey
    probe_key: WgKey

    def backend(self, name: str) -> LabBackend:
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(f"lab {self.id} has no backend {name!r}")

    def wg_show(self, ns: NsLike, ifname: str) -> WgShow:
        """``wg show IFNAME dump`` in a namespace, parsed."""
        return parse_dump(ifname, self.exec(ns, ["wg", "show", ifname, "dump"]).stdout)

    def client_show(self) -> WgShow:
        return self.wg_show(self.client, self.client.wg_if)

    def backend_show(self, backend: LabBackend | str) -> WgShow:
        b = self.backend(backend) if isinstance(backend, str) else backend
        return self.wg_show(b, b.wg_if)

    def client_endpoint(self) -> str | None:
        """The server endpoint the client's WireGuard uses now, e.g. ``203.0.113.10:51820``."""
        peer = self.client_show().peers.get(self.server_key.public_b64)
        return peer.endpoint if peer else None

    def latest_handshake(self, backend: LabBackend | str, peer: str = "client") -> int:
        """Unix time of a backend's latest handshake with ``peer`` ("client", "probe" or a
        base64 public key); 0 for never or for a backend that is stopped or paused."""
        b = self.backend(backend) if isinstance(backend, str) else backend
        if not b.running or b.paused:
            return 0
        named = {"client": self.client_key.public_b64, "probe": self.probe_key.public_b64}
        p = self.backend_show(b).peers.get(named.get(peer, peer))
        return p.latest_handshake if p else 0

    def transfers(self) -> dict[str, Transfer]:
        """Per backend name, the bytes its WireGuard exchanged with the client
        (0, 0 for a stopped or paused backend; counters restart with the process)."""
        out: dict[str, Transfer] = {}
        for b in self.backends:
            t = Transfer(0, 0)
            if b.running and not b.paused:
                p = self.backend_show(b).peers.get(self.client_key.public_b64)
                if p:
                    t = Transfer(p.rx, p.tx)
            out[b.name] = t
        return out

    def carrying_backends(self, before: dict[str, Transfer]) -> list[str]:
        """Names of the backends that received client traffic since ``before`` (a
        :meth:`transfers` snapshot). A counter that went down means a restart."""
        names = []
        for name, t in self.transfers().items():
            old = before.get(name, Transfer(0, 0))
            if t.rx > old.rx if t.rx >= old.rx else t.rx > 0:
                names.append(name)
        return names
