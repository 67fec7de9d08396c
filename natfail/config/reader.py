"""TOML → the model: the entry points that read a config file, parse it and
validate it, raising :class:`~natfail.config.problems.ConfigError`."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has no tomllib
    import tomli as tomllib

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
from natfail.config.schema import build, daemon_settings
from natfail.core.model import Config, DaemonSettings

DEFAULT_PATH: Final = Path("/etc/natfail/natfail.toml")
# Far more than 1000 services need (about 300 bytes each), far less than hurts.
CONFIG_FILE_LIMIT: Final = 4 * 1024 * 1024

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


_DAEMON_HEADER: Final = re.compile(r"\[\s*daemon\s*\]\s*(?:#.*)?")


def daemon_fragment(text: str) -> str | None:
    """The lines of the [daemon] table, when they alone define it: at most one
    [daemon] header, no multi-line string, and "daemon" nowhere else but in
    full-line comments (so no dotted key, inline table or other header adds
    to it). None when that cannot be told without parsing the whole file."""
    if '"""' in text or "'''" in text:
        return None
    inside, headers, kept = False, 0, []
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith("#"):
            continue
        if stripped.startswith("["):
            inside = bool(_DAEMON_HEADER.fullmatch(stripped))
            if inside:
                headers += 1
            elif "daemon" in stripped:
                return None
            continue
        if inside:
            kept.append(line)
        elif "daemon" in line:
            return None
    return "\n".join(kept) if headers <= 1 else None


def read_daemon(path: Path | str = DEFAULT_PATH) -> DaemonSettings | None:
    """The [daemon] settings of a config file without parsing its services (a
    thousand services take a tenth of a second to parse, and natfailctl only
    wants the socket). None when the file's shape or a mistake in the table
    asks for the whole file to be read (``load``); ConfigError when unreadable."""
    path = Path(path)
    text = read_config_file(path).decode("utf-8-sig", errors="replace")
    fragment = daemon_fragment(text)
    if fragment is None:
        return None
    try:
        return daemon_settings({"daemon": tomllib.loads(fragment)}, path)
    except (ValueError, RecursionError, Invalid):
        return None


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
