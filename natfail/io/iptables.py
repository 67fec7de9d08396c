"""The iptables dataplane: python-iptables (libiptc, legacy x_tables) on natfail's chains.

natfail owns the chains ``NATFAIL-PRE`` and ``NATFAIL-POST`` of the nat table (IPv4
through ``iptc.Table``, IPv6 through ``iptc.Table6``), entered by one ``-j`` rule each
from PREROUTING and POSTROUTING (inserted first, so a user's own NAT rules further down
do not take the traffic first), and the chain ``NATFAIL-FENCE`` of the filter table,
entered by one ``-j`` rule from FORWARD (first too: an ACCEPT of the user's before it
would end the table's traversal). Nothing else is changed: libiptc reads the whole table,
natfail edits only its chains and its jumps, and writes the table back in ONE commit
(libiptc replaces the table in one ``setsockopt``: atomic, never a moment with no rule).
A change that touches only IPv4 commits only the IPv4 tables.

The fence (a standby's own packets to a client are dropped, see
:mod:`natfail.core.ruleset`) lives in the filter table and the NAT in the nat table: two
commits, which nftables does in one. :func:`natfail.core.ruleset.iptables_commits`
orders them so that no moment lets a standby's packet out:

1. the filter table with the union of the installed and the desired fences (the backend
   about to lose the traffic is fenced while it still has its DNAT);
2. the nat table (the DNAT moves);
3. the filter table with the desired fences (the backend that now has the DNAT is
   unfenced).

Between 1 and 3 both backends are fenced: the old one's own new packets are dropped a
moment early (its replies in the clients' flows pass), and the new one starts its own
only after the apply returns, which is when the daemon activates it. A commit with
nothing to change is skipped. When a later commit fails, the earlier ones are undone
in the same order (best effort) before the error is raised, so a failed apply leaves the
previous state. :meth:`_IptFamily.remove_all` removes the NAT before the fence.

The rules themselves are computed by :func:`natfail.core.ruleset.iptables_rules`; when a
chain's rules differ from the desired ones, the chain is flushed and refilled inside the
same commit. Inspect with ``iptables-legacy -t nat -S`` / ``ip6tables-legacy -t nat -S``
and ``iptables-legacy -S NATFAIL-FENCE -v``. Uses the network namespace of the calling
process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import multiprocessing
import os
import signal
import time
import weakref
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final, Protocol

from natfail.config import Endpoint
from natfail.core.ruleset import (
    IPT_FENCE_CHAIN,
    IPT_POST_CHAIN,
    IPT_PRE_CHAIN,
    Dnat,
    Fence,
    IptCommit,
    IptRule,
    Masquerade,
    Ruleset,
    RulesetError,
    Snat,
    iptables_commits,
    iptables_fence_rules,
    iptables_rules,
)
from natfail.io.dataplane import DataplaneError
from natfail.oneline import error_line

__all__ = ["IptablesDataplane"]

log = logging.getLogger(__name__)

# python-iptables with iptables >= 1.8.9: the NAT targets (DNAT, SNAT, MASQUERADE) live
# in one merged extension library that registers only the targets of the family that is
# current when it is first loaded. One process can therefore build NAT rules for IPv4 OR
# for IPv6, not both: each family gets its own forked helper process. A helper that dies
# (killed, crashed) is replaced on the next call; a helper ends with the daemon.

_JUMPS: Final = {IPT_PRE_CHAIN: "PREROUTING", IPT_POST_CHAIN: "POSTROUTING"}
_FENCE_JUMPS: Final = {IPT_FENCE_CHAIN: "FORWARD"}


def _params(obj: Any) -> dict[str, str]:
    return {k: " ".join(v) for k, v in obj.get_all_parameters().items()}


def _parse_endpoint(text: str) -> Endpoint:
    return Endpoint.parse(text)


def _fence_of(rule: Any) -> Fence | None:
    """The Fence a rule of NATFAIL-FENCE is, None when it is not exactly one of ours."""
    matches = {m.name: _params(m) for m in rule.matches}
    parts = matches.get("comment", {}).get("comment", "").split(" ")
    sport = matches.get("udp", {}).get("sport", "")
    if len(parts) != 3 or parts[:2] != ["natfail", "fence"]:
        return None
    svc, _, backend = parts[2].partition("/")
    if not (svc and backend and sport.isdigit()):
        return None
    if rule.target.name != "DROP" or rule.protocol != "udp":
        return None
    if matches.get("conntrack") != {"ctdir": "ORIGINAL"} or set(matches) != {
        "udp",
        "conntrack",
        "comment",
    }:
        return None
    try:
        src = ipaddress.ip_interface(rule.src)
        if src.network.prefixlen != src.max_prefixlen:
            return None
        return Fence(Endpoint(src.ip, int(sport)), svc, backend)
    except ValueError:
        return None


class _IptFamily:
    """The work on one family's tables. Lives in its own process (see the facade)."""

    def __init__(self, family: int) -> None:
        import iptc

        self._iptc = iptc
        self.families = (family,)

    # -- plumbing -----------------------------------------------------------------------

    def _table(self, family: int, name: str = "nat") -> Any:
        iptc = self._iptc
        table = (iptc.Table if family == 4 else iptc.Table6)(name)
        table.autocommit = False
        table.refresh()
        return table

    def _jumped_first(self, table: Any, jumps: dict[str, str]) -> bool:
        rules = (self._iptc.Chain(table, builtin).rules[:1] for builtin in jumps.values())
        return all(
            any(r.target.name == ours for r in first)
            for ours, first in zip(jumps, rules, strict=True)
        )

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
        nat, nat_ok = self._read_nat(family)
        fence, fence_ok = self._read_fence(family)
        return Ruleset(nat.dnat, nat.snat, nat.masquerade, fence), nat_ok and fence_ok

    def _read_fence(self, family: int) -> tuple[frozenset[Fence], bool]:
        """(the fences NATFAIL-FENCE holds, whether it and its jump are in place). A
        rule that is not exactly one of ours makes it not intact (a rewrite follows)."""
        iptc = self._iptc
        table = self._table(family, "filter")
        if not table.is_chain(IPT_FENCE_CHAIN):
            return frozenset(), False
        intact = self._jumped_first(table, _FENCE_JUMPS)
        found: dict[Endpoint, Fence] = {}
        for r in iptc.Chain(table, IPT_FENCE_CHAIN).rules:
            fence = _fence_of(r)
            if fence is None or fence.backend in found:
                intact = False
                continue
            found[fence.backend] = fence
        return frozenset(found.values()), intact

    def _read_nat(self, family: int) -> tuple[Ruleset, bool]:
        """(what natfail's nat chains hold, whether they and their jumps are in place)."""
        iptc = self._iptc
        table = self._table(family)
        intact = all(table.is_chain(c) for c in _JUMPS)
        if not intact:
            return Ruleset(), False
        intact = self._jumped_first(table, _JUMPS)
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
                    d["iif"] or None,
                    _parse_endpoint(d["to"]),
                    d["mark"],
                    d["service"],
                    d["backend_name"],
                )
                for d in pre.values()
                if "to" in d and "mark" in d
            }
            snat = {
                Snat(
                    Endpoint(ipaddress.ip_interface(d["src"]).ip, int(d["udp"]["sport"])),
                    _parse_endpoint(d["to"]),
                    d["mark"],
                    d["service"],
                    d["backend_name"],
                )
                for d in post.values()
                if "to" in d and "mark" in d
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

    def read(self) -> Ruleset:
        return self.inspect()[0]

    def intact(self) -> bool:
        return self.inspect()[1]

    def inspect(self) -> tuple[Ruleset, bool]:
        parts: list[tuple[Ruleset, bool]] = []
        try:
            for fam in self.families:
                parts.append(self._read_family(fam))
        except self._iptc.IPTCError as e:
            raise DataplaneError(f"iptables: {error_line(e)}") from None
        return _union(parts)

    # -- changing -----------------------------------------------------------------------

    @staticmethod
    def _of_family(rs: Ruleset, family: int) -> Ruleset:
        return Ruleset(
            frozenset(d for d in rs.dnat if d.family == family),
            frozenset(s for s in rs.snat if s.family == family),
            # masquerade matches the mark whatever the family: install it in both
            rs.masquerade,
            frozenset(f for f in rs.fence if f.family == family),
        )

    def _write(
        self, family: int, table: Any, jumps: dict[str, str], rules: dict[str, list[IptRule]]
    ) -> None:
        """Refills our chains of ``table`` with ``rules``, puts each jump first, commits."""
        iptc = self._iptc
        for ours, builtin in jumps.items():
            if not table.is_chain(ours):
                table.create_chain(ours)
            chain = iptc.Chain(table, ours)
            chain.flush()
            for r in rules[ours]:
                chain.append_rule(self._rule(r))
            bchain = iptc.Chain(table, builtin)
            found = [i for i, r in enumerate(bchain.rules) if r.target.name == ours]
            if found != [0]:
                for i in reversed(found):
                    bchain.delete_rule(bchain.rules[i])
                jump = iptc.Rule() if family == 4 else iptc.Rule6()
                jump.create_target(ours)
                bchain.insert_rule(jump, 0)
        table.commit()
        table.refresh()

    def _commit(self, family: int, step: IptCommit, want: Ruleset) -> None:
        """One commit of an apply (see :func:`natfail.core.ruleset.iptables_commits`)."""
        if step.table == "nat":
            self._write(family, self._table(family), _JUMPS, iptables_rules(want, family))
        else:
            rules = {IPT_FENCE_CHAIN: iptables_fence_rules(step.fence, family)}
            self._write(family, self._table(family, "filter"), _FENCE_JUMPS, rules)

    def _steps(self, family: int, want: Ruleset) -> tuple[Ruleset, list[IptCommit]]:
        """(what is installed, the commits that make it ``want``)."""
        nat, nat_ok = self._read_nat(family)
        fence, fence_ok = self._read_fence(family)
        installed = Ruleset(nat.dnat, nat.snat, nat.masquerade, fence)
        return installed, iptables_commits(installed, nat_ok, fence_ok, want)

    def apply(self, desired: Ruleset) -> None:
        iptc = self._iptc
        errors = (iptc.IPTCError, iptc.xtables.XTablesError, ValueError)
        for fam in self.families:
            want = self._of_family(desired, fam)
            try:
                before, steps = self._steps(fam, want)
            except errors as e:
                raise DataplaneError(f"iptables (IPv{fam}) read failed: {error_line(e)}") from None
            for done, step in enumerate(steps):
                try:
                    self._commit(fam, step, want)
                except errors as e:
                    why = f"iptables (IPv{fam}) {step.table} commit failed: {error_line(e)}"
                    if done:
                        why += self._undo(fam, before)
                    raise DataplaneError(why) from None

    def _undo(self, family: int, before: Ruleset) -> str:
        """Puts ``before`` back after a partial apply, in the same safe order; what to
        add to the error message."""
        iptc = self._iptc
        try:
            for step in self._steps(family, before)[1]:
                self._commit(family, step, before)
        except (iptc.IPTCError, iptc.xtables.XTablesError, ValueError) as e:
            return f"; putting the previous rules back failed too: {error_line(e)}"
        return " (the previous rules are back)"

    def remove_all(self) -> None:
        iptc = self._iptc
        # the NAT first: a moment with the fence and no SNAT lets nothing out
        for fam in self.families:
            for name, jumps in (("nat", _JUMPS), ("filter", _FENCE_JUMPS)):
                try:
                    table = self._table(fam, name)
                    if not any(table.is_chain(c) for c in jumps):
                        continue
                    for ours, builtin in jumps.items():
                        bchain = iptc.Chain(table, builtin)
                        for r in reversed(bchain.rules):
                            if r.target.name == ours:
                                bchain.delete_rule(r)
                        if table.is_chain(ours):
                            iptc.Chain(table, ours).flush()
                    for ours in jumps:
                        if table.is_chain(ours):
                            table.delete_chain(ours)
                    table.commit()
                    table.refresh()
                except (iptc.IPTCError, ValueError) as e:
                    raise DataplaneError(
                        f"iptables (IPv{fam}) remove ({name}): {error_line(e)}"
                    ) from None


def _union(parts: list[tuple[Ruleset, bool]]) -> tuple[Ruleset, bool]:
    """One Ruleset (and intactness) from the readings of each family."""
    dnat: set[Dnat] = set()
    snat: set[Snat] = set()
    masq: set[Masquerade] = set()
    fence: set[Fence] = set()
    intact = True
    for rs, ok in parts:
        dnat |= rs.dnat
        snat |= rs.snat
        masq |= rs.masquerade
        fence |= rs.fence
        intact = intact and ok
    return Ruleset(frozenset(dnat), frozenset(snat), frozenset(masq), frozenset(fence)), intact


# -- the helper process ------------------------------------------------------------------

# Linux prctl(2) option: the signal the kernel sends us when our parent (the thread that
# forked us) dies.
_PR_SET_PDEATHSIG: Final = 1
# A fork can fail for a moment (EAGAIN, ENOMEM): a few tries, briefly apart, before one
# call gives up; the daemon keeps the last good state and calls again at its next round.
_START_TRIES: Final = 3
_START_PAUSE: Final = 0.1
_REAP_WAIT: Final = 2.0
# What the daemon handles itself (stop, reload, Ctrl-C); see _FamilyProcess._start.
_HELD_SIGNALS: Final = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})

