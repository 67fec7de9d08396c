"""Line numbers for messages, best effort: which line of the TOML text sets a
key path. tomllib keeps no positions, so the text is scanned again, roughly
(table headers and array-of-table indices are tracked, multi-line strings
skipped, inline tables not entered)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Final

from natfail.config.problems import Where

_KEY_PART: Final = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_DOTTED: Final = rf"{_KEY_PART}(?:[ \t]*\.[ \t]*{_KEY_PART})*"
_HEADER_RE: Final = re.compile(rf"[ \t]*(\[\[?)[ \t]*({_DOTTED})[ \t]*(\]\]?)[ \t]*(?:#.*)?\r?")
_ASSIGN_RE: Final = re.compile(rf"[ \t]*({_DOTTED})[ \t]*=")
_PART_RE: Final = re.compile(_KEY_PART)


def _key_parts(dotted: str) -> list[str]:
    parts = []
    for token in _PART_RE.findall(dotted):
        if token.startswith('"'):
            try:
                token = str(json.loads(token))
            except ValueError:  # a TOML escape JSON lacks; good enough
                token = token[1:-1]
        elif token.startswith("'"):
            token = token[1:-1]
        parts.append(token)
    return parts


def _resolve_header(parts: list[str], is_array: bool, counts: dict[Where, int]) -> list[Where]:
    """The key path of a table header, with array indices: the second
    [[service.backend]] inside the first [[service]] is service[0].backend[1].
    Returns every path on the way, so a table's own line is known too."""
    where: Where = ()
    seen: list[Where] = []
    for position, part in enumerate(parts):
        where = (*where, part)
        seen.append(where)
        if is_array and position == len(parts) - 1:
            counts[where] = counts.get(where, 0) + 1
            where = (*where, counts[where] - 1)
            seen.append(where)
        elif where in counts:
            where = (*where, counts[where] - 1)
    return seen


def _line_index(source: str) -> dict[Where, int]:
    """Map each key path to the first line that sets it, tracking table
    headers and array-of-table indices. Multi-line strings are skipped
    roughly; inline tables are not entered (their key's line is used)."""
    index: dict[Where, int] = {}
    counts: dict[Where, int] = {}
    table: Where = ()
    in_string: str | None = None
    for number, line in enumerate(source.split("\n"), start=1):
        if in_string is not None:
            if in_string in line:
                in_string = None
            continue
        header = _HEADER_RE.fullmatch(line)
        if header and len(header.group(1)) == len(header.group(3)):
            paths = _resolve_header(_key_parts(header.group(2)), header.group(1) == "[[", counts)
            for where in paths:
                index.setdefault(where, number)
            table = paths[-1]
            continue
        assign = _ASSIGN_RE.match(line)
        if assign:
            where = table
            for part in _key_parts(assign.group(1)):
                where = (*where, part)
                index.setdefault(where, number)
        for quotes in ('"""', "'''"):
            if line.count(quotes) % 2 == 1:
                in_string = quotes
                break
    return index


def line_finder(source: str) -> Callable[[Where], int | None]:
    """:func:`line_of` for many keys of one source: the source is indexed once
    (per key, a config with thousands of problems took minutes)."""
    try:
        index = _line_index(source) if source else {}
    except Exception:  # a helper for messages must never hide the real error
        index = {}

    def find(where: Where) -> int | None:
        while where:
            if where in index:
                return index[where]
            where = where[:-1]
        return None

    return find


def line_of(source: str, where: Where) -> int | None:
    """The line of `where`, else of its nearest enclosing key or table (a
    missing key is reported at its table's header). Never raises."""
    return line_finder(source)(where)
