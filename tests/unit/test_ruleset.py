"""The pure ruleset: marks, the canonical form, the nft and iptables renderings."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natfail.core import ruleset
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
    assert ops == [
        ("delete", "dnat4"),
        ("delete", "dnatport4"),
        ("delete", "mark4"),
        ("add", "dnat4"),
        ("add", "dnatport4"),
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
