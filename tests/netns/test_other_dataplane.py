"""The start-up look at the dataplane natfail is not configured for, in a fresh
namespace with real nftables and iptables-legacy rules written by natfail's own
dataplanes."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from natfail.core import ruleset
from natfail.io import other_dataplane
from natfail.io.iptables import IptablesDataplane
from natfail.io.nftables import NftablesDataplane
from natfail.lab.processes import run
from tests.builders import service
from tests.netns.nsworker import NsWorker

pytestmark = pytest.mark.netns


@pytest.fixture
def worker() -> Iterator[NsWorker]:
    ns = f"nfod{secrets.token_hex(3)}"
    run(["ip", "netns", "add", ns])
    try:
        with NsWorker(ns) as w:
            yield w
    finally:
        run(["ip", "netns", "del", ns], check=False)


def test_each_dataplane_warns_of_the_other_ones_rules(worker: NsWorker) -> None:
    svc = service("wg0", "203.0.113.10:51820", [("a", "10.0.0.2:51820"), ("b", "10.0.0.3:51820")])
    desired = ruleset.build([svc], {"wg0": "a"})
    assert desired.dnat and desired.fence
    assert worker.call(other_dataplane.leftovers, "nftables") is None
    assert worker.call(other_dataplane.leftovers, "iptables") is None

    ipt = worker.create(IptablesDataplane)
    ipt.apply(desired)
    warning = worker.call(other_dataplane.leftovers, "nftables")
    assert warning is not None
    assert warning.startswith('firewall = "nftables", but iptables-legacy still holds')
    assert "DNAT of 1 public endpoint(s)" in warning and "a fence on 1 backend(s)" in warning
    assert worker.call(other_dataplane.leftovers, "iptables") is None
    ipt.remove_all()
    assert worker.call(other_dataplane.leftovers, "nftables") is None
    ipt.close()

    nft = worker.create(NftablesDataplane)
    nft.apply(desired)
    warning = worker.call(other_dataplane.leftovers, "iptables")
    assert warning is not None
    assert warning.startswith('firewall = "iptables", but nftables (table inet natfail)')
    assert worker.call(other_dataplane.leftovers, "nftables") is None
