"""The daemon's state file: the operator's wishes and each service's active
backend (the schema is :mod:`natfail.core.saved`), written atomically."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from natfail.core import saved
from natfail.core.controller import ServiceState
from natfail.io.statefile import read_or_none, write_atomic

log = logging.getLogger("natfail")


class StateFile:
    """The daemon's state file (its schema is :mod:`natfail.core.saved`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        """The saved services by name; {} (and a warning) when unreadable."""
        try:
            return saved.load(read_or_none(self.path) or b"")
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.path, exc)
            return {}

    def save(self, states: Iterable[ServiceState]) -> str | None:
        """Writes the states' wishes; the reason when that failed (logged), else None."""
        try:
            write_atomic(self.path, saved.dump(states))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            log.error("cannot write state file %s: %s", self.path, reason)
            return reason
        return None
