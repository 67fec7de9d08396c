"""Conntrack cleanup after a swap and after a DNAT appears: pyroute2 netlink.

After a swap, the flows of the old backend must go: WireGuard keepalives would keep a
client's conntrack entry (and with it the DNAT to the old backend) alive forever. The
daemon calls :meth:`Conntrack.remove_backend` only AFTER a successful swap (cleaning
first would let the next packet recreate the entry with the old rule still in place).

What :class:`NetlinkConntrack` does for one backend (``mark``, ``address``):

1. one kernel-side filtered flush by mark (``IPCTNL_MSG_CT_DELETE`` with ``CTA_MARK`` and
   ``CTA_MARK_MASK`` and no tuple): every entry natfail's rules marked for that backend,
   client-started (DNAT) and backend-started (SNAT), IPv4 and IPv6;
2. flushes by tuple for entries that carry no mark because they were made before
   natfail's rules existed: reply source = the backend (client-started, DNATed) and
   original source = the backend (backend-started). IPv4: kernel-side filtered flushes
   (``CTA_TUPLE_ORIG``/``CTA_TUPLE_REPLY`` with a ``CTA_FILTER``, Linux >= 6.3); IPv6: see
   below;
3. the table is read again (two tuple-filtered dumps: every entry natfail marks for a
   backend has it as original or reply source), and if anything is left (a packet in
   flight during the swap can confirm an entry after the first pass) steps 1-2 run
   once more.

IPv4: 3 requests per pass and 2 dumps per read (5 in all, 10 at worst), whatever the
number of entries: the kernel walks its table once per request, nothing is deleted
entry by entry. The sockets are opened (and pyroute2's machinery warmed up) at
construction, so the first cleanup pays no setup.

IPv6: Linux's ctnetlink compares an IPv6 address in a ``CTA_FILTER`` the wrong way round
(``ctnetlink_filter_match_tuple`` treats ``!ipv6_addr_cmp()``, true for EQUAL addresses,
as a mismatch; seen on 6.18): a filter by an IPv6 address matches every entry with
ANOTHER address, so a flush by it removes other backends' and other clients' flows and
keeps the very ones it was for. Its protocol and port comparisons are right. So an
IPv6 filter carries protocol and port only; the address is matched here on the dumped
entries, and each entry that matches is deleted by its whole original tuple and its id
(no filter: it can match nothing else). That is right whether the kernel is fixed or
not, and costs one dump plus one request per entry removed: few, since the mark flush
takes every marked entry in one request and only the unmarked ones are left for it.
No IPv6 address filter is ever sent (:meth:`NetlinkConntrack._tuple_msg` refuses one).

Client flows stranded without DNAT (:meth:`NetlinkConntrack.remove_unnated`): a client
packet that reaches the gateway while no DNAT for its public endpoint is installed (at
start, between a table and its DNAT, after someone flushed the nat table) makes an entry
without NAT, and the client's own retries (WireGuard: a handshake every 5 s) keep it
alive: the client is cut off for good. Such an entry is exactly one whose REPLY tuple
has the public endpoint itself as source (a DNATed one has the backend there), whatever
its mark. So after every transaction that installs, restores or changes a DNAT, the
daemon removes the UDP entries with that reply source, in the endpoint's family only:
ONE kernel-side filtered delete for IPv4, one dump and the exact deletes for IPv6.
Entries DNATed to a backend (natfail's or not), other ports, other protocols (TCP to
the same port) and the other family stay.

Foreign DNAT (:meth:`NetlinkConntrack.public_flows`): one filtered dump of the UDP
entries whose ORIGINAL destination is a public address (kernel-side by protocol, by
address for IPv4, and by port when one endpoint is asked for at that address), tallied
per public endpoint by reply source: the public endpoint (not
NATed), a backend (natfail's DNAT), or anything else (a DNAT that is not natfail's and
comes first). Every dumped entry is checked again here (address, port, protocol), so a
kernel that ignored or inverted a filter costs time, never a wrong count nor a wrong
IPv6 deletion (IPv4 flushes trust the kernel's IPv4 comparisons, which are right and
tested in a namespace).

Guard: pyroute2's ``flush(mark=None)`` flushes the WHOLE table, and mark 0 (with a full
mask) matches nearly every entry. :func:`check_mark` refuses both, and any mark that is
not natfail's (see :mod:`natfail.core.ruleset`), with :class:`ConntrackMisuse`: that is
natfail's own bug, never something to retry. A filtered delete without its address, port
and protocol would flush a whole family; :func:`check_public` and a check of the filter's
flags before every filtered delete refuse that the same way.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from natfail.config import Endpoint
from natfail.core.ruleset import MARK_MASK, is_natfail_mark
from natfail.oneline import error_line

__all__ = [
    "CleanupResult",
    "Conntrack",
    "ConntrackError",
    "ConntrackMisuse",
    "NetlinkConntrack",
    "PublicFlows",
    "check_mark",
    "check_public",
    "tally_public_flows",
]

IPPROTO_UDP: Final = 17
_NFNETLINK_V1: Final = 1  # version 1: the filter applies to nfgen_family only
# pyroute2's FILTER_FLAG_CTA_* bits that a source filter must carry: without any of them
# the kernel would match far more than one endpoint's flows
_SOURCE_FLAGS: Final = (1 << 0) | (1 << 3) | (1 << 4)  # IP_SRC, PROTO_NUM, PROTO_SRC_PORT


class ConntrackError(RuntimeError):
    """The kernel refused a conntrack request (one line)."""


class ConntrackMisuse(ValueError):
    """A request that would remove far more than one backend's flows (natfail's bug)."""


def check_mark(mark: object) -> int:
    """``mark`` if it is a natfail mark; else ConntrackMisuse (never flush by None or 0)."""
    if mark is None or isinstance(mark, bool) or not isinstance(mark, int):
        raise ConntrackMisuse(f"refusing a conntrack flush by mark {mark!r}: flushes everything")
    if mark == 0:
        raise ConntrackMisuse("refusing a conntrack flush by mark 0: matches nearly every entry")
    if not is_natfail_mark(mark):
        raise ConntrackMisuse(f"refusing a conntrack flush by mark {mark:#x}: not a natfail mark")
    return mark


def check_public(public: object) -> Endpoint:
    """``public`` if it is an :class:`Endpoint`; else ConntrackMisuse (a filter built
    from anything else could miss its address or port and match a whole family)."""
    if not isinstance(public, Endpoint):
        raise ConntrackMisuse(f"refusing a conntrack request for {public!r}: not an endpoint")
    return public


@dataclass(frozen=True)
class PublicFlows:
    """The UDP entries whose original destination is one public endpoint: ``total``,
    ``unnated`` (reply source = the public endpoint: no DNAT rewrote them) and the count
    per reply source (the public endpoint itself, natfail's backends, or whatever a
    foreign DNAT sent them to)."""

    total: int
    unnated: int
    by_reply_source: dict[Endpoint, int] = field(default_factory=dict)


def tally_public_flows(
    publics: Iterable[Endpoint], entries: Iterable[tuple[Endpoint, Endpoint]]
) -> dict[Endpoint, PublicFlows]:
    """:class:`PublicFlows` of each of ``publics`` from ``(original destination, reply
    source)`` pairs; pairs for any other destination are ignored (the kernel filter is
    trusted for speed only)."""
    counts: dict[Endpoint, dict[Endpoint, int]] = {p: {} for p in publics}
    for orig_dst, reply_src in entries:
        by_source = counts.get(orig_dst)
        if by_source is not None:
            by_source[reply_src] = by_source.get(reply_src, 0) + 1
    return {
        public: PublicFlows(sum(by_source.values()), by_source.get(public, 0), by_source)
        for public, by_source in counts.items()
    }


def _endpoint(addr: object, port: object) -> Endpoint | None:
    """An entry's address and port as an Endpoint; None when the kernel gave none."""
    if not isinstance(addr, str) or not isinstance(port, int) or isinstance(port, bool):
        return None
    try:
        return Endpoint(ipaddress.ip_address(addr), port)
    except ValueError:
        return None  # port 0 and the like: not a flow to count


