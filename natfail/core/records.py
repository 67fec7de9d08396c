"""Switch records: one per change of a service's active backend.

Pure: the daemon builds a record after each swap and its cleanup, logs its
one line and keeps the last ones in a :class:`SwitchLog`, which
`natfailctl events` reads. Tests, the demo and the benchmarks read the same
records instead of parsing free-form log text."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final

KEPT: Final = 1000
"""How many records a daemon keeps for `natfailctl events`."""


@dataclass(frozen=True, slots=True)
class SwitchRecord:
    service: str
    previous: str | None  # None: the service's first choice
    active: str
    reason: str
    at: float  # Unix time of the swap
    swap_ms: float  # the firewall transaction
    cleanup_ms: float  # the conntrack cleanup after it

    def line(self) -> str:
        """One log line of key=value fields (names and reasons have no spaces)."""
        return (
            f"switch service={self.service} from={self.previous or '-'} to={self.active} "
            f"reason={self.reason} swap_ms={self.swap_ms:.2f} cleanup_ms={self.cleanup_ms:.2f}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "from": self.previous,
            "to": self.active,
            "reason": self.reason,
            "time": datetime.fromtimestamp(self.at, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "unix_time": round(self.at, 6),
            "swap_ms": round(self.swap_ms, 3),
            "cleanup_ms": round(self.cleanup_ms, 3),
        }


class SwitchLog:
    """The last KEPT records, oldest first."""

    def __init__(self, kept: int = KEPT) -> None:
        self._records: deque[SwitchRecord] = deque(maxlen=kept)

    def add(self, record: SwitchRecord) -> None:
        self._records.append(record)

    def last(self, count: int) -> list[SwitchRecord]:
        """The newest ``count`` records (fewer if there are fewer), oldest first."""
        if count <= 0:
            return []
        return list(self._records)[-count:]
