"""The schema of the state file: the operator's wishes (pins, drains) and
the active backend of each service, kept across restarts.

Pure: bytes in, bytes out; the daemon reads and writes the file."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from natfail import jsonlimit
from natfail.core import selector as sel
from natfail.core.controller import ServiceState
from natfail.core.model import Service

STATE_FILE = "state.json"
VERSION = 1


@dataclass(frozen=True)
class Wishes:
    pin: sel.Pin | None = None
    drained: frozenset[str] = frozenset()
    epoch: int = 0


def dump(states: Iterable[ServiceState]) -> bytes:
    services: dict[str, Any] = {}
    for state in states:
        pin = {"backend": state.pin.backend, "armed": state.pin.armed} if state.pin else None
        services[state.name] = {
            "pin": pin,
            "drained": sorted(state.drained),
            "active": state.active,
            "epoch": state.epoch,
        }
    return json.dumps({"version": VERSION, "services": services}, indent=1).encode()


def load(raw: bytes) -> dict[str, Any]:
    """The saved services by name; ValueError when the file is unreadable."""
    try:
        data = jsonlimit.loads(raw) if raw else {}
    except RecursionError:
        raise ValueError("nested too deeply") from None
    services = data.get("services") if isinstance(data, dict) else None
    return services if isinstance(services, dict) else {}


def wishes(saved: Any, service: Service) -> Wishes:
    """What the operator wanted for ``service``, pruned to its backends."""
    if not isinstance(saved, dict):
        return Wishes()
    names = {b.name for b in service.backends}
    drained_raw = saved.get("drained")
    drained = (
        frozenset(d for d in drained_raw if d in names)
        if isinstance(drained_raw, list)
        else frozenset()
    )
    pin_raw = saved.get("pin")
    pin = None
    if isinstance(pin_raw, dict) and pin_raw.get("backend") in names:
        pin = sel.Pin(str(pin_raw["backend"]), bool(pin_raw.get("armed", True)))
    raw_epoch = saved.get("epoch")
    epoch = 0
    if isinstance(raw_epoch, int) and not isinstance(raw_epoch, bool) and 0 <= raw_epoch < 2**64:
        epoch = raw_epoch
    return Wishes(pin, drained, epoch)
