"""The warning about the other dataplane's rules, without a firewall."""

from __future__ import annotations

from pathlib import Path

import pytest

from natfail.core import ruleset
from natfail.core.ruleset import Ruleset
from natfail.io import other_dataplane
from tests.builders import service


def test_nothing_found_is_no_warning() -> None:
    assert other_dataplane.describe("nftables", "iptables", Ruleset()) is None


def test_the_warning_is_one_line_naming_what_is_left_and_the_way_out() -> None:
    svc = service("wg0", "203.0.113.10:51820", [("a", "10.0.0.2:51820"), ("b", "10.0.0.3:51820")])
    text = other_dataplane.describe("iptables", "nftables", ruleset.build([svc], {"wg0": "b"}))
    assert text == (
        'firewall = "iptables", but nftables (table inet natfail) still holds natfail\'s rules'
        ' from a run with firewall = "nftables" (DNAT of 1 public endpoint(s), SNAT, a fence'
        " on 1 backend(s)): they act on the same traffic; remove them as README.adoc,"
        ' "Removing natfail", shows'
    )
    assert "\n" not in text


def test_legacy_tables_are_in_use_when_a_list_names_one(tmp_path: Path) -> None:
    empty, named = tmp_path / "empty", tmp_path / "named"
    empty.write_text("")
    named.write_text("nat\nfilter\n")
    missing = str(tmp_path / "missing")
    assert not other_dataplane._legacy_tables_in_use((missing, str(empty)))
    assert other_dataplane._legacy_tables_in_use((missing, str(empty), str(named)))


def test_a_dataplane_that_cannot_be_opened_holds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(firewall: str) -> None:
        raise OSError("libnftables.so.1: cannot open shared object file")

    monkeypatch.setattr(other_dataplane, "_open_other", broken)
    assert other_dataplane.leftovers("iptables") is None