# The parent ends of every helper's channel, so that a helper forked later does not hold
# them open (a held end would hide the daemon's exit from the older helper).
_PARENT_ENDS: weakref.WeakSet[Connection] = weakref.WeakSet()


def _die_with_parent(parent_pid: int) -> bool:
    """Asks the kernel to SIGKILL us when the daemon dies, so that a helper never
    outlives a SIGKILLed daemon even if some other process still holds its channel
    open. False when the daemon is already gone.

    The kernel watches the thread that forked us, not the whole process: a helper
    forked from a thread that later ends is killed with it and simply replaced at the
    next call (the daemon calls the dataplane from its event loop thread)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # EOF on the channel still ends us once the daemon is gone
    # the daemon may have died between fork and prctl: then nobody would signal us
    return os.getppid() == parent_pid


def _own_signals() -> None:
    """Drops what the fork copied of the daemon's signal handling: the asyncio wakeup
    fd (a signal to us would wake the daemon's loop as if it were the daemon's own) and
    Python handlers, which would run daemon code here. Ctrl-C in a terminal reaches the
    whole group: the daemon handles it and closes our channel, so we ignore it rather
    than print a KeyboardInterrupt. SIGTERM keeps its default, so that multiprocessing's
    exit handler (terminate, then join) can always end us."""
    # ValueError off the main thread: then no wakeup fd was ours to drop
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
            if sig == signal.SIGINT:
                signal.signal(sig, signal.SIG_IGN)
            elif callable(handler):
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            continue
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD_SIGNALS)


class _Impl(Protocol):
    def __call__(self, family: int) -> object: ...


def _serve(
    family: int,
    conn: Connection,
    parent_pid: int,
    inherited: list[Connection],
    factory: _Impl = _IptFamily,
) -> None:
    """The helper's main loop: one request, one reply, until the daemon goes away.

    Returns (exit status 0, nothing printed) when the channel ends in any way: EOF when
    the daemon closed it or exited, ConnectionResetError when it died with our reply
    unread, BrokenPipeError when it died before we answered."""
    _own_signals()
    for end in inherited:
        end.close()
    if not _die_with_parent(parent_pid):
        return
    impl: object = None
    broken: DataplaneError | None = None
    try:
        impl = factory(family)
    except Exception as e:  # e.g. python-iptables missing: say so on every call
        broken = DataplaneError(f"iptables: {error_line(e)}")
    while True:
        try:
            name, args = conn.recv()
        except (EOFError, OSError):
            return
        reply: tuple[str, Any]
        if broken is not None:
            reply = ("err", broken)
        else:
            try:
                reply = ("ok", getattr(impl, name)(*args))
            except Exception as e:
                reply = (
                    "err",
                    e if isinstance(e, DataplaneError) else DataplaneError(error_line(e)),
                )
        try:
            conn.send(reply)
        except OSError:
            return


def _exit_status(code: int | None) -> str:
    if code is None:
        return "hung up without exiting (killed)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class _HelperGone(Exception):
    """The helper's channel broke: the helper is dead (or as good as)."""


