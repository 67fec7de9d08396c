"""What can be wrong with a config, as values.

:class:`Problem` is one thing wrong: the config file, the key path
(``service[0].backend[1].address``), the line where it is known, the file the
key names when that file is what is wrong, and why. ``str()`` is the one line
users see; callers read the fields and never take the text apart.
:class:`ConfigError` raises one."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final


def escape_unprintable(text: str) -> str:
    """Escape anything that could break a message over lines (a newline in a
    file name or a key), so scripts and the journal always get one line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config. ``str()`` is
    ``CONFIG: KEY_PATH: [FILE: ]message (line N)``; the key path is empty for
    file-level problems and the line is left out when unknown."""

    path: Path  # the config file
    key: str
    message: str  # why; about `file` when there is one
    line: int | None = None
    file: Path | None = None  # a file the key names (a key file, a hook)

    @property
    def detail(self) -> str:
        """What follows the key path: the message, after the file it is about."""
        return f"{self.file}: {self.message}" if self.file is not None else self.message

    def __str__(self) -> str:
        parts = [str(self.path), self.key, self.detail]
        text = ": ".join(part for part in parts if part)
        if self.line is not None:
            text += f" (line {self.line})"
        return escape_unprintable(text)

    def error(self) -> ConfigError:
        return ConfigError.from_problem(self)


class ConfigError(Exception):
    """A config that cannot be used: one :class:`Problem`, kept as ``problem``.
    ``file`` is the config file and ``message`` what follows the key path."""

    def __init__(self, file: Path | str, key: str, message: str, line: int | None = None) -> None:
        super().__init__(file, key, message, line)
        self.file = Path(file)
        self.key = key
        self.message = message
        self.line = line
        self.problem = Problem(self.file, key, message, line)
        self.problems: tuple[Problem, ...] = (self.problem,)
        """Every problem found, the first one (``problem``) included."""

    @classmethod
    def from_problem(cls, problem: Problem) -> ConfigError:
        error = cls(problem.path, problem.key, problem.detail, problem.line)
        error.problem = problem
        return error

    def __str__(self) -> str:
        return str(self.problem)


# Inside the validator a problem is raised with its key path as a tuple
# (str for keys, int for array indices); the reader turns it into a
# ConfigError once, adding the file name and the line.
Where = tuple[str | int, ...]


class Invalid(Exception):
    def __init__(self, where: Where, message: str) -> None:
        super().__init__(where, message)
        self.where = where
        self.message = message


class InvalidAll(Invalid):
    """Several problems in one document, in file order; reads as the first."""

    def __init__(self, found: list[Invalid]) -> None:
        super().__init__(found[0].where, found[0].message)
        self.found = tuple(found)


_BARE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_-]+")


def render(where: Where) -> str:
    """('service', 0, 'backend', 1, 'address') → service[0].backend[1].address"""
    out = ""
    for part in where:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        key = part if _BARE_KEY_RE.fullmatch(part) else json.dumps(part)
        out = f"{out}.{key}" if out else key
    return out
