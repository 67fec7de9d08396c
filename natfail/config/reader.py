"""TOML → the model: the entry points that read a config file, parse it and
validate it, raising :class:`~natfail.config.problems.ConfigError`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from natfail.config.files import Unreadable, read_regular
from natfail.config.lines import line_finder
from natfail.config.problems import (
    ConfigError,
    Invalid,
    InvalidAll,
    Problem,
    escape_unprintable,
    render,
)
from natfail.config.schema import build
from natfail.core.model import Config
from natfail.locations import CONFIG_FILE_LIMIT, DEFAULT_CONFIG
from natfail.tomlshim import tomllib

DEFAULT_PATH: Final = DEFAULT_CONFIG

_AT_RE: Final = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _syntax_error(path: Path, exc: Exception, text: str) -> ConfigError:
    message = str(exc)
    found = _AT_RE.search(message)
    if found is None:
        if message.endswith(" (at end of document)"):
            message = message.removesuffix(" (at end of document)")
            last_line = text.rstrip("\n").count("\n") + 1
            return ConfigError(path, "", f"TOML syntax error at the end: {message}", last_line)
        return ConfigError(path, "", f"TOML syntax error: {message}")
    message = message[: found.start()]
    line, column = int(found.group(1)), int(found.group(2))
    return ConfigError(path, "", f"TOML syntax error at column {column}: {message}", line)


def from_mapping(data: Mapping[str, object], path: Path | str, *, source: str = "") -> Config:
    """Validate an already parsed document. `path` is used in messages and as
    the base of relative paths; `source`, when given, supplies line numbers."""
    path = Path(path)
    try:
        return build(data, path)
    except Invalid as exc:
        found = exc.found if isinstance(exc, InvalidAll) else (exc,)
        line_of = line_finder(source)
        problems = tuple(Problem(path, render(p.where), p.message, line_of(p.where)) for p in found)
        error = ConfigError.from_problem(problems[0])
        error.problems = problems
        raise error from None


def parse(text: str, path: Path | str) -> Config:
    """Parse and validate the text of a config file; raises ConfigError."""
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(path, exc, text) from None
    except RecursionError:
        raise ConfigError(path, "", "TOML syntax error: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(path, "", f"TOML value error: {exc}") from None
    return from_mapping(data, path, source=text)


def load(path: Path | str = DEFAULT_PATH) -> Config:
    """Read, parse and validate a config file; raises ConfigError."""
    path = Path(path)
    raw = read_config_file(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(path, "", "is not valid UTF-8", line) from None
    return parse(text, path)


def read_raw(path: Path | str) -> dict[str, Any]:
    """The TOML document of a config file, unvalidated (for a tool that must find the
    socket in a config with mistakes elsewhere); ConfigError when unreadable."""
    path = Path(path)
    text = read_config_file(path).decode("utf-8-sig", errors="replace")
    try:
        return tomllib.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ConfigError(path, "", f"TOML syntax error: {escape_unprintable(str(exc))}") from None


def read_config_file(path: Path) -> bytes:
    """The bytes of the config file, read as the key files are (`read_regular`),
    at most CONFIG_FILE_LIMIT; ConfigError naming the file otherwise."""
    try:
        return read_regular(path, CONFIG_FILE_LIMIT)
    except Unreadable as exc:
        if exc.kind == "type":
            reason = "it is not a regular file"
        elif exc.kind == "size":
            reason = f"it is larger than {CONFIG_FILE_LIMIT // 1024 // 1024} MiB"
        else:
            reason = exc.detail
        raise ConfigError(path, "", f"cannot read the config file: {reason}") from None
