"""natfailctl's indented JSON is json.dumps(indent=2)'s, character for character."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from natfail.cli.jsonout import dumps_indented

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and the infinities too, as json.dumps writes them
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(), inner, max_size=4)
    ),
    max_leaves=40,
)


@settings(max_examples=500)
@given(_JSON)
def test_the_same_text_as_json_dumps(value: Any) -> None:
    import json

    assert dumps_indented(value) == json.dumps(value, indent=2)


def test_what_it_was_not_made_for_goes_to_json_dumps() -> None:
    import json

    odd = {1: [True, None], "x": {2.5: "y"}}
    assert dumps_indented(odd) == json.dumps(odd, indent=2)
    try:
        dumps_indented({"x": object()})
    except TypeError as exc:
        assert "not JSON serializable" in str(exc)
    else:
        raise AssertionError("an object() was written as JSON")