class _FamilyProcess:
    """One family's helper process, restarted when it dies.

    The helper is forked from the calling process, so it shares the caller's network
    namespace, credentials and capabilities. Every request is a complete rendering of
    the desired state (apply) or a read, so a request that met a dead helper is simply
    sent again, once, to the new one."""

    def __init__(self, family: int, factory: _Impl = _IptFamily) -> None:
        self.family = family
        self._factory = factory
        self._conn: Connection | None = None
        self._proc: BaseProcess | None = None
        self._closed = False
        self._lost: str | None = None  # how the last helper ended, until one replaces it
        self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        ctx = multiprocessing.get_context("fork")
        ours, theirs = ctx.Pipe()
        # Until the helper has replaced the daemon's handlers (_own_signals), a signal
        # would run them in the helper: held back across the fork, the helper takes
        # it once it is ready (and we once the fork is done).
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
        try:
            proc = ctx.Process(
                target=_serve,
                args=(self.family, theirs, os.getpid(), [*_PARENT_ENDS, ours], self._factory),
                daemon=True,
                name=f"natfail-iptables-v{self.family}",
            )
            proc.start()
        except BaseException:
            ours.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
            theirs.close()
        _PARENT_ENDS.add(ours)
        self._conn, self._proc = ours, proc

    def _discard(self, kill: bool = False) -> str:
        """Closes the channel and reaps the helper (killing it if it lingers, or at once
        with ``kill``); how it ended."""
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        if conn is not None:
            _PARENT_ENDS.discard(conn)
            conn.close()
        if proc is None:
            return "not running"
        if kill:
            proc.kill()
        proc.join(_REAP_WAIT)  # it is dead or its channel broke: it ends at once
        code = proc.exitcode
        if code is None:
            proc.kill()
            proc.join(_REAP_WAIT)
        return _exit_status(code)

    def _respawn(self) -> None:
        if self._proc is not None:
            pid = self._proc.pid
            self._lost = f"iptables helper for IPv{self.family} (pid {pid}) died: {self._discard()}"
        if self._lost is None:
            self._lost = f"iptables helper for IPv{self.family} was not running"
        last: BaseException | None = None
        for attempt in range(_START_TRIES):
            if attempt:
                time.sleep(_START_PAUSE)
            try:
                self._start()
            except OSError as e:
                last = e
                continue
            log.warning("%s; started a new one (pid %s)", self._lost, self.pid)
            self._lost = None
            return
        raise DataplaneError(
            f"{self._lost}; cannot start a new one: {error_line(last) if last else 'unknown error'}"
        )

    def _exchange(self, name: str, args: tuple[Any, ...]) -> Any:
        conn = self._conn
        if conn is None or self._proc is None or not self._proc.is_alive():
            raise _HelperGone
        try:
            conn.send((name, args))
            status, value = conn.recv()
        except (EOFError, OSError):
            raise _HelperGone from None
        except BaseException:
            # interrupted between request and reply: a late reply would answer the next
            # request, so this helper cannot be trusted any more
            pid = self.pid
            self._discard(kill=True)
            self._lost = (
                f"iptables helper for IPv{self.family} (pid {pid}) was stopped "
                "after an interrupted request"
            )
            raise
        if status == "err":
            raise value
        return value

    def call(self, name: str, *args: Any) -> Any:
        if self._closed:
            raise DataplaneError("iptables dataplane is closed")
        try:
            return self._exchange(name, args)
        except _HelperGone:
            self._respawn()
        try:
            return self._exchange(name, args)
        except _HelperGone:
            pid = self.pid
            self._lost = (
                f"iptables helper for IPv{self.family} (pid {pid}) died at once: {self._discard()}"
            )
            raise DataplaneError(self._lost) from None

    def close(self) -> None:
        self._closed = True
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        if conn is not None:
            _PARENT_ENDS.discard(conn)
            conn.close()  # EOF: the helper ends by itself
        if proc is not None:
            proc.join(_REAP_WAIT)
            if proc.is_alive():
                proc.kill()
                proc.join(_REAP_WAIT)


