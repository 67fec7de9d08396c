"""At start: natfail's rules left in the dataplane the daemon is NOT configured for.

The daemon reads and writes only the dataplane of ``firewall``. After a change
of ``firewall`` the other one may still hold natfail's rules from an earlier
run: its DNAT competes for the same packets, and its fence drops what the
backends it names start, a newly active backend's first handshake among
them. The daemon warns once at start and leaves them alone: removing them is
the operator's call (README.adoc, "Removing natfail")."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

from natfail.core.ruleset import Ruleset
from natfail.io.dataplane import Dataplane

log = logging.getLogger("natfail.dataplane")

# Legacy x_tables register a table in a namespace the first time it is used
# there: with none listed, no iptables-legacy rule can exist and no helper is
# started to look.
LEGACY_TABLE_LISTS: Final = ("/proc/net/ip_tables_names", "/proc/net/ip6_tables_names")


def _legacy_tables_in_use(lists: tuple[str, ...] = LEGACY_TABLE_LISTS) -> bool:
    for name in lists:
        try:
            if Path(name).read_text().split():
                return True
        except OSError:  # no x_tables at all
            continue
    return False


def _open_other(firewall: str) -> tuple[str, Dataplane] | None:
    if firewall == "nftables":
        if not _legacy_tables_in_use():
            return None
        from natfail.io.iptables import IptablesDataplane

        return "iptables", IptablesDataplane()
    from natfail.io.nftables import NftablesDataplane

    return "nftables", NftablesDataplane()


def describe(firewall: str, other: str, found: Ruleset) -> str | None:
    """The warning for what ``other`` holds, or None when that is nothing."""
    if found.empty:
        return None
    held = []
    if found.dnat:
        held.append(f"DNAT of {len(found.dnat)} public endpoint(s)")
    if found.snat or found.masquerade:
        held.append("SNAT")
    if found.fence:
        held.append(f"a fence on {len(found.fence)} backend(s)")
    where = "iptables-legacy" if other == "iptables" else "nftables (table inet natfail)"
    return (
        f'firewall = "{firewall}", but {where} still holds natfail\'s rules from a run with '
        f'firewall = "{other}" ({", ".join(held)}): they act on the same traffic; '
        'remove them as README.adoc, "Removing natfail", shows'
    )


def leftovers(firewall: str) -> str | None:
    """One warning line when the dataplane other than ``firewall`` holds natfail's
    rules; None when it holds none or cannot be read (then it holds none that
    natfail could have written: its library or its tables are not there)."""
    opened = None
    try:
        opened = _open_other(firewall)
        if opened is None:
            return None
        other, dataplane = opened
        found, _ = dataplane.inspect()
    except Exception as exc:  # a look at start must never stop the daemon
        log.debug("could not look at the other dataplane: %s", exc)
        return None
    finally:
        if opened is not None:
            close = getattr(opened[1], "close", None)
            if close is not None:
                close()
    return describe(firewall, other, found)
