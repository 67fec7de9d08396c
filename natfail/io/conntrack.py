"""Conntrack cleanup after a swap: pyroute2 netlink, a constant number of requests.

After a swap, the flows of the old backend must go: WireGuard keepalives would keep a
client's conntrack entry (and with it the DNAT to the old backend) alive forever. The
daemon calls :meth:`Conntrack.remove_backend` only AFTER a successful swap (cleaning
first would let the next packet recreate the entry with the old rule still in place).

What :class:`NetlinkConntrack` does for one backend (``mark``, ``address``):

1. one kernel-side filtered flush by mark (``IPCTNL_MSG_CT_DELETE`` with ``CTA_MARK`` and
   ``CTA_MARK_MASK`` and no tuple): every entry natfail's rules marked for that backend,
   client-started (DNAT) and backend-started (SNAT), IPv4 and IPv6;
2. kernel-side filtered flushes by tuple (``CTA_TUPLE_ORIG``/``CTA_TUPLE_REPLY`` with a
   ``CTA_FILTER``, Linux >= 6.3) for entries that carry no mark because they were made
   before natfail's rules existed: reply source = the backend (client-started, DNATed)
   and original source = the backend (backend-started);
3. the table is read again (two kernel-side tuple-filtered dumps: every entry natfail
   marks for a backend has it as original or reply source), and if anything is left (a
   packet in flight during the swap can confirm an entry after the first pass) steps
   1-2 run once more.

That is 3 requests per pass and 2 dumps per read (5 in all, 10 at worst), whatever the
number of entries: the kernel walks its table once per request. Nothing is deleted
entry by entry. The sockets are opened (and pyroute2's machinery warmed up) at
construction, so the first cleanup pays no setup.

Guard: pyroute2's ``flush(mark=None)`` flushes the WHOLE table, and mark 0 (with a full
mask) matches nearly every entry. :func:`check_mark` refuses both, and any mark that is
not natfail's (see :mod:`natfail.core.ruleset`), with :class:`ConntrackMisuse`: that is
natfail's own bug, never something to retry.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
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
    "check_mark",
]

IPPROTO_UDP: Final = 17
_NFNETLINK_V1: Final = 1  # version 1: the filter applies to nfgen_family only


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

    # -- primitives (each ONE netlink request) -----------------------------------------

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
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, nfct_msg

        fam = socket.AF_INET if address.family == 4 else socket.AF_INET6
        tup = NFCTAttrTuple(family=fam, saddr=str(address.ip), proto=IPPROTO_UDP,
                            sport=address.port)
        tup.attrs()  # computes tup.flags
        flags_attr = "CTA_FILTER_ORIG_FLAGS" if direction == "orig" else "CTA_FILTER_REPLY_FLAGS"
        msg = nfct_msg.create_from(
            **{f"tuple_{direction}": tup},
            cta_filter={"attrs": [[flags_attr, tup.flags]]},
        )
        msg["version"] = _NFNETLINK_V1
        return msg

    def flush_source(self, address: Endpoint, direction: str) -> None:
        """Kernel-side flush of UDP entries whose ``direction`` ("orig" or "reply")
        tuple has source ``address``."""
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
        from pyroute2.netlink.nfnetlink.nfctsocket import (
            IPCTNL_MSG_CT_DELETE,
            terminate_error_msg,
        )

        self.requests += 1
        msg = self._tuple_msg(address, direction)
        try:
            self._socks[address.family].request(
                msg, IPCTNL_MSG_CT_DELETE, msg_flags=NLM_F_REQUEST | NLM_F_ACK,
                terminate=terminate_error_msg,
            )
        except Exception as e:
            raise ConntrackError(
                f"conntrack flush of {direction} source {address}: {error_line(e)}"
            ) from None

    def _dump_count(self, **kwargs: Any) -> int:
        n = 0
        sock = kwargs.pop("sock")
        for _ in sock.dump(**kwargs):
            n += 1
        return n

    # -- the protocol -------------------------------------------------------------------

    def count_backend(self, mark: int, address: Endpoint) -> int:
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        check_mark(mark)
        fam = socket.AF_INET if address.family == 4 else socket.AF_INET6
        sock = self._socks[address.family]
        n = 0
        try:
            for s in self._socks.values():  # marked entries of both families
                self.requests += 1
                n += self._dump_count(sock=s, mark=mark, mark_mask=MARK_MASK)
            # unmarked entries (a marked one is counted twice: fine for "anything left?")
            for direction in ("orig", "reply"):
                tup = NFCTAttrTuple(family=fam, saddr=str(address.ip), proto=IPPROTO_UDP,
                                    sport=address.port)
                self.requests += 1
                n += self._dump_count(sock=sock, **{f"tuple_{direction}": tup})
        except Exception as e:
            raise ConntrackError(f"conntrack dump: {error_line(e)}") from None
        return n

    def _leftover(self, address: Endpoint) -> int:
        """Entries still pointing at the backend: every entry natfail's rules mark is a
        DNAT to it (reply source = the backend) or an SNAT of its own traffic (original
        source = the backend), so two tuple-filtered dumps see marked and unmarked ones."""
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        fam = socket.AF_INET if address.family == 4 else socket.AF_INET6
        n = 0
        try:
            for direction in ("orig", "reply"):
                tup = NFCTAttrTuple(family=fam, saddr=str(address.ip), proto=IPPROTO_UDP,
                                    sport=address.port)
                self.requests += 1
                n += self._dump_count(sock=self._socks[address.family],
                                      **{f"tuple_{direction}": tup})
        except Exception as e:
            raise ConntrackError(f"conntrack dump: {error_line(e)}") from None
        return n

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