class IptablesDataplane:
    """:class:`natfail.io.dataplane.Dataplane` on iptables (legacy) nat chains.

    Each family's table is handled by a helper process forked at construction (see the
    note at the top); every call waits for it, so the caller sees one commit per table
    per change. A helper found dead is forked again (one warning logged) and the call
    sent to the new one; when that fails, the call raises :class:`DataplaneError`.
    :meth:`close` stops the helpers."""

    name = "iptables"

    def __init__(self, families: tuple[int, ...] = (4, 6)) -> None:
        self.families = families
        self._procs = {f: _FamilyProcess(f) for f in families}

    def close(self) -> None:
        for p in self._procs.values():
            p.close()

    def helper_pids(self) -> dict[int, int | None]:
        """The pid of each family's helper process (None while none runs)."""
        return {f: p.pid for f, p in self._procs.items()}

    def __del__(self) -> None:
        procs = getattr(self, "_procs", {})
        for p in procs.values():
            p.close()
        procs.clear()

    def read(self) -> Ruleset:
        return self.inspect()[0]

    def intact(self) -> bool:
        return self.inspect()[1]

    def inspect(self) -> tuple[Ruleset, bool]:
        return _union([p.call("inspect") for p in self._procs.values()])

    def apply(self, desired: Ruleset) -> None:
        for p in self._procs.values():
            p.call("apply", desired)

    def remove_all(self) -> None:
        for p in self._procs.values():
            p.call("remove_all")
