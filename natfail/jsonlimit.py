"""JSON with a bound on nesting.

`json.loads` recurses once per level: input nested some thousands deep
raises RecursionError (not a ValueError, so it escapes the usual handling)
and costs a traceback's worth of time and log. `loads` measures the depth
first with one cheap scan and refuses what is too deep with a ValueError."""

from __future__ import annotations

import json
import re
from typing import Any, Final

MAX_DEPTH: Final = 64

# A whole string literal (escapes included, so `"\""` and `"["` are skipped),
# or one bracket. An unterminated string is matched up to the end: what
# follows it cannot be valid JSON anyway, and json.loads says so.
_TOKENS: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\Z)|[\[\]{}]', re.DOTALL)
_OPENERS: Final = frozenset("[{")


def depth(text: str) -> int:
    """The deepest nesting of arrays and objects in `text` (0 for a scalar);
    brackets inside strings do not count. Unbalanced input is measured as far
    as it goes."""
    level = deepest = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in _OPENERS:
            level += 1
            deepest = max(deepest, level)
        elif token in "]}" and len(token) == 1:
            level -= 1
    return deepest


def _exceeds(text: str, max_depth: int) -> bool:
    level = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if len(token) != 1 or token == '"':
            continue
        if token in _OPENERS:
            level += 1
            if level > max_depth:
                return True
        else:
            level -= 1
    return False


def loads(text: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads`, but input nested deeper than `max_depth` levels raises
    ValueError("JSON nested deeper than N levels") before it is parsed.
    Bytes are decoded as json.loads decodes them (UTF-8, -16 or -32); bytes
    that are none of these raise UnicodeDecodeError, a ValueError."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode(json.detect_encoding(text), "surrogatepass")
    if _exceeds(text, max_depth):
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return json.loads(text)
