"""The desired firewall state of natfail, and how it looks in nftables and iptables.

Pure: no I/O. The dataplanes (:mod:`natfail.io.nftables`, :mod:`natfail.io.iptables`)
install what this module computes and read it back into the same form.

The canonical form is a :class:`Ruleset`: a set of entries, one per thing the kernel
must do.

* :class:`Dnat` per service with an active backend: UDP to ``public`` (optionally only
  from ``inbound_interface``) is DNATed to the active backend and its new conntrack
  entry gets the backend's mark (``ct mark set M dnat to B``).
* :class:`Snat` per backend of every service (active or not): UDP that the backend
  itself starts from its WireGuard port leaves the gateway as ``public`` and gets the
  backend's mark. A standby's SNAT stays too, although its fence (below) drops what it
  would apply to: a switch then moves only DNAT and fence elements, never an SNAT.
* :class:`Masquerade` per backend of a ``source_nat = "masquerade"`` service: DNATed
  client traffic of that backend's mark is also SNATed to the gateway.
* :class:`Fence` per backend of a service with an active backend, other than that one:
  UDP that the backend starts from its WireGuard port (conntrack direction original),
  forwarded through the gateway, is dropped before the SNAT could give it the public
  endpoint. A standby that re-handshakes with a client (its stale timers, or an agent
  told it the client's endpoint) would otherwise take the client's flow over: the
  client's WireGuard accepts it from the public address and the flow follows it. Only
  the original direction: a reply in a flow the gateway DNATed to that backend (the
  old backend answering until its conntrack entries are removed) passes, and the
  gateway's own probes never cross the forward hook at all. A service with no active
  backend yet fences nothing (no DNAT, nothing to take over). With or without agents,
  for both ``source_nat`` modes: a standby that speaks to a client is always wrong.

Marks (:func:`backend_mark`): ``0x6E`` ("n") in the top byte, then the low 24 bits of
BLAKE2b("natfail\\0" service "\\0" backend). They only depend on the two names, so they
are the same after a restart or a reload and a restarted daemon can tell which backend
an installed rule or a conntrack entry belongs to. A mark is never 0 and never lacks the
prefix (:func:`is_natfail_mark`); two (service, backend) pairs with the same mark are
refused (:class:`RulesetError`: rename one). natfail sets the whole 32-bit ct mark.

When a service has no active backend (all down), the caller keeps passing the last
active one: the last rule stays. ``None`` means "never had one" (no DNAT and no fence,
SNAT only).

nftables (:func:`nft_commands`): one ``table inet natfail`` with two nat base chains
whose rules never change; the backend choice lives in maps keyed by the public endpoint
(``dnat4``/``mark4``, ``dnat4_if``/``mark4_if`` with the inbound interface in the key,
the same with 6) and ``snat4``/``smark4`` keyed by the backend endpoint, plus a ``masq``
set of marks. The fence is a filter chain ``fence`` (``hook forward priority filter -
10``) with one rule per family, ``ct direction original ip saddr . udp sport @fence4
counter drop`` (the same with ``ip6`` and ``@fence6``), the sets keyed like ``snat4``.
A swap is "delete element, add element" of the DNAT maps and of the fence set in one
transaction: the old backend is fenced in the very transaction that takes its traffic
away, the new one unfenced in the one that gives it the traffic. Every element carries
a comment ``service/backend`` so a read-back gives the names.

The fence chain's priority: a drop in any base chain is final and an accept in another
one (a user's, iptables' FORWARD) only ends that chain, so no other chain can let a
fenced packet through, whatever the order. Just before ``filter`` (0), it runs before
the users' and iptables' filter chains, whose counters, logs and flowtable ``flow add``
then never see a packet that is dropped anyway, and leaves ``mangle`` (-150) to them.
There is no NAT on the forward hook, so the addresses it matches are the backend's own.

iptables (:func:`iptables_rules`): chains ``NATFAIL-PRE`` and ``NATFAIL-POST`` in the
nat table (``-j`` from PREROUTING and POSTROUTING), two rules per entry (CONNMARK, then
DNAT/SNAT/MASQUERADE), each with a comment ``natfail <kind> service/backend``; the fence
is chain ``NATFAIL-FENCE`` of the filter table (``-j`` from FORWARD), one rule per
fenced backend, ``-s B -p udp --sport P -m conntrack --ctdir ORIGINAL -j DROP``. The
two tables are two commits; :func:`iptables_commits` orders them so that no moment lets
a standby's packet out.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from natfail.core.model import Endpoint, Service

__all__ = [
    "IPT_FENCE_CHAIN",
    "IPT_POST_CHAIN",
    "IPT_PRE_CHAIN",
    "MARK_MASK",
    "MARK_PREFIX",
    "MARK_PREFIX_MASK",
    "NFT_FAMILY",
    "NFT_TABLE",
    "Builder",
    "Dnat",
    "Fence",
    "IptCommit",
    "IptRule",
    "Masquerade",
    "Ruleset",
    "RulesetError",
    "Snat",
    "active_from",
    "backend_mark",
    "build",
    "foreign_targets",
    "iptables_commits",
    "iptables_fence_rules",
    "iptables_rules",
    "is_natfail_mark",
    "marks",
    "nft_commands",
    "nft_full_commands",
    "nft_parse",
    "validate",
]

MARK_PREFIX: Final = 0x6E000000
MARK_PREFIX_MASK: Final = 0xFF000000
MARK_MASK: Final = 0xFFFFFFFF

NFT_FAMILY: Final = "inet"
NFT_TABLE: Final = "natfail"
IPT_PRE_CHAIN: Final = "NATFAIL-PRE"
IPT_POST_CHAIN: Final = "NATFAIL-POST"
IPT_FENCE_CHAIN: Final = "NATFAIL-FENCE"


class RulesetError(ValueError):
    """A set of decisions that cannot be turned into rules (one line)."""


# --- marks ----------------------------------------------------------------------------


def backend_mark(service: str, backend: str) -> int:
    """The conntrack mark of one backend of one service (see the module docstring)."""
    digest = hashlib.blake2b(
        b"natfail\0" + service.encode() + b"\0" + backend.encode(), digest_size=8
    ).digest()
    return MARK_PREFIX | (int.from_bytes(digest, "big") & 0x00FFFFFF)


def is_natfail_mark(mark: int) -> bool:
    """True for a mark natfail could have set (the prefix in the top byte, never 0)."""
    return 0 < mark <= MARK_MASK and mark & MARK_PREFIX_MASK == MARK_PREFIX


def marks(services: Iterable[Service]) -> dict[tuple[str, str], int]:
    """``{(service, backend): mark}`` for every backend; RulesetError on a collision."""
    out: dict[tuple[str, str], int] = {}
    seen: dict[int, tuple[str, str]] = {}
    for svc in services:
        for b in svc.backends:
            m = backend_mark(svc.name, b.name)
            other = seen.get(m)
            if other is not None and other != (svc.name, b.name):
                raise RulesetError(
                    f"backends {other[0]}/{other[1]} and {svc.name}/{b.name} get the same "
                    f"conntrack mark {m:#010x}; rename one of them"
                )
            seen[m] = (svc.name, b.name)
            out[(svc.name, b.name)] = m
    return out


# --- the canonical form ---------------------------------------------------------------


@dataclass(frozen=True)
class Dnat:
    """UDP to ``public`` (from ``inbound_interface``, if set) → ``backend``, ct mark ``mark``."""

    public: Endpoint
    inbound_interface: str | None
    backend: Endpoint
    mark: int
    service: str
    backend_name: str

    def sort_key(self) -> tuple[str, str, str, int, str, str]:
        return (
            str(self.public),
            self.inbound_interface or "",
            str(self.backend),
            self.mark,
            self.service,
            self.backend_name,
        )

    @property
    def family(self) -> int:
        return self.public.family


@dataclass(frozen=True)
class Snat:
    """UDP that ``backend`` starts from its port leaves as ``public``, ct mark ``mark``."""

    backend: Endpoint
    public: Endpoint
    mark: int
    service: str
    backend_name: str

    def sort_key(self) -> tuple[str, str, int, str, str]:
        return (str(self.backend), str(self.public), self.mark, self.service, self.backend_name)

    @property
    def family(self) -> int:
        return self.backend.family


@dataclass(frozen=True, order=True)
class Masquerade:
    """DNATed client traffic with ct mark ``mark`` is SNATed to the gateway too."""

    mark: int
    service: str
    backend_name: str


@dataclass(frozen=True)
class Fence:
    """UDP that ``backend`` (a standby) starts from its port is dropped at the gateway."""

    backend: Endpoint
    service: str
    backend_name: str

    def sort_key(self) -> tuple[str, str, str]:
        return (str(self.backend), self.service, self.backend_name)

    @property
    def family(self) -> int:
        return self.backend.family


@dataclass(frozen=True)
class Ruleset:
    """Everything natfail wants installed (or finds installed)."""

    dnat: frozenset[Dnat] = frozenset()
    snat: frozenset[Snat] = frozenset()
    masquerade: frozenset[Masquerade] = frozenset()
    fence: frozenset[Fence] = frozenset()

    def __post_init__(self) -> None:
        _check_unique(self)

    @property
    def empty(self) -> bool:
        return not (self.dnat or self.snat or self.masquerade or self.fence)

    def nat(self) -> Ruleset:
        """The same without the fence: what the NAT rules alone hold."""
        if not self.fence:
            return self
        return _unchecked(self.dnat, self.snat, self.masquerade, frozenset())

    def active(self) -> dict[str, str]:
        """``{service: backend}`` of the DNATs: what a restarted daemon adopts."""
        return {d.service: d.backend_name for d in self.dnat}


def _check_unique(rs: Ruleset) -> None:
    publics: dict[Endpoint, str] = {}
    for d in rs.dnat:
        if d.public.family != d.backend.family:
            raise RulesetError(f"{d.service}: {d.public} and {d.backend} differ in family")
        if not is_natfail_mark(d.mark):
            raise RulesetError(f"{d.service}/{d.backend_name}: {d.mark:#x} is not a natfail mark")
        if d.public in publics:
            raise RulesetError(f"services {publics[d.public]} and {d.service} both use {d.public}")
        publics[d.public] = d.service
    sources: dict[Endpoint, Snat] = {}
    for s in rs.snat:
        if s.public.family != s.backend.family:
            raise RulesetError(f"{s.service}: {s.public} and {s.backend} differ in family")
        if not is_natfail_mark(s.mark):
            raise RulesetError(f"{s.service}/{s.backend_name}: {s.mark:#x} is not a natfail mark")
        other = sources.get(s.backend)
        if other is not None:
            raise RulesetError(
                f"backend address {s.backend} is used by {other.service}/{other.backend_name}"
                f" and {s.service}/{s.backend_name}"
            )
        sources[s.backend] = s
    for m in rs.masquerade:
        if not is_natfail_mark(m.mark):
            raise RulesetError(f"{m.service}/{m.backend_name}: {m.mark:#x} is not a natfail mark")
    # one element per endpoint in the fence sets: two names for one would read back as one
    fenced: dict[Endpoint, Fence] = {}
    for f in rs.fence:
        seen = fenced.get(f.backend)
        if seen is not None:
            raise RulesetError(
                f"backend address {f.backend} is fenced for {seen.service}/{seen.backend_name}"
                f" and {f.service}/{f.backend_name}"
            )
        fenced[f.backend] = f


def _unchecked(
    dnat: frozenset[Dnat],
    snat: frozenset[Snat],
    masquerade: frozenset[Masquerade],
    fence: frozenset[Fence],
) -> Ruleset:
    """A Ruleset made of parts already known to be valid together (no check)."""
    rs = object.__new__(Ruleset)
    object.__setattr__(rs, "dnat", dnat)
    object.__setattr__(rs, "snat", snat)
    object.__setattr__(rs, "masquerade", masquerade)
    object.__setattr__(rs, "fence", fence)
    return rs


def build(services: Iterable[Service], active: Mapping[str, str | None]) -> Ruleset:
    """The desired state for the services and the active backend of each.

    ``active[service]`` names the backend that gets the traffic (the caller keeps the
    last active one when all are down) and every other backend of it is fenced; a
    missing or None entry installs no DNAT and no fence for that service (its SNAT
    stays). An unknown service or backend name is an error."""
    services = tuple(services)
    by_name = {s.name: s for s in services}
    for name in active:
        if name not in by_name:
            raise RulesetError(f"unknown service {name!r}")
    mark_of = marks(services)
    dnat: set[Dnat] = set()
    snat: set[Snat] = set()
    masq: set[Masquerade] = set()
    fence: set[Fence] = set()
    for svc in services:
        chosen = active.get(svc.name)
        if chosen is not None:
            b = svc.backend(chosen)
            if b is None:
                raise RulesetError(f"service {svc.name} has no backend {chosen!r}")
            fence.update(
                Fence(o.address, svc.name, o.name) for o in svc.backends if o.name != b.name
            )
            dnat.add(
                Dnat(
                    svc.public,
                    svc.inbound_interface,
                    b.address,
                    mark_of[(svc.name, b.name)],
                    svc.name,
                    b.name,
                )
            )
        for b in svc.backends:
            m = mark_of[(svc.name, b.name)]
            snat.add(Snat(b.address, svc.public, m, svc.name, b.name))
            if svc.source_nat == "masquerade":
                masq.add(Masquerade(m, svc.name, b.name))
    return Ruleset(frozenset(dnat), frozenset(snat), frozenset(masq), frozenset(fence))


class Builder:
    """:func:`build` for one config, made once: the SNAT and masquerade parts
    never change with the actives, and each service's DNAT and fence are one
    of a few. The unchanged parts are the very same objects, so the next diff
    skips them, and a build that differs from the previous one in a few
    services changes only their entries in the previous sets: a switch of one
    service among a thousand costs no hashing of the other 999."""

    def __init__(self, services: Iterable[Service]) -> None:
        self.services = tuple(services)
        base = build(self.services, {})  # checks the parts that never change
        self._snat, self._masquerade = base.snat, base.masquerade
        mark_of = marks(self.services)
        self._dnat: dict[tuple[str, str], Dnat] = {}
        self._fence: dict[tuple[str, str], tuple[Fence, ...]] = {}
        for svc in self.services:
            fences = {b.name: Fence(b.address, svc.name, b.name) for b in svc.backends}
            for b in svc.backends:
                self._dnat[(svc.name, b.name)] = Dnat(
                    svc.public,
                    svc.inbound_interface,
                    b.address,
                    mark_of[(svc.name, b.name)],
                    svc.name,
                    b.name,
                )
                self._fence[(svc.name, b.name)] = tuple(
                    f for name, f in fences.items() if name != b.name
                )
        self._names = {svc.name for svc in self.services}
        self._last: tuple[dict[str, str | None], Ruleset] | None = None

    def _dnat_of(self, name: str, chosen: str) -> Dnat:
        d = self._dnat.get((name, chosen))
        if d is None:
            if name not in self._names:
                raise RulesetError(f"unknown service {name!r}")
            raise RulesetError(f"service {name} has no backend {chosen!r}")
        return d

    def build(self, active: Mapping[str, str | None]) -> Ruleset:
        # Each service has one public endpoint of its own (checked in __init__
        # and by the config), and the fences are backends whose addresses the
        # SNATs already proved unique, so neither needs a further check.
        if self._last is not None and self._last[0].keys() == active.keys():
            rs = self._changed(*self._last, active)
        else:
            dnat: list[Dnat] = []
            fence: list[Fence] = []
            for name, chosen in active.items():
                if chosen is not None:
                    dnat.append(self._dnat_of(name, chosen))
                    fence += self._fence[(name, chosen)]
            rs = _unchecked(frozenset(dnat), self._snat, self._masquerade, frozenset(fence))
        self._last = (dict(active), rs)
        return rs

    def _changed(
        self, before: dict[str, str | None], last: Ruleset, active: Mapping[str, str | None]
    ) -> Ruleset:
        """``last`` (built for ``before``) with the entries of the services whose
        choice differs in ``active`` replaced."""
        gone_dnat: list[Dnat] = []
        new_dnat: list[Dnat] = []
        gone_fence: list[Fence] = []
        new_fence: list[Fence] = []
        for name, chosen in active.items():
            was = before[name]
            if was == chosen:
                continue
            if chosen is not None:
                new_dnat.append(self._dnat_of(name, chosen))
                new_fence += self._fence[(name, chosen)]
            if was is not None:
                gone_dnat.append(self._dnat[(name, was)])
                gone_fence += self._fence[(name, was)]
        if not (new_dnat or gone_dnat):
            return last
        return _unchecked(
            last.dnat.difference(gone_dnat).union(new_dnat),
            self._snat,
            self._masquerade,
            last.fence.difference(gone_fence).union(new_fence),
        )


def active_from(installed: Ruleset, services: Iterable[Service]) -> dict[str, str]:
    """What a restarted daemon adopts: ``{service: backend}`` for each installed DNAT that
    still matches the config (same public endpoint, a backend of that name at that
    address, the expected mark). Anything else is drift the next apply replaces."""
    by_name = {s.name: s for s in services}
    out: dict[str, str] = {}
    for d in installed.dnat:
        svc = by_name.get(d.service)
        if svc is None or svc.public != d.public or svc.inbound_interface != d.inbound_interface:
            continue
        b = svc.backend(d.backend_name)
        if b is None or b.address != d.backend or backend_mark(svc.name, b.name) != d.mark:
            continue
        out[svc.name] = b.name
    return out


def foreign_targets(service: Service, by_reply_source: Mapping[Endpoint, int]) -> dict[str, int]:
    """``{address: flows}`` of client flows to the service's public endpoint that a NAT
    which is not natfail's rewrote: their reply source is neither one of the service's
    backends (natfail's DNAT) nor the public endpoint itself (no NAT at all)."""
    ours = {b.address for b in service.backends} | {service.public}
    return {str(src): n for src, n in by_reply_source.items() if src not in ours and n > 0}


def validate(services: Iterable[Service]) -> list[str]:
    """Why these services cannot be turned into rules, one line each (empty: they can).

    The one check that config loading (and so check-config, start and reload) runs:
    every mark and every SNAT, and a DNAT for each service, built once. A DNAT to
    another backend of the same service differs only in an address of the public
    endpoint's family (the config checks that) and in a mark already checked here,
    so no later choice of active backends can fail."""
    services = tuple(services)
    try:
        build(services, {s.name: s.backends[0].name for s in services if s.backends})
    except RulesetError as exc:
        return [str(exc)]
    return []


# --- nftables -------------------------------------------------------------------------

Json = dict[str, Any]

_T: Final = {"family": NFT_FAMILY, "table": NFT_TABLE}
_AF: Final = {4: ("ip", "ipv4_addr"), 6: ("ip6", "ipv6_addr")}
_PRE: Final = "prerouting"
_POST: Final = "postrouting"
_FENCE: Final = "fence"
# comment of each rule of the skeleton, in order per chain: a read-back checks them
NFT_RULES: Final = {
    _PRE: ("natfail dnat4_if", "natfail dnat4", "natfail dnat6_if", "natfail dnat6"),
    _POST: ("natfail snat4", "natfail snat6", "natfail masquerade"),
    _FENCE: ("natfail fence4", "natfail fence6"),
}
# name -> (type, hook, priority) of each base chain (a read-back checks type and hook)
NFT_CHAINS: Final = {
    _PRE: ("nat", "prerouting", -100),
    _POST: ("nat", "postrouting", 100),
    _FENCE: ("filter", "forward", -10),
}


def _maps() -> dict[str, tuple[list[str], str]]:
    """name → (key type, data type) of every map natfail's table holds. Address and port
    are two maps (``dnat ip to K map @dnat4 : K map @dnatport4``): libnftables 1.0.6
    crashes on the JSON of a NAT statement with one concatenated ``addr . port`` map."""
    out: dict[str, tuple[list[str], str]] = {}
    for fam, (_, addr) in _AF.items():
        plain, with_if = [addr, "inet_service"], ["ifname", addr, "inet_service"]
        for suffix, key in (("", plain), ("_if", with_if)):
            out[f"dnat{fam}{suffix}"] = (key, addr)
            out[f"dnatport{fam}{suffix}"] = (key, "inet_service")
            out[f"mark{fam}{suffix}"] = (key, "mark")
        out[f"snat{fam}"] = ([addr, "inet_service"], addr)
        out[f"snatport{fam}"] = ([addr, "inet_service"], "inet_service")
        out[f"smark{fam}"] = ([addr, "inet_service"], "mark")
    return out


NFT_MAPS: Final = _maps()
NFT_SETS: Final[dict[str, str | list[str]]] = {
    "masq": "mark",
    **{f"fence{fam}": [addr, "inet_service"] for fam, (_, addr) in _AF.items()},
}


def _payload(proto: str, fieldname: str) -> Json:
    return {"payload": {"protocol": proto, "field": fieldname}}


def _mapped(key: list[Json], mapname: str) -> Json:
    return {"map": {"key": {"concat": key}, "data": "@" + mapname}}


def _rule(chain: str, comment: str, expr: list[Json]) -> Json:
    return {"add": {"rule": {**_T, "chain": chain, "comment": comment, "expr": expr}}}


def _skeleton() -> list[Json]:
    cmds: list[Json] = [{"add": {"table": {"family": NFT_FAMILY, "name": NFT_TABLE}}}]
    for name, (ktype, dtype) in NFT_MAPS.items():
        cmds.append({"add": {"map": {**_T, "name": name, "type": ktype, "map": dtype}}})
    for name, stype in NFT_SETS.items():
        cmds.append({"add": {"set": {**_T, "name": name, "type": stype}}})
    for chain, (ctype, hook, prio) in NFT_CHAINS.items():
        cmds.append(
            {
                "add": {
                    "chain": {
                        **_T,
                        "name": chain,
                        "type": ctype,
                        "hook": hook,
                        "prio": prio,
                        "policy": "accept",
                    }
                }
            }
        )
    for fam, (proto, _) in _AF.items():
        for suffix in ("_if", ""):
            key = [_payload(proto, "daddr"), _payload("udp", "dport")]
            if suffix:
                key.insert(0, {"meta": {"key": "iifname"}})
            cmds.append(
                _rule(
                    _PRE,
                    f"natfail dnat{fam}{suffix}",
                    [
                        {
                            "mangle": {
                                "key": {"ct": {"key": "mark"}},
                                "value": _mapped(key, f"mark{fam}{suffix}"),
                            }
                        },
                        {
                            "dnat": {
                                "family": proto,
                                "addr": _mapped(key, f"dnat{fam}{suffix}"),
                                "port": _mapped(key, f"dnatport{fam}{suffix}"),
                            }
                        },
                    ],
                )
            )
    for fam, (proto, _) in _AF.items():
        key = [_payload(proto, "saddr"), _payload("udp", "sport")]
        cmds.append(
            _rule(
                _POST,
                f"natfail snat{fam}",
                [
                    {
                        "mangle": {
                            "key": {"ct": {"key": "mark"}},
                            "value": _mapped(key, f"smark{fam}"),
                        }
                    },
                    {
                        "snat": {
                            "family": proto,
                            "addr": _mapped(key, f"snat{fam}"),
                            "port": _mapped(key, f"snatport{fam}"),
                        }
                    },
                ],
            )
        )
    cmds.append(
        _rule(
            _POST,
            "natfail masquerade",
            [
                {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
                {"match": {"op": "==", "left": {"ct": {"key": "mark"}}, "right": "@masq"}},
                {"masquerade": None},
            ],
        )
    )
    for fam, (proto, _) in _AF.items():
        # ``udp sport`` brings ``meta l4proto udp`` with it; the counter tells an
        # operator how often a standby tried to reach a client.
        cmds.append(
            _rule(
                _FENCE,
                f"natfail fence{fam}",
                [
                    {
                        "match": {
                            "op": "==",
                            "left": {"ct": {"key": "direction"}},
                            "right": "original",
                        }
                    },
                    {
                        "match": {
                            "op": "==",
                            "left": {
                                "concat": [_payload(proto, "saddr"), _payload("udp", "sport")]
                            },
                            "right": f"@fence{fam}",
                        }
                    },
                    {"counter": None},
                    {"drop": None},
                ],
            )
        )
    return cmds


def _ep(e: Endpoint) -> list[str | int]:
    return [str(e.ip), e.port]


def _minus(x: frozenset[Any], y: frozenset[Any]) -> frozenset[Any]:
    return frozenset() if x is y else x - y


def _difference(a: Ruleset, b: Ruleset) -> Ruleset:
    """What ``a`` has and ``b`` has not (unchecked: part of a valid ruleset)."""
    return _unchecked(
        _minus(a.dnat, b.dnat),
        _minus(a.snat, b.snat),
        _minus(a.masquerade, b.masquerade),
        _minus(a.fence, b.fence),
    )


def _elements(rs: Ruleset) -> dict[tuple[str, tuple[Any, ...]], tuple[Any, str]]:
    """(map or set name, key) → (data, comment) for every element of ``rs``."""
    out: dict[tuple[str, tuple[Any, ...]], tuple[Any, str]] = {}
    for d in rs.dnat:
        fam = d.family
        comment = f"{d.service}/{d.backend_name}"
        if d.inbound_interface:
            key: tuple[Any, ...] = (d.inbound_interface, *_ep(d.public))
            suffix = "_if"
        else:
            key = tuple(_ep(d.public))
            suffix = ""
        out[(f"dnat{fam}{suffix}", key)] = (str(d.backend.ip), comment)
        out[(f"dnatport{fam}{suffix}", key)] = (d.backend.port, comment)
        out[(f"mark{fam}{suffix}", key)] = (d.mark, comment)
    for s in rs.snat:
        comment = f"{s.service}/{s.backend_name}"
        key = tuple(_ep(s.backend))
        out[(f"snat{s.family}", key)] = (str(s.public.ip), comment)
        out[(f"snatport{s.family}", key)] = (s.public.port, comment)
        out[(f"smark{s.family}", key)] = (s.mark, comment)
    for m in rs.masquerade:
        out[("masq", (m.mark,))] = (None, f"{m.service}/{m.backend_name}")
    for f in rs.fence:
        out[(f"fence{f.family}", tuple(_ep(f.backend)))] = (None, f"{f.service}/{f.backend_name}")
    return out


def _elem_json(key: tuple[Any, ...], comment: str | None) -> Json | Any:
    val: Any = {"concat": list(key)} if len(key) > 1 else key[0]
    if comment is None:
        return val
    return {"elem": {"val": val, "comment": comment}}


def _data_json(data: Any) -> Any:
    return {"concat": list(data)} if isinstance(data, tuple) else data


def _element_cmd(op: str, name: str, items: list[tuple[tuple[Any, ...], Any, str | None]]) -> Json:
    if name in NFT_SETS:
        elems: list[Any] = [_elem_json(k, c) for k, _, c in items]
    elif op == "delete":
        elems = [_elem_json(k, None) for k, _, _ in items]
    else:
        elems = [[_elem_json(k, c), _data_json(d)] for k, d, c in items]
    return {op: {"element": {**_T, "name": name, "elem": elems}}}


def nft_commands(installed: Ruleset, desired: Ruleset) -> list[Json]:
    """The libnftables JSON commands (one transaction) that turn ``installed`` (read back
    from an intact natfail table) into ``desired``: deletes of changed or removed
    elements, then adds of changed or new ones. [] when nothing changes.

    Only the parts that differ are turned into elements: in a valid ruleset no
    two parts make the same element key, so an unchanged part can never
    decide a changed one's command."""
    old = _elements(_difference(installed, desired))
    new = _elements(_difference(desired, installed))
    deletes: dict[str, list[tuple[tuple[Any, ...], Any, str | None]]] = {}
    adds: dict[str, list[tuple[tuple[Any, ...], Any, str | None]]] = {}
    for (name, key), value in sorted(old.items(), key=repr):
        if new.get((name, key)) != value:
            deletes.setdefault(name, []).append((key, value[0], None))
    for (name, key), value in sorted(new.items(), key=repr):
        if old.get((name, key)) != value:
            adds.setdefault(name, []).append((key, value[0], value[1]))
    cmds = [_element_cmd("delete", n, items) for n, items in deletes.items()]
    cmds += [_element_cmd("add", n, items) for n, items in adds.items()]
    return cmds


def nft_full_commands(desired: Ruleset, *, table_exists: bool = True) -> list[Json]:
    """One transaction that (re)creates natfail's table from scratch with ``desired``:
    for a first install or to repair a damaged table. ``add table`` then ``delete table``
    first, so it works whether the table exists or not; nothing else is touched."""
    cmds: list[Json] = []
    if table_exists:
        cmds += [
            {"add": {"table": {"family": NFT_FAMILY, "name": NFT_TABLE}}},
            {"delete": {"table": {"family": NFT_FAMILY, "name": NFT_TABLE}}},
        ]
    cmds += _skeleton()
    return cmds + nft_commands(Ruleset(), desired)


def _unconcat(value: Any) -> tuple[Any, ...]:
    if isinstance(value, dict) and "concat" in value:
        return tuple(value["concat"])
    return (value,)


def _endpoint(addr: Any, port: Any) -> Endpoint:
    return Endpoint(ipaddress.ip_address(str(addr)), int(port))


def nft_parse(listing: list[Json]) -> tuple[Ruleset, bool]:
    """Parses the ``nftables`` list of ``nft -j list table inet natfail`` into a Ruleset;
    the bool tells whether the skeleton (chains, hooks, rules, maps) is intact. Elements
    that cannot be understood (no ``service/backend`` comment) are left out, which makes
    the result differ from any desired state: a drift."""
    maps: dict[str, list[Any]] = {}
    chains: dict[str, Json] = {}
    rules: dict[str, list[str]] = {}
    for obj in listing:
        if "map" in obj or "set" in obj:
            m = obj.get("map") or obj["set"]
            maps[m["name"]] = m.get("elem", [])
        elif "chain" in obj:
            chains[obj["chain"]["name"]] = obj["chain"]
        elif "rule" in obj:
            r = obj["rule"]
            rules.setdefault(r["chain"], []).append(r.get("comment", ""))
    # A table of a natfail without the fence lacks its chain and sets: not
    # intact, so the next apply rebuilds it whole (one transaction).
    intact = (
        set(NFT_MAPS) | set(NFT_SETS) <= set(maps)
        and all(tuple(rules.get(c, ())) == want for c, want in NFT_RULES.items())
        and all(
            (chains.get(c, {}).get("type"), chains.get(c, {}).get("hook")) == (ctype, hook)
            for c, (ctype, hook, _) in NFT_CHAINS.items()
        )
    )
    # (map, key) -> (data, comment)
    elems: dict[tuple[str, tuple[Any, ...]], tuple[Any, str]] = {}
    for name, items in maps.items():
        for item in items:
            if name in NFT_SETS:
                k, d = item, None
            else:
                k, d = item
            comment = ""
            if isinstance(k, dict) and "elem" in k:
                comment = k["elem"].get("comment", "")
                k = k["elem"]["val"]
            elems[(name, _unconcat(k))] = (d, comment)
    dnat: set[Dnat] = set()
    snat: set[Snat] = set()
    masq: set[Masquerade] = set()
    fence: set[Fence] = set()

    def names(comment: str) -> tuple[str, str] | None:
        svc, sep, backend = comment.partition("/")
        return (svc, backend) if sep and svc and backend else None

    try:
        for (name, key), (data, comment) in elems.items():
            who = names(comment)
            if who is None:
                continue
            for fam in (4, 6):
                for suffix in ("", "_if"):
                    if name != f"dnat{fam}{suffix}":
                        continue
                    iif = key[0] if suffix else None
                    pub = key[1:] if suffix else key
                    mark = elems.get((f"mark{fam}{suffix}", key), (None, ""))[0]
                    port = elems.get((f"dnatport{fam}{suffix}", key), (None, ""))[0]
                    if not isinstance(mark, int) or not isinstance(port, int):
                        continue
                    dnat.add(Dnat(_endpoint(*pub), iif, _endpoint(data, port), mark, *who))
                if name == f"snat{fam}":
                    mark = elems.get((f"smark{fam}", key), (None, ""))[0]
                    port = elems.get((f"snatport{fam}", key), (None, ""))[0]
                    if isinstance(mark, int) and isinstance(port, int):
                        snat.add(Snat(_endpoint(*key), _endpoint(data, port), mark, *who))
                if name == f"fence{fam}" and len(key) == 2 and isinstance(key[1], int):
                    fence.add(Fence(_endpoint(*key), *who))
            if name == "masq" and isinstance(key[0], int):
                masq.add(Masquerade(key[0], *who))
        return Ruleset(frozenset(dnat), frozenset(snat), frozenset(masq), frozenset(fence)), intact
    except (RulesetError, ValueError, TypeError):
        return Ruleset(), False


# --- iptables -------------------------------------------------------------------------

IptKind = Literal["dnat", "snat", "masquerade", "fence"]
IptTable = Literal["nat", "filter"]


@dataclass(frozen=True)
class IptRule:
    """One iptables rule of natfail, in the form python-iptables builds it from.

    ``matches`` are (match name, {option: value}); ``target`` is (name, {option: value}).
    ``chain`` is IPT_PRE_CHAIN or IPT_POST_CHAIN (nat table) or IPT_FENCE_CHAIN (filter
    table)."""

    family: int
    chain: str
    src: str | None
    dst: str | None
    in_interface: str | None
    matches: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    target: tuple[str, tuple[tuple[str, str], ...]]

    @property
    def comment(self) -> str:
        for name, opts in self.matches:
            if name == "comment":
                return dict(opts)["comment"]
        return ""


def _host(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"{ip}/{32 if ip.version == 4 else 128}"


def _ipt_ep(e: Endpoint) -> str:
    return str(e)


def iptables_fence_rules(fences: Iterable[Fence], family: int) -> list[IptRule]:
    """The rules of NATFAIL-FENCE for the fences of one family, in order."""
    out: list[IptRule] = []
    for f in sorted((x for x in fences if x.family == family), key=Fence.sort_key):
        out.append(
            IptRule(
                family,
                IPT_FENCE_CHAIN,
                _host(f.backend.ip),
                None,
                None,
                (
                    ("udp", (("sport", str(f.backend.port)),)),
                    ("conntrack", (("ctdir", "ORIGINAL"),)),
                    ("comment", (("comment", f"natfail fence {f.service}/{f.backend_name}"),)),
                ),
                ("DROP", ()),
            )
        )
    return out


def iptables_rules(rs: Ruleset, family: int) -> dict[str, list[IptRule]]:
    """The rules of NATFAIL-PRE and NATFAIL-POST (nat table) and NATFAIL-FENCE (filter
    table) for one family (4: iptables, 6: ip6tables), in order. Sorted by the entries,
    so equal Rulesets give equal lists."""
    pre: list[IptRule] = []
    post: list[IptRule] = []
    for d in sorted((x for x in rs.dnat if x.family == family), key=Dnat.sort_key):
        comment = ("comment", (("comment", f"natfail dnat {d.service}/{d.backend_name}"),))
        udp = ("udp", (("dport", str(d.public.port)),))
        base: tuple[int, str, str | None, str | None, str | None] = (
            family,
            IPT_PRE_CHAIN,
            None,
            _host(d.public.ip),
            d.inbound_interface,
        )
        pre.append(
            IptRule(
                *base, (udp, comment), ("CONNMARK", (("set-xmark", f"{d.mark:#x}/{MARK_MASK:#x}"),))
            )
        )
        pre.append(
            IptRule(*base, (udp, comment), ("DNAT", (("to-destination", _ipt_ep(d.backend)),)))
        )
    for s in sorted((x for x in rs.snat if x.family == family), key=Snat.sort_key):
        comment = ("comment", (("comment", f"natfail snat {s.service}/{s.backend_name}"),))
        udp = ("udp", (("sport", str(s.backend.port)),))
        base = (family, IPT_POST_CHAIN, _host(s.backend.ip), None, None)
        post.append(
            IptRule(
                *base, (udp, comment), ("CONNMARK", (("set-xmark", f"{s.mark:#x}/{MARK_MASK:#x}"),))
            )
        )
        post.append(IptRule(*base, (udp, comment), ("SNAT", (("to-source", _ipt_ep(s.public)),))))
    for m in sorted(rs.masquerade):
        post.append(
            IptRule(
                family,
                IPT_POST_CHAIN,
                None,
                None,
                None,
                (
                    ("conntrack", (("ctstate", "DNAT"),)),
                    ("connmark", (("mark", f"{m.mark:#x}"),)),
                    ("comment", (("comment", f"natfail masquerade {m.service}/{m.backend_name}"),)),
                ),
                ("MASQUERADE", ()),
            )
        )
    return {
        IPT_PRE_CHAIN: pre,
        IPT_POST_CHAIN: post,
        IPT_FENCE_CHAIN: iptables_fence_rules(rs.fence, family),
    }


@dataclass(frozen=True)
class IptCommit:
    """One libiptc commit of an iptables apply: the ``nat`` table with the desired NAT
    rules, or the ``filter`` table with NATFAIL-FENCE holding exactly ``fence``."""

    table: IptTable
    fence: frozenset[Fence] = frozenset()


def iptables_commits(
    installed: Ruleset, nat_intact: bool, filter_intact: bool, desired: Ruleset
) -> list[IptCommit]:
    """The commits, in order, that take one family's tables from ``installed`` (as read
    back, with whether each table's chains and jumps were intact) to ``desired``; []
    when nothing changes.

    The fence and the NAT are two tables, so two commits, and the order is what keeps
    every standby fenced at every moment: a NAT change goes in between a filter commit
    that fences every backend either state fences and one that lifts the fences only
    ``desired`` drops. The backend losing the traffic is fenced before its DNAT goes,
    the one getting it unfenced only after its DNAT is in; for that moment both are
    fenced, which costs the old one the packets it starts itself (its replies to the
    clients' flows pass), never a client's flow. A commit that changes nothing is
    left out."""
    steps: list[IptCommit] = []
    current = installed.fence if filter_intact else None  # None: the chain needs a rewrite
    if not (nat_intact and installed.nat() == desired.nat()):
        union = installed.fence | desired.fence
        if current != union:
            steps.append(IptCommit("filter", union))
            current = union
        steps.append(IptCommit("nat"))
    if current != desired.fence:
        steps.append(IptCommit("filter", desired.fence))
    return steps