@dataclass(frozen=True)
class CleanupResult:
    """``passes``: flush passes run (1 or 2); ``found_after_first``: entries the read
    after the first pass still found; ``left``: entries found after the last pass
    (0 unless flows are being created faster than they are removed)."""

    passes: int
    found_after_first: int
    left: int
    requests: int


class Conntrack(Protocol):
    def remove_backend(self, mark: int, address: Endpoint) -> CleanupResult:
        """Removes every conntrack entry of one backend (both directions), verifies, and
        removes what is left once more. Call only after a successful swap."""
        ...

    def count_backend(self, mark: int, address: Endpoint) -> int:
        """Entries of one backend: with its mark, or to/from its address:port (UDP)."""
        ...

    def remove_unnated(self, public: Endpoint) -> int:
        """Removes the UDP entries to ``public`` that no DNAT rewrote (reply source =
        ``public``), whatever their mark; returns the requests sent. Call after every
        successful transaction that installs, restores or changes its DNAT."""
        ...

    def public_flows(self, publics: Iterable[Endpoint]) -> dict[Endpoint, PublicFlows]:
        """For each of ``publics``, the UDP entries whose original destination it is, by
        reply source: one dump per public address, however many ports it has."""
        ...


class NetlinkConntrack:
    """:class:`Conntrack` over ctnetlink (pyroute2), in the caller's network namespace."""

    def __init__(self) -> None:
        from pyroute2 import NFCTSocket

        self._socks: dict[int, Any] = {
            4: NFCTSocket(nfgen_family=socket.AF_INET),
            6: NFCTSocket(nfgen_family=socket.AF_INET6),
        }
        for s in self._socks.values():
            s.count()  # warm-up: pyroute2 sets up its I/O on the first request
        self.requests = 0  # netlink requests sent (for tests and benchmarks)

    def close(self) -> None:
        for s in self._socks.values():
            s.close()

    # -- primitives ---------------------------------------------------------------------

    def flush_mark(self, mark: int) -> None:
        """Kernel-side flush of every entry (all families) whose mark is ``mark``."""
        check_mark(mark)
        self.requests += 1
        try:
            # version 0: AF_UNSPEC filter, IPv4 and IPv6 in one walk
            self._socks[4].flush(mark=mark, mark_mask=MARK_MASK)
        except Exception as e:
            raise ConntrackError(f"conntrack flush by mark {mark:#x}: {error_line(e)}") from None

    def _tuple_msg(self, address: Endpoint, direction: str) -> Any:
        """A filtered delete of the UDP entries whose ``direction`` source is ``address``
        (IPv4 only: see the module's docstring about IPv6)."""
        from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

        if address.family != 4:
            raise ConntrackMisuse(
                f"refusing a kernel-side filter on {address}: Linux "
                "matches IPv6 addresses in it the wrong way round"
            )
        tup = _source_filter(address)
        tup.attrs()  # computes tup.flags
        if tup.flags & _SOURCE_FLAGS != _SOURCE_FLAGS:
            # a filter without them matches the whole family: the delete would flush it
            raise ConntrackMisuse(
                f"refusing a conntrack filter on {address}: flags "
                f"{tup.flags:#x} lack address, port or protocol"
            )
        flags_attr = "CTA_FILTER_ORIG_FLAGS" if direction == "orig" else "CTA_FILTER_REPLY_FLAGS"
        msg = nfct_msg.create_from(
            **{f"tuple_{direction}": tup},
            cta_filter={"attrs": [[flags_attr, tup.flags]]},
        )
        msg["version"] = _NFNETLINK_V1
        return msg

    def flush_source(self, address: Endpoint, direction: str) -> None:
        """Removes the UDP entries whose ``direction`` ("orig" or "reply") tuple has
        source ``address``: one kernel-side filtered flush (IPv4); one dump filtered by
        port and one exact delete per matching entry (IPv6)."""
        what = f"conntrack flush of {direction} source {address}"
        if address.family == 4:
            self._request_delete(self._tuple_msg(address, direction), 4, what)
            return
        for flow in self._dump_source(address, direction):
            self._delete_exact(flow, what)

    def _request_delete(self, msg: Any, family: int, what: str) -> None:
        """One IPCTNL_MSG_CT_DELETE; an entry already gone (ENOENT) is no error."""
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
        from pyroute2.netlink.exceptions import NetlinkError
        from pyroute2.netlink.nfnetlink.nfctsocket import (
            IPCTNL_MSG_CT_DELETE,
            terminate_error_msg,
        )

        self.requests += 1
        try:
            self._socks[family].request(
                msg,
                IPCTNL_MSG_CT_DELETE,
                msg_flags=NLM_F_REQUEST | NLM_F_ACK,
                terminate=terminate_error_msg,
            )
        except NetlinkError as e:
            if e.code != errno.ENOENT:  # ENOENT: expired or removed since the dump
                raise ConntrackError(f"{what}: {error_line(e)}") from None
        except Exception as e:
            raise ConntrackError(f"{what}: {error_line(e)}") from None

    def _delete_exact(self, flow: _Flow, what: str) -> None:
        """Deletes one dumped entry: its whole original tuple and its id, no filter (so
        it can never match another entry, nor a recreated one with the same tuple)."""
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, nfct_msg

        o = flow.orig
        if None in (o.saddr, o.daddr, o.sport, o.dport) or o.proto != IPPROTO_UDP:
            return  # never happens for a UDP entry; an incomplete tuple is not sent
        tup = NFCTAttrTuple(
            family=o.family,
            saddr=o.saddr,
            daddr=o.daddr,
            proto=o.proto,
            sport=o.sport,
            dport=o.dport,
        )
        msg = nfct_msg.create_from(tuple_orig=tup, id=flow.ct_id, zone=flow.zone)
        self._request_delete(msg, 4 if o.family == socket.AF_INET else 6, what)

    def _dump(self, family: int, what: str, **kwargs: Any) -> list[_Flow]:
        """One dump (kernel-side filter in ``kwargs``), parsed."""
        self.requests += 1
        fam = socket.AF_INET if family == 4 else socket.AF_INET6
        try:
            flows = [_flow(fam, msg) for msg in self._socks[family].dump(**kwargs)]
        except Exception as e:
            raise ConntrackError(f"conntrack dump of {what}: {error_line(e)}") from None
        return [f for f in flows if f is not None]

    def _dump_source(self, address: Endpoint, direction: str) -> list[_Flow]:
        """The UDP entries whose ``direction`` tuple has source ``address`` (one dump)."""
        flows = self._dump(
            address.family,
            f"the {direction} source {address}",
            **{f"tuple_{direction}": _source_filter(address)},
        )
        # the kernel filtered by address (IPv4 only), port and protocol; check all again
        return [f for f in flows if _is_source(getattr(f, direction), address)]

    def _dump_count(self, **kwargs: Any) -> int:
        n = 0
        sock = kwargs.pop("sock")
        for _ in sock.dump(**kwargs):
            n += 1
        return n

    # -- the protocol -------------------------------------------------------------------

    def remove_unnated(self, public: Endpoint) -> int:
        check_public(public)
        start = self.requests
        # reply source = the public endpoint itself: no DNAT rewrote the flow (one that a
        # DNAT rewrote has the backend there, and stays)
        self.flush_source(public, "reply")
        return self.requests - start

    def public_flows(self, publics: Iterable[Endpoint]) -> dict[Endpoint, PublicFlows]:
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        wanted = [check_public(p) for p in publics]
        ports: dict[Any, set[int]] = {}
        for p in wanted:
            ports.setdefault(p.ip, set()).add(p.port)
        pairs: list[tuple[Endpoint, Endpoint]] = []
        for ip, on in ports.items():
            # The kernel walks its whole hash table for every dump (milliseconds on a
            # big machine, even when empty): one per address, not one per endpoint.
            tup = NFCTAttrTuple(
                family=socket.AF_INET if ip.version == 4 else socket.AF_INET6,
                proto=IPPROTO_UDP,
                dport=next(iter(on)) if len(on) == 1 else None,
                daddr=str(ip) if ip.version == 4 else None,
            )
            for f in self._dump(ip.version, f"the flows to {ip}", tuple_orig=tup):
                if f.orig.proto != IPPROTO_UDP:
                    continue
                dst = _endpoint(f.orig.daddr, f.orig.dport)
                src = _endpoint(f.reply.saddr, f.reply.sport)
                if dst is not None and src is not None:
                    pairs.append((dst, src))
        return tally_public_flows(wanted, pairs)

    def count_backend(self, mark: int, address: Endpoint) -> int:
        check_mark(mark)
        n = 0
        try:
            for s in self._socks.values():  # marked entries of both families
                self.requests += 1
                n += self._dump_count(sock=s, mark=mark, mark_mask=MARK_MASK)
        except Exception as e:
            raise ConntrackError(f"conntrack dump: {error_line(e)}") from None
        # unmarked entries (a marked one is counted twice: fine for "anything left?")
        return n + self._leftover(address)

    def _leftover(self, address: Endpoint) -> int:
        """Entries still pointing at the backend: every entry natfail's rules mark is a
        DNAT to it (reply source = the backend) or an SNAT of its own traffic (original
        source = the backend), so two tuple-filtered dumps see marked and unmarked ones."""
        return sum(len(self._dump_source(address, d)) for d in ("orig", "reply"))

    def remove_backend(self, mark: int, address: Endpoint) -> CleanupResult:
        check_mark(mark)
        start = self.requests
        self._flush_all(mark, address)
        found = self._leftover(address)
        left = found
        passes = 1
        if found:
            self._flush_all(mark, address)
            passes = 2
            left = self._leftover(address)
        return CleanupResult(passes, found, left, self.requests - start)

    def _flush_all(self, mark: int, address: Endpoint) -> None:
        self.flush_mark(mark)
        self.flush_source(address, "orig")
        self.flush_source(address, "reply")


