"""The iptables dataplane: python-iptables (libiptc, legacy x_tables) on natfail's chains.

natfail owns the chains ``NATFAIL-PRE`` and ``NATFAIL-POST`` of the nat table (IPv4
through ``iptc.Table``, IPv6 through ``iptc.Table6``), entered by one ``-j`` rule each
from PREROUTING and POSTROUTING (inserted first, so a user's own NAT rules further down
do not take the traffic first). Nothing else is changed: libiptc reads the whole table,
natfail edits only its chains and its two jumps, and writes the table back in ONE commit
(libiptc replaces the table in one ``setsockopt``: atomic, never a moment with no rule).
A change that touches only IPv4 commits only the IPv4 table.

The rules themselves are computed by :func:`natfail.core.ruleset.iptables_rules`; when a
chain's rules differ from the desired ones, the chain is flushed and refilled inside the
same commit. Inspect with ``iptables-legacy -t nat -S`` / ``ip6tables-legacy -t nat -S``.
Uses the network namespace of the calling process.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Final

from natfail.config import Endpoint
from natfail.core.ruleset import (
    IPT_POST_CHAIN,
    IPT_PRE_CHAIN,
    Dnat,
    IptRule,
    Masquerade,
    Ruleset,
    RulesetError,
    Snat,
    iptables_rules,
)
from natfail.io.dataplane import DataplaneError
from natfail.oneline import error_line

__all__ = ["IptablesDataplane"]

# python-iptables with iptables >= 1.8.9: the NAT targets (DNAT, SNAT, MASQUERADE) live
# in one merged extension library that registers only the targets of the family that is
# current when it is first loaded. One process can therefore build NAT rules for IPv4 OR
# for IPv6, not both: each family gets its own forked helper process.

_JUMPS: Final = {IPT_PRE_CHAIN: "PREROUTING", IPT_POST_CHAIN: "POSTROUTING"}


def _params(obj: Any) -> dict[str, str]:
    return {k: " ".join(v) for k, v in obj.get_all_parameters().items()}


def _parse_endpoint(text: str) -> Endpoint:
    return Endpoint.parse(text)


class _IptFamily:
    """The work on one family's nat table. Lives in its own process (see the facade)."""

    def __init__(self, family: int) -> None:
        import iptc

        self._iptc = iptc
        self.families = (family,)

    # -- plumbing -----------------------------------------------------------------------

    def _table(self, family: int) -> Any:
        iptc = self._iptc
        table = (iptc.Table if family == 4 else iptc.Table6)(iptc.Table.NAT)
        table.autocommit = False
        table.refresh()
        return table

    def _rule(self, r: IptRule) -> Any:
        iptc = self._iptc
        rule = iptc.Rule() if r.family == 4 else iptc.Rule6()
        if r.src:
            rule.src = r.src
        if r.dst:
            rule.dst = r.dst
        if r.in_interface:
            rule.in_interface = r.in_interface
        if any(name == "udp" for name, _ in r.matches):
            rule.protocol = "udp"
        for name, opts in r.matches:
            m = rule.create_match(name)
            for k, v in opts:
                setattr(m, k.replace("-", "_"), v)
        tname, topts = r.target
        t = rule.create_target(tname)
        for k, v in topts:
            setattr(t, k.replace("-", "_"), v)
        return rule

    # -- reading ------------------------------------------------------------------------

    def _read_family(self, family: int) -> tuple[Ruleset, bool]:
        """(what natfail's chains hold, whether chains and jumps are in place)."""
        iptc = self._iptc
        table = self._table(family)
        intact = all(table.is_chain(c) for c in _JUMPS)
        if not intact:
            return Ruleset(), False
        for ours, builtin in _JUMPS.items():
            rules = iptc.Chain(table, builtin).rules
            if not any(r.target.name == ours for r in rules[:1]):
                intact = False
        pre: dict[str, dict[str, Any]] = {}
        post: dict[str, dict[str, Any]] = {}
        masq: set[Masquerade] = set()
        try:
            for chain, into in ((IPT_PRE_CHAIN, pre), (IPT_POST_CHAIN, post)):
                for r in iptc.Chain(table, chain).rules:
                    matches = {m.name: _params(m) for m in r.matches}
                    comment = matches.get("comment", {}).get("comment", "")
                    parts = comment.split(" ")
                    if len(parts) != 3 or parts[0] != "natfail":
                        intact = False
                        continue
                    svc, _, backend = parts[2].partition("/")
                    tparams = _params(r.target)
                    if parts[1] == "masquerade":
                        mark = int(matches.get("connmark", {}).get("mark", "0").split("/")[0], 0)
                        masq.add(Masquerade(mark, svc, backend))
                        continue
                    d = into.setdefault(parts[2], {"service": svc, "backend_name": backend})
                    d["src"], d["dst"], d["iif"] = r.src, r.dst, r.in_interface
                    d["udp"] = matches.get("udp", {})
                    if r.target.name == "CONNMARK":
                        d["mark"] = int(tparams.get("set-xmark", "0").split("/")[0], 0)
                    elif r.target.name == "DNAT":
                        d["to"] = tparams.get("to-destination", "")
                    elif r.target.name == "SNAT":
                        d["to"] = tparams.get("to-source", "")
            dnat = {
                Dnat(
                    Endpoint(ipaddress.ip_interface(d["dst"]).ip, int(d["udp"]["dport"])),
                    d["iif"] or None, _parse_endpoint(d["to"]), d["mark"],
                    d["service"], d["backend_name"],
                )
                for d in pre.values() if "to" in d and "mark" in d
            }
            snat = {
                Snat(
                    Endpoint(ipaddress.ip_interface(d["src"]).ip, int(d["udp"]["sport"])),
                    _parse_endpoint(d["to"]), d["mark"], d["service"], d["backend_name"],
                )
                for d in post.values() if "to" in d and "mark" in d
            }
            found = Ruleset(frozenset(dnat), frozenset(snat), frozenset(masq))
        except (KeyError, ValueError, RulesetError):
            return Ruleset(), False
        # anything that does not render back to exactly the installed rules is drift
        want = iptables_rules(found, family)
        for chain in _JUMPS:
            if len(iptc.Chain(table, chain).rules) != len(want[chain]):
                intact = False
        return found, intact

    def read_family(self) -> tuple[Ruleset, bool]:
        try:
            return self._read_family(self.families[0])
        except self._iptc.IPTCError as e:
            raise DataplaneError(f"iptables: {error_line(e)}") from None

    def read(self) -> Ruleset:
        dnat: set[Dnat] = set()
        snat: set[Snat] = set()
        masq: set[Masquerade] = set()
        try:
            for fam in self.families:
                rs, _ = self._read_family(fam)
                dnat |= rs.dnat
                snat |= rs.snat
                masq |= rs.masquerade
            return Ruleset(frozenset(dnat), frozenset(snat), frozenset(masq))
        except self._iptc.IPTCError as e:
            raise DataplaneError(f"iptables: {error_line(e)}") from None

    def intact(self) -> bool:
        try:
            return all(self._read_family(f)[1] for f in self.families)
        except self._iptc.IPTCError as e:
            raise DataplaneError(f"iptables: {error_line(e)}") from None

    # -- changing -----------------------------------------------------------------------

    @staticmethod
    def _of_family(rs: Ruleset, family: int) -> Ruleset:
        return Ruleset(
            frozenset(d for d in rs.dnat if d.family == family),
            frozenset(s for s in rs.snat if s.family == family),
            # masquerade matches the mark whatever the family: install it in both
            rs.masquerade,
        )

    def apply(self, desired: Ruleset) -> None:
        iptc = self._iptc
        for fam in self.families:
            want = self._of_family(desired, fam)
            try:
                installed, intact = self._read_family(fam)
                if intact and installed == want:
                    continue
                table = self._table(fam)
                rules = iptables_rules(want, fam)
                for ours, builtin in _JUMPS.items():
                    if not table.is_chain(ours):
                        table.create_chain(ours)
                    chain = iptc.Chain(table, ours)
                    chain.flush()
                    for r in rules[ours]:
                        chain.append_rule(self._rule(r))
                    bchain = iptc.Chain(table, builtin)
                    jumps = [i for i, r in enumerate(bchain.rules) if r.target.name == ours]
                    if jumps != [0]:
                        for i in reversed(jumps):
                            bchain.delete_rule(bchain.rules[i])
                        jump = iptc.Rule() if fam == 4 else iptc.Rule6()
                        jump.create_target(ours)
                        bchain.insert_rule(jump, 0)
                table.commit()
                table.refresh()
            except (iptc.IPTCError, iptc.xtables.XTablesError, ValueError) as e:
                raise DataplaneError(f"iptables (IPv{fam}) commit failed: {error_line(e)}") \
                    from None

    def remove_all(self) -> None:
        iptc = self._iptc
        for fam in self.families:
            try:
                table = self._table(fam)
                if not any(table.is_chain(c) for c in _JUMPS):
                    continue
                for ours, builtin in _JUMPS.items():
                    bchain = iptc.Chain(table, builtin)
                    for r in reversed(bchain.rules):
                        if r.target.name == ours:
                            bchain.delete_rule(r)
                    if table.is_chain(ours):
                        iptc.Chain(table, ours).flush()
                for ours in _JUMPS:
                    if table.is_chain(ours):
                        table.delete_chain(ours)
                table.commit()
                table.refresh()
            except (iptc.IPTCError, ValueError) as e:
                raise DataplaneError(f"iptables (IPv{fam}) remove: {error_line(e)}") from None


