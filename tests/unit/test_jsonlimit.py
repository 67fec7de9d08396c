"""The depth bound of natfail.jsonlimit: measured before parsing, strings
and escapes respected, and otherwise what json.loads gives."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natfail import jsonlimit


def _nested(levels: int, opener: str = "[", closer: str = "]") -> str:
    return opener * levels + closer * levels


@pytest.mark.parametrize(
    "text",
    [
        "[" * 60_000,  # unclosed: json.loads itself raises RecursionError on it
        _nested(60_000),
        '{"a":' * 70 + "1" + "}" * 70,
        "[" * 65 + "]" * 65,
    ],
)
def test_too_deep_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"^JSON nested deeper than 64 levels$"):
        jsonlimit.loads(text)
    with pytest.raises(ValueError, match="JSON nested deeper"):
        jsonlimit.loads(text.encode())


def test_without_the_bound_json_recurses() -> None:
    with pytest.raises(RecursionError):
        json.loads("[" * 60_000)


@pytest.mark.parametrize(
    "text",
    [
        _nested(64),
        '"' + "[" * 1000 + '"',  # brackets in a string do not count
        '["\\"' + "[" * 1000 + '"]',  # nor after an escaped quote
        '["\\\\", ' + _nested(63) + "]",  # an escaped backslash ends before the quote
        '{"k[": "{{{{", "v": [[1]]}',
    ],
)
def test_within_the_bound_parses_as_json(text: str) -> None:
    assert jsonlimit.loads(text) == json.loads(text)


def test_max_depth_is_a_parameter() -> None:
    assert jsonlimit.loads("[[1]]", max_depth=2) == [[1]]
    with pytest.raises(ValueError, match="deeper than 1 levels"):
        jsonlimit.loads("[[1]]", max_depth=1)
    assert jsonlimit.loads("5", max_depth=0) == 5


def test_bytes_in_every_json_encoding() -> None:
    doc = {"command": "status", "x": ["ś[", [1]]}  # U+015B encodes as 5B 01 in UTF-16-LE
    for encoding in ("utf-8", "utf-16-le", "utf-16-be", "utf-32"):
        data = json.dumps(doc, ensure_ascii=False).encode(encoding)
        assert jsonlimit.loads(data, max_depth=3) == doc
    with pytest.raises(UnicodeDecodeError):
        jsonlimit.loads(b"\xff\xfe\xff")


def test_invalid_json_is_still_json_s_error() -> None:
    for text in ("", "[1,", '"unterminated [[[', "]]]]", "{'a': 1}"):
        with pytest.raises(json.JSONDecodeError):
            jsonlimit.loads(text)


def test_depth() -> None:
    assert jsonlimit.depth("1") == 0
    assert jsonlimit.depth('[{"a": [1, "]]]"]}]') == 3
    assert jsonlimit.depth('"\\\\"[[]]') == 2


_json: Any = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\n\u015b'),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(alphabet='[]{}"\\a'), inner, max_size=3)
    ),
    max_leaves=30,
)


def _true_depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_true_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_true_depth(v) for v in value.values()), default=0)
    return 0


@given(_json)
def test_the_scan_measures_what_the_parser_sees(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False)
    assert jsonlimit.depth(text) == _true_depth(value)
    assert jsonlimit.loads(text) == value
    if _true_depth(value) > 0:
        with pytest.raises(ValueError, match="nested deeper"):
            jsonlimit.loads(text, max_depth=_true_depth(value) - 1)
