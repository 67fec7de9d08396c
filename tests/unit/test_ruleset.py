"""The pure ruleset: marks, the canonical form, the nft and iptables renderings."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natfail.core import ruleset
from natfail.core.model import Service
from natfail.core.ruleset import Ruleset, RulesetError
from tests.builders import service

S = [
    service("wg0", "203.0.113.10:51820", [("a", "10.0.0.2:51820"), ("b", "10.0.0.3:51820")]),
    service(
        "wg6",
        "[2001:db8::10]:51820",
        [("a", "[fd00::2]:51820"), ("b", "[fd00::3]:51820")],
        iif="eth0",
        source_nat="masquerade",
    ),
]

names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}", fullmatch=True)


@given(names, names)
def test_marks_are_stable_prefixed_and_never_zero(service: str, backend: str) -> None:
    m = ruleset.backend_mark(service, backend)
    assert m == ruleset.backend_mark(service, backend)
    assert m != 0 and ruleset.is_natfail_mark(m)
    assert m & ruleset.MARK_PREFIX_MASK == ruleset.MARK_PREFIX


def test_known_mark_values_do_not_change() -> None:
    # marks survive restarts and upgrades: a change here orphans installed state
    assert ruleset.backend_mark("wg0", "a") == 0x6EA6025B
    assert ruleset.backend_mark("wg0", "b") == 0x6E2BD992


def test_mark_collision_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ruleset, "backend_mark", lambda s, b: ruleset.MARK_PREFIX | 1)
    with pytest.raises(RulesetError, match="same conntrack mark"):
        ruleset.marks(S)


def test_build() -> None:
    rs = ruleset.build(S, {"wg0": "a", "wg6": "b"})
    assert {(d.service, d.backend_name, str(d.backend)) for d in rs.dnat} == {
        ("wg0", "a", "10.0.0.2:51820"),
        ("wg6", "b", "[fd00::3]:51820"),
    }
    # SNAT for every backend, active or not, towards the public endpoint
    assert {(str(s.backend), str(s.public)) for s in rs.snat} == {
        ("10.0.0.2:51820", "203.0.113.10:51820"),
        ("10.0.0.3:51820", "203.0.113.10:51820"),
        ("[fd00::2]:51820", "[2001:db8::10]:51820"),
        ("[fd00::3]:51820", "[2001:db8::10]:51820"),
    }
    assert {m.backend_name for m in rs.masquerade} == {"a", "b"}
    assert all(m.service == "wg6" for m in rs.masquerade)
    d6 = next(d for d in rs.dnat if d.service == "wg6")
    assert d6.inbound_interface == "eth0"
    assert d6.mark == ruleset.backend_mark("wg6", "b")


def test_build_without_active_keeps_snat_only() -> None:
    rs = ruleset.build(S, {"wg0": None})
    assert not rs.dnat and len(rs.snat) == 4


def test_build_refuses_unknowns() -> None:
    with pytest.raises(RulesetError):
        ruleset.build(S, {"nope": "a"})
    with pytest.raises(RulesetError):
        ruleset.build(S, {"wg0": "zz"})


def test_duplicate_public_or_backend_refused() -> None:
    twin = service("other", "203.0.113.10:51820", [("c", "10.0.0.9:51820")])
    with pytest.raises(RulesetError, match="both use"):
        ruleset.build([*S, twin], {"wg0": "a", "other": "c"})
    shared = service("other", "203.0.113.11:51820", [("c", "10.0.0.2:51820")])
    with pytest.raises(RulesetError, match="is used by"):
        ruleset.build([*S, shared], {})


def test_active_from_adopts_only_what_matches_the_config() -> None:
    rs = ruleset.build(S, {"wg0": "b", "wg6": "a"})
    assert ruleset.active_from(rs, S) == {"wg0": "b", "wg6": "a"}
    moved = [
        service("wg0", "203.0.113.10:51820", [("a", "10.0.0.2:51820"), ("b", "10.0.0.99:51820")]),
        S[1],
    ]
    assert ruleset.active_from(rs, moved) == {"wg6": "a"}


def _listing_after(cmds: list[dict[str, object]]) -> list[dict[str, object]]:
    """A fake 'nft -j list table' of what the commands built (maps and rules only)."""
    maps: dict[str, dict[str, object]] = {}
    out: list[dict[str, object]] = []
    for c in cmds:
        ((op, body),) = c.items()
        assert isinstance(body, dict)
        ((what, obj),) = body.items()
        if op == "add" and what in ("map", "set"):
            maps[obj["name"]] = {what: {**obj, "elem": []}}
        elif op == "add" and what == "chain":
            out.append({"chain": obj})
        elif op == "add" and what == "rule":
            out.append({"rule": obj})
        elif what == "element":
            m = next(iter(maps[obj["name"]].values()))
            assert isinstance(m, dict)
            if op == "add":
                m["elem"] += obj["elem"]
            else:
                keys = [json.dumps(k) for k in obj["elem"]]

                def key_of(e: object) -> str:
                    k = e[0] if isinstance(e, list) else e
                    if isinstance(k, dict) and "elem" in k:
                        k = k["elem"]["val"]
                    return json.dumps(k)

                m["elem"] = [e for e in m["elem"] if key_of(e) not in keys]
    return list(maps.values()) + out


def test_nft_full_then_parse_round_trips() -> None:
    rs = ruleset.build(S, {"wg0": "a", "wg6": "b"})
    cmds = ruleset.nft_full_commands(rs, table_exists=False)
    parsed, intact = ruleset.nft_parse(_listing_after(cmds))
    assert intact and parsed == rs


def test_nft_swap_is_element_replacement_only() -> None:
    a = ruleset.build(S, {"wg0": "a", "wg6": "a"})
    b = ruleset.build(S, {"wg0": "b", "wg6": "a"})
    cmds = ruleset.nft_commands(a, b)
    ops = [(op, body["element"]["name"]) for c in cmds for op, body in c.items()]
    # the fence moves in the same transaction: b unfenced, a fenced
    assert ops == [
        ("delete", "dnat4"),
        ("delete", "dnatport4"),
        ("delete", "fence4"),
        ("delete", "mark4"),
        ("add", "dnat4"),
        ("add", "dnatport4"),
        ("add", "fence4"),
        ("add", "mark4"),
    ]
    assert ruleset.nft_commands(b, b) == []
    full = ruleset.nft_full_commands(a, table_exists=False)
    parsed, _ = ruleset.nft_parse(_listing_after(full + cmds))
    assert parsed == b
    # only natfail's table is ever named
    for c in full + cmds:
        text = json.dumps(c)
        assert '"table": "natfail"' in text or '"name": "natfail"' in text


def test_nft_parse_of_damaged_table() -> None:
    rs = ruleset.build(S, {"wg0": "a"})
    listing = _listing_after(ruleset.nft_full_commands(rs, table_exists=False))
    no_rules = [x for x in listing if "rule" not in x]
    assert ruleset.nft_parse(no_rules)[1] is False
    assert ruleset.nft_parse([])[0] == Ruleset()


def test_iptables_rules() -> None:
    rs = ruleset.build(S, {"wg0": "a", "wg6": "b"})
    v4 = ruleset.iptables_rules(rs, 4)
    pre = v4[ruleset.IPT_PRE_CHAIN]
    assert [r.target[0] for r in pre] == ["CONNMARK", "DNAT"]
    assert pre[1].target == ("DNAT", (("to-destination", "10.0.0.2:51820"),))
    assert pre[0].dst == "203.0.113.10/32" and pre[0].in_interface is None
    post = v4[ruleset.IPT_POST_CHAIN]
    assert [r.target[0] for r in post][:4] == ["CONNMARK", "SNAT", "CONNMARK", "SNAT"]
    v6 = ruleset.iptables_rules(rs, 6)
    assert v6[ruleset.IPT_PRE_CHAIN][1].target == ("DNAT", (("to-destination", "[fd00::3]:51820"),))
    assert v6[ruleset.IPT_PRE_CHAIN][0].in_interface == "eth0"
    assert sum(r.target[0] == "MASQUERADE" for r in v6[ruleset.IPT_POST_CHAIN]) == 2
    assert ruleset.iptables_rules(rs, 4) == v4  # deterministic order


# --- the fence ------------------------------------------------------------------------


def _fenced(rs: Ruleset) -> set[tuple[str, str, str]]:
    return {(f.service, f.backend_name, str(f.backend)) for f in rs.fence}


def test_build_fences_every_backend_but_the_active() -> None:
    rs = ruleset.build(S, {"wg0": "a", "wg6": "b"})
    assert _fenced(rs) == {("wg0", "b", "10.0.0.3:51820"), ("wg6", "a", "[fd00::2]:51820")}
    assert {f.family for f in rs.fence} == {4, 6}
    # masquerade (wg6) is fenced like preserve (wg0); no active yet: nothing fenced
    assert _fenced(ruleset.build(S, {"wg0": "b"})) == {("wg0", "a", "10.0.0.2:51820")}
    assert ruleset.build(S, {"wg0": None}).fence == frozenset()
    assert ruleset.build(S, {}).fence == frozenset()


def test_fence_alone_is_not_empty_and_nat_drops_it() -> None:
    rs = ruleset.build(S, {"wg0": "a"})
    only = Ruleset(fence=rs.fence)
    assert not only.empty
    assert rs.nat() == Ruleset(rs.dnat, rs.snat, rs.masquerade)
    assert Ruleset().nat() == Ruleset()


def test_one_address_fenced_twice_is_refused() -> None:
    ep = S[0].backends[1].address
    with pytest.raises(RulesetError, match="is fenced for"):
        Ruleset(fence=frozenset({ruleset.Fence(ep, "wg0", "b"), ruleset.Fence(ep, "x", "y")}))


THREE = [
    service(
        f"s{i}",
        f"203.0.113.{20 + i}:51820",
        [(n, f"10.1.{i}.{j + 2}:51820") for j, n in enumerate("abc")],
        source_nat="masquerade" if i == 1 else "preserve",
    )
    for i in range(3)
]
choices = st.dictionaries(
    st.sampled_from([s.name for s in THREE]), st.sampled_from(["a", "b", "c", None])
)


@given(st.lists(choices, min_size=1, max_size=12))
def test_builder_agrees_with_build(steps: list[dict[str, str | None]]) -> None:
    builder = ruleset.Builder(THREE)
    full = {s.name: None for s in THREE}
    for step in steps:
        # the same keys every time (as the daemon passes them) and fewer keys
        for active in ({**full, **step}, step):
            got = builder.build(active)
            assert got == ruleset.build(THREE, active)
            assert got.snat is builder.build(active).snat


def test_builder_refuses_what_build_refuses() -> None:
    builder = ruleset.Builder(THREE)
    builder.build({"s0": "a", "s1": "a", "s2": "a"})
    with pytest.raises(RulesetError, match="no backend"):
        builder.build({"s0": "zz", "s1": "a", "s2": "a"})
    with pytest.raises(RulesetError, match="unknown service"):
        builder.build({"nope": "a"})
    # a refused build leaves the builder as it was
    assert builder.build({"s0": "b", "s1": "a", "s2": "a"}) == ruleset.build(
        THREE, {"s0": "b", "s1": "a", "s2": "a"}
    )


def _element_ops(cmds: list[dict[str, object]]) -> list[tuple[str, str, str]]:
    """(op, set or map, what) of every element command; ``what`` is the comment, or
    the key of a delete (deletes carry no comment)."""
    out = []
    for c in cmds:
        ((op, body),) = c.items()
        assert isinstance(body, dict)
        el = body["element"]
        for e in el["elem"]:
            k = e[0] if isinstance(e, list) else e
            what = k["elem"]["comment"] if isinstance(k, dict) and "elem" in k else json.dumps(k)
            out.append((op, el["name"], what))
    return out


def test_nft_switch_touches_only_that_services_fence() -> None:
    before = ruleset.build(THREE, {"s0": "a", "s1": "a", "s2": "b"})
    after = ruleset.build(THREE, {"s0": "a", "s1": "c", "s2": "b"})
    ops = _element_ops(ruleset.nft_commands(before, after))
    fence_ops = [(op, what) for op, name, what in ops if name == "fence4"]
    # c unfenced (the delete names it by key), a fenced; b stays fenced, untouched
    assert fence_ops == [("delete", json.dumps({"concat": ["10.1.1.4", 51820]})), ("add", "s1/a")]
    adds = {what for op, _, what in ops if op == "add"}
    assert adds == {"s1/a", "s1/c"}
    deleted = " ".join(what for op, _, what in ops if op == "delete")
    assert "10.1.0." not in deleted and "10.1.2." not in deleted
    assert "203.0.113.20" not in deleted and "203.0.113.22" not in deleted


def test_nft_fence_round_trips_and_is_in_its_own_chain() -> None:
    rs = ruleset.build(S, {"wg0": "b", "wg6": "a"})
    full = ruleset.nft_full_commands(rs, table_exists=False)
    listing: list[Any] = _listing_after(full)
    chain = next(x["chain"] for x in listing if "chain" in x and x["chain"]["name"] == "fence")
    assert (chain["type"], chain["hook"], chain["prio"]) == ("filter", "forward", -10)
    rules = [x["rule"] for x in listing if "rule" in x and x["rule"]["chain"] == "fence"]
    assert [r["comment"] for r in rules] == ["natfail fence4", "natfail fence6"]
    for r in rules:
        text = json.dumps(r["expr"])
        assert '"direction"' in text and '"original"' in text and '{"drop": null}' in text
    parsed, intact = ruleset.nft_parse(listing)
    assert intact and parsed.fence == rs.fence and parsed == rs
    # and back to b after a switch
    rs2 = ruleset.build(S, {"wg0": "a", "wg6": "a"})
    parsed2, intact2 = ruleset.nft_parse(_listing_after(full + ruleset.nft_commands(rs, rs2)))
    assert intact2 and parsed2 == rs2
    assert _fenced(parsed2) == {("wg0", "b", "10.0.0.3:51820"), ("wg6", "b", "[fd00::3]:51820")}


def test_nft_table_without_the_fence_is_rebuilt_but_still_adopted() -> None:
    # what a natfail before the fence installed: no fence chain, rules or sets
    rs = ruleset.build(S, {"wg0": "b", "wg6": "a"})
    listing: list[Any] = _listing_after(ruleset.nft_full_commands(rs.nat(), table_exists=False))
    old = [
        x
        for x in listing
        if not ("chain" in x and x["chain"]["name"] == "fence")
        and not ("rule" in x and x["rule"]["chain"] == "fence")
        and not ("set" in x and x["set"]["name"].startswith("fence"))
    ]
    parsed, intact = ruleset.nft_parse(old)
    assert not intact  # so the apply path rebuilds it with nft_full_commands
    assert parsed == rs.nat()
    assert ruleset.active_from(parsed, S) == {"wg0": "b", "wg6": "a"}


def test_nft_fence_chain_on_another_hook_is_not_intact() -> None:
    rs = ruleset.build(S, {"wg0": "a"})
    listing: list[Any] = _listing_after(ruleset.nft_full_commands(rs, table_exists=False))
    for x in listing:
        if "chain" in x and x["chain"]["name"] == "fence":
            x["chain"] = {**x["chain"], "hook": "input"}
    assert ruleset.nft_parse(listing)[1] is False


def test_iptables_fence_rules() -> None:
    rs = ruleset.build(S, {"wg0": "a", "wg6": "b"})
    (r4,) = ruleset.iptables_rules(rs, 4)[ruleset.IPT_FENCE_CHAIN]
    assert r4.chain == ruleset.IPT_FENCE_CHAIN and r4.src == "10.0.0.3/32" and r4.dst is None
    assert r4.matches == (
        ("udp", (("sport", "51820"),)),
        ("conntrack", (("ctdir", "ORIGINAL"),)),
        ("comment", (("comment", "natfail fence wg0/b"),)),
    )
    assert r4.target == ("DROP", ())
    (r6,) = ruleset.iptables_fence_rules(rs.fence, 6)
    assert r6.src == "fd00::2/128" and r6.comment == "natfail fence wg6/a"


def _unsafe_moments(
    services: list[Service], states: list[tuple[Ruleset, frozenset[ruleset.Fence]]]
) -> list[str]:
    """Every (moment, backend) at which a backend that is not its service's DNAT
    target is not fenced."""
    out = []
    for i, (nat, fence) in enumerate(states):
        fenced = {f.backend for f in fence}
        for d in nat.dnat:
            svc = next(s for s in services if s.name == d.service)
            for b in svc.backends:
                if b.name != d.backend_name and b.address not in fenced:
                    out.append(f"moment {i}: {d.service}/{b.name}")
    return out


def _run_commits(
    installed: Ruleset, steps: list[ruleset.IptCommit], desired: Ruleset
) -> list[tuple[Ruleset, frozenset[ruleset.Fence]]]:
    nat, fence = installed.nat(), installed.fence
    states = [(nat, fence)]
    for step in steps:
        if step.table == "nat":
            nat = desired.nat()
        else:
            fence = step.fence
        states.append((nat, fence))
    return states


def test_iptables_commit_order_of_a_switch() -> None:
    a = ruleset.build(THREE, {"s0": "a"})
    b = ruleset.build(THREE, {"s0": "b"})
    steps = ruleset.iptables_commits(a, True, True, b)
    assert [s.table for s in steps] == ["filter", "nat", "filter"]
    assert steps[0].fence == a.fence | b.fence
    assert steps[2].fence == b.fence
    assert ruleset.iptables_commits(b, True, True, b) == []
    # the order the other way round would let the old backend out between the commits
    wrong = [ruleset.IptCommit("nat"), ruleset.IptCommit("filter", b.fence)]
    assert _unsafe_moments(THREE, _run_commits(a, wrong, b)) == ["moment 1: s0/a"]
    assert _unsafe_moments(THREE, _run_commits(a, steps, b)) == []


def test_iptables_commits_skip_what_does_not_change() -> None:
    a = ruleset.build(THREE, {"s0": "a"})
    # a table of the version before the fence: the nat is right, the filter chain missing
    assert ruleset.iptables_commits(a.nat(), True, False, a) == [
        ruleset.IptCommit("filter", a.fence)
    ]
    # a damaged nat chain alone: the fence is already what both states fence
    assert ruleset.iptables_commits(a, False, True, a) == [ruleset.IptCommit("nat")]
    # a new service: its standbys fenced before its DNAT and SNAT go in, nothing after
    both = ruleset.build(THREE, {"s0": "a", "s1": "b"})
    assert ruleset.iptables_commits(a, True, True, both) == [
        ruleset.IptCommit("filter", both.fence),
        ruleset.IptCommit("nat"),
    ]


actives3 = st.fixed_dictionaries({s.name: st.sampled_from(["a", "b", "c", None]) for s in THREE})


@given(actives3, actives3, st.booleans(), st.booleans())
def test_iptables_commits_never_let_a_standby_out(
    old: dict[str, str | None], new: dict[str, str | None], nat_ok: bool, filter_ok: bool
) -> None:
    installed = ruleset.build(THREE, old)
    desired = ruleset.build(THREE, new)
    steps = ruleset.iptables_commits(installed, nat_ok, filter_ok, desired)
    states = _run_commits(installed, steps, desired)
    assert _unsafe_moments(THREE, states) == []
    assert states[-1] == (desired.nat(), desired.fence)
    tables = [s.table for s in steps]
    assert tables in (
        [],
        ["nat"],
        ["filter"],
        ["filter", "nat"],
        ["nat", "filter"],
        ["filter", "nat", "filter"],
    )
    if nat_ok and filter_ok and old == new:
        assert steps == []