def _serve(family: int, conn: Any, parent_end: Any) -> None:
    parent_end.close()  # EOF on our end once the parent closes (or dies)
    impl = _IptFamily(family)
    while True:
        try:
            name, args = conn.recv()
        except EOFError:
            return
        try:
            reply: tuple[str, Any] = ("ok", getattr(impl, name)(*args))
        except BaseException as e:
            reply = ("err", e if isinstance(e, DataplaneError) else DataplaneError(error_line(e)))
        try:
            conn.send(reply)
        except OSError:  # the daemon is gone (killed): nobody to answer, end quietly
            return


class _FamilyProcess:
    def __init__(self, family: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(family, child, self._conn), daemon=True,
                                 name=f"natfail-iptables-v{family}")
        self._proc.start()
        child.close()

    def call(self, name: str, *args: Any) -> Any:
        try:
            self._conn.send((name, args))
            status, value = self._conn.recv()
        except (EOFError, OSError) as e:
            raise DataplaneError(f"iptables helper process died: {error_line(e)}") from None
        if status == "err":
            raise value
        return value

    def close(self) -> None:
        self._conn.close()
        self._proc.join(2)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(2)


class IptablesDataplane:
    """:class:`natfail.io.dataplane.Dataplane` on iptables (legacy) nat chains.

    Each family's table is handled by a helper process forked at construction (see the
    note at the top); every call waits for it, so the caller sees one commit per table
    per change. :meth:`close` stops the helpers."""

    name = "iptables"

    def __init__(self, families: tuple[int, ...] = (4, 6)) -> None:
        self.families = families
        self._procs = {f: _FamilyProcess(f) for f in families}

    def close(self) -> None:
        for p in self._procs.values():
            p.close()

    def __del__(self) -> None:
        procs = getattr(self, "_procs", {})
        for p in procs.values():
            p.close()
        procs.clear()

    def read(self) -> Ruleset:
        dnat: set[Dnat] = set()
        snat: set[Snat] = set()
        masq: set[Masquerade] = set()
        for p in self._procs.values():
            rs = p.call("read")
            dnat |= rs.dnat
            snat |= rs.snat
            masq |= rs.masquerade
        return Ruleset(frozenset(dnat), frozenset(snat), frozenset(masq))

    def intact(self) -> bool:
        return all(p.call("intact") for p in self._procs.values())

    def apply(self, desired: Ruleset) -> None:
        for p in self._procs.values():
            p.call("apply", desired)

    def remove_all(self) -> None:
        for p in self._procs.values():
            p.call("remove_all")