@dataclass(frozen=True)
class _Flow:
    """One dumped entry: its tuples (pyroute2 NFCTAttrTuple), id and zone."""

    orig: Any
    reply: Any
    ct_id: int | None
    zone: int | None


def _flow(fam: int, msg: Any) -> _Flow | None:
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    orig_nla, reply_nla = msg.get_attr("CTA_TUPLE_ORIG"), msg.get_attr("CTA_TUPLE_REPLY")
    if orig_nla is None or reply_nla is None:
        return None
    try:
        orig = NFCTAttrTuple.from_netlink(fam, orig_nla)
        reply = NFCTAttrTuple.from_netlink(fam, reply_nla)
    except (AttributeError, NotImplementedError):
        return None  # a tuple without its IP or protocol part: nothing natfail made
    return _Flow(orig, reply, msg.get_attr("CTA_ID"), msg.get_attr("CTA_ZONE"))


def _source_filter(address: Endpoint) -> Any:
    """The kernel-side filter for source ``address``: protocol and port, and the
    address for IPv4 only (Linux inverts an IPv6 one; the caller checks it)."""
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    fam = socket.AF_INET if address.family == 4 else socket.AF_INET6
    return NFCTAttrTuple(
        family=fam,
        proto=IPPROTO_UDP,
        sport=address.port,
        saddr=str(address.ip) if address.family == 4 else None,
    )


def _is_source(tup: Any, address: Endpoint) -> bool:
    return tup.proto == IPPROTO_UDP and _endpoint(tup.saddr, tup.sport) == address
