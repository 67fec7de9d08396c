"""``json.dumps(value, indent=2)``, the same text, in half the time.

With an indent the standard library falls back from its C encoder to a
generator per value, and natfailctl's ``status --json`` of a thousand
services (1 MB of text) spent 25 ms there, a good part of its run. This
writes the same text with one list of parts; anything it was not made for
(keys that are not strings, values that are not JSON's) goes to
``json.dumps``, which says what is wrong."""

from __future__ import annotations

import json
from json.encoder import encode_basestring_ascii
from typing import Any

_INFINITY = float("inf")


class _Unusual(Exception):
    """A key or value that json.dumps handles its own way."""


def _float(value: float) -> str:
    if value != value:
        return "NaN"
    if value == _INFINITY:
        return "Infinity"
    if value == -_INFINITY:
        return "-Infinity"
    return float.__repr__(value)


def dumps_indented(value: Any, indent: int = 2) -> str:
    parts: list[str] = []
    add = parts.append

    def write(item: Any, depth: int) -> None:
        if isinstance(item, str):
            add(encode_basestring_ascii(item))
        elif item is None:
            add("null")
        elif item is True:
            add("true")
        elif item is False:
            add("false")
        elif isinstance(item, int):
            add(int.__repr__(item))
        elif isinstance(item, float):
            add(_float(item))
        elif isinstance(item, dict):
            if not item:
                add("{}")
                return
            inner = "\n" + " " * (indent * (depth + 1))
            add("{")
            separator = inner
            for key, member in item.items():
                if not isinstance(key, str):
                    raise _Unusual
                add(separator)
                separator = "," + inner
                add(encode_basestring_ascii(key))
                add(": ")
                write(member, depth + 1)
            add("\n" + " " * (indent * depth) + "}")
        elif isinstance(item, (list, tuple)):
            if not item:
                add("[]")
                return
            inner = "\n" + " " * (indent * (depth + 1))
            add("[")
            separator = inner
            for member in item:
                add(separator)
                separator = "," + inner
                write(member, depth + 1)
            add("\n" + " " * (indent * depth) + "]")
        else:
            raise _Unusual

    try:
        write(value, 0)
    except (_Unusual, RecursionError):
        return json.dumps(value, indent=indent)
    return "".join(parts)
