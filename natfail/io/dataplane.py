"""The dataplane interface: what the daemon needs from a firewall backend.

Two implementations: :class:`natfail.io.nftables.NftablesDataplane` and
:class:`natfail.io.iptables.IptablesDataplane`. Both work in the network namespace
of the calling process (the daemon runs in the gateway's namespace) and touch only
what natfail owns.

How the daemon uses one::

    dp = NftablesDataplane()
    installed = dp.read()                      # at start: adopt what a previous run left
    active = ruleset.active_from(installed, config.services)
    ...
    desired = ruleset.build(config.services, active)
    old_mark = ...                             # mark of the backend being replaced
    dp.apply(desired)                          # one transaction; raises DataplaneError
    conntrack.remove_backend(old_mark, old_backend.address)   # only after success

``apply`` is idempotent: applying the installed state again does nothing.
"""

from __future__ import annotations

from typing import Protocol

from natfail.core.ruleset import Ruleset

__all__ = ["Dataplane", "DataplaneError"]


class DataplaneError(RuntimeError):
    """The firewall refused a change or could not be read (one line). After a failed
    ``apply`` nothing of that change is installed (the transaction is atomic)."""


class Dataplane(Protocol):
    """A firewall backend that installs a :class:`Ruleset` atomically."""

    name: str

    def apply(self, desired: Ruleset) -> None:
        """Makes the installed state equal ``desired`` in ONE NAT transaction: there is
        never a moment with no rule or two rules for a service. With nftables the fence
        changes in that same transaction; with iptables the fence's filter-table commits
        are ordered around the nat commit so that no standby is ever unfenced. Repairs
        drift (a damaged or missing table/chain) the same way."""
        ...

    def read(self) -> Ruleset:
        """What natfail finds installed (empty when nothing is). Entries it cannot
        understand are left out, so a damaged install reads as a drift."""
        ...

    def intact(self) -> bool:
        """True when natfail's tables/chains exist in the expected shape."""
        ...

    def inspect(self) -> tuple[Ruleset, bool]:
        """``read()`` and ``intact()`` from one reading of the firewall."""
        ...

    def remove_all(self) -> None:
        """Removes everything natfail installed (its table or chains and jumps), in one
        transaction; nothing else. No error when nothing is installed."""
        ...
