"""One TOML table under validation: typed getters that raise
:class:`~natfail.config.problems.Invalid` with the exact key path, so every
rule in :mod:`natfail.config.schema` reads as one line."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final, TypeVar

from natfail.config.problems import Invalid, Where
from natfail.core.model import kind, show

_MISSING: Final = object()
_L = TypeVar("_L", bound=str)


def _unknown_key(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"unknown key {show(key)} (did you mean {close[0]!r}?)"
    return f"unknown key {show(key)} (known keys: {', '.join(known)})"


def _show_number(value: float) -> str:
    # str() of a huge int raises ValueError past 4300 digits; keep it short.
    if isinstance(value, int) and value.bit_length() > 64:
        return "a number that large"
    return repr(value)


class Table:
    """One TOML table under validation: typed getters that raise Invalid
    with the exact key path."""

    __slots__ = ("base_dir", "data", "where")

    def __init__(self, value: object, where: Where, known: Sequence[str], base_dir: Path) -> None:
        if not isinstance(value, Mapping):
            raise Invalid(where, f"must be a table, not {kind(value)}")
        for key in value:
            if key not in known:
                raise Invalid((*where, str(key)), _unknown_key(str(key), known))
        self.data: Mapping[object, object] = value
        self.where = where
        self.base_dir = base_dir

    def at(self, key: str) -> Where:
        return (*self.where, key)

    def raw(self, key: str) -> object:
        return self.data.get(key, _MISSING)

    def invalid(self, key: str, message: str) -> Invalid:
        return Invalid(self.at(key), message)

    def text(self, key: str, default: str | None) -> str:
        """A string; default None means the key is required."""
        value = self.raw(key)
        if value is _MISSING:
            if default is None:
                raise self.invalid(key, "missing (required)")
            return default
        if not isinstance(value, str):
            raise self.invalid(key, f"must be a string, not {kind(value)}")
        return value

    def integer(self, key: str, default: int | None, low: int, high: int | None = None) -> int:
        value = self.raw(key)
        if value is _MISSING:
            if default is None:
                raise self.invalid(key, "missing (required)")
            return default
        # bool is an int subclass in Python, but `rise = true` is a mistake.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.invalid(key, f"must be an integer, not {kind(value)}")
        if value < low or (high is not None and value > high):
            wanted = f">= {low}" if high is None else f"between {low} and {high}"
            raise self.invalid(key, f"must be {wanted}, got {_show_number(value)}")
        return value

    def seconds(self, key: str, default: float, *, allow_zero: bool) -> float:
        """A duration in seconds: an integer or a float, finite."""
        value = self.raw(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.invalid(key, f"must be a number of seconds, not {kind(value)}")
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds):
            raise self.invalid(key, "must be a finite number of seconds")
        if seconds < 0 or (seconds == 0 and not allow_zero):
            wanted = ">= 0" if allow_zero else "> 0"
            raise self.invalid(key, f"must be {wanted}, got {_show_number(value)}")
        return seconds

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise self.invalid(key, f"must be true or false, got {show(str(value))}")
        return value

    def choice(self, key: str, choices: tuple[_L, ...], default: _L) -> _L:
        value = self.text(key, default)
        for choice in choices:
            if value == choice:
                return choice
        allowed = ", ".join(repr(c) for c in choices)
        raise self.invalid(key, f"must be one of {allowed}, got {show(value)}")

    def path(self, key: str, default: Path) -> Path:
        value = self.optional_path(key, default)
        if value is None:
            raise self.invalid(key, "must not be empty")
        return value

    def optional_path(self, key: str, default: Path | None) -> Path | None:
        """A file path; "" means none. Relative paths are taken from the
        directory of the config file."""
        value = self.raw(key)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            raise self.invalid(key, f"must be a string (a path), not {kind(value)}")
        if not value:
            return None
        if "\0" in value:
            raise self.invalid(key, "must not contain a NUL character")
        path = Path(value)
        return path if path.is_absolute() else self.base_dir / path

    def sub(self, key: str, known: Sequence[str]) -> Table | None:
        value = self.raw(key)
        if value is _MISSING:
            return None
        return Table(value, self.at(key), known, self.base_dir)

    def tables(self, key: str, header: str, known: Sequence[str]) -> list[Table]:
        """An array of tables (``[[header]]``); at least one is required."""
        value = self.raw(key)
        if value is _MISSING or (isinstance(value, (list, tuple)) and not value):
            raise self.invalid(key, f"at least one {header} is required")
        if not isinstance(value, (list, tuple)):
            raise self.invalid(key, f"must be an array of tables ({header}), not {kind(value)}")
        return [
            Table(item, (*self.at(key), index), known, self.base_dir)
            for index, item in enumerate(value)
        ]
