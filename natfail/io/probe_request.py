"""The daemon's side of `natfailctl probe`: one probe, run with the daemon's
own transport, clock and probe keys.

Why the daemon runs it: natfailctl alone would take the probe timestamp
file's lease and start above it, up to `timestamps.LEASE` seconds ahead of
the daemon's stamps; a backend would record that stamp and then drop the
daemon's own probes as replays until the daemon's clock caught up, and every
backend would look down. Run here, the probe takes its stamp from the
daemon's clock, its socket is the backend's own, and it waits its turn after
a probe of the daemon in flight to the same backend (so the daemon's next
probe of that backend may wait up to this probe's timeout).

The request (root only, like every command that is not read-only):

    {"command": "probe", "target": "10.0.0.2:51820",
     "server_public_key": "<base64>",      # optional with "service"
     "probe_public_key": "<base64>",       # which of the daemon's probe keys
     "preshared_key": "<base64>",          # optional: 32 zero bytes if absent
     "service": "wg0",                     # optional: that service's keys
     "timeout": 1.0}

The reply: `{"held": false}` when the daemon holds no probe key with that
public key (natfailctl then probes alone: its stamps cannot disturb the
daemon's), else `{"held": true, "result": {"up", "reason", "rtt_ms",
"invalid_replies", "detail", "local"}}`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from natfail import commands, exitcodes
from natfail import config as cfg
from natfail.core import noise
from natfail.io.control import RequestError
from natfail.io.probe_transport import ProbeResult, ProbeTransport

COMMAND: Final = commands.PROBE
MAX_TIMEOUT: Final = 5.0
"""A probe of a backend the daemon probes holds that backend's socket for
its timeout, and the daemon's own next probe of it waits as long."""
_FIELDS: Final = frozenset(
    {
        "command",
        "target",
        "server_public_key",
        "probe_public_key",
        "preshared_key",
        "service",
        "timeout",
    }
)


@dataclass(frozen=True, slots=True)
class KeyQuery:
    """Which probe identity a request asks for."""

    service: str | None
    probe_public_key: bytes | None
    server_public_key: bytes | None
    preshared_key: bytes | None


KeysFor = Callable[[KeyQuery], "noise.Keys | None"]
"""The keys to probe with; None when the daemon holds no such probe key.
Raises RequestError when the query cannot be answered (an unknown service)."""


def _text(request: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = request.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise RequestError(f"probe: {name!r} must be a string", exitcodes.USAGE)
    return value


def _key(request: dict[str, Any], name: str) -> bytes | None:
    text = _text(request, name)
    if text is None:
        return None
    try:
        return cfg.decode_key(text)
    except ValueError as exc:
        raise RequestError(f"probe: {name} {exc}", exitcodes.USAGE) from None


def _timeout(request: dict[str, Any]) -> float:
    value = request.get("timeout")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError("probe: 'timeout' must be a number of seconds", exitcodes.USAGE)
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise RequestError(
            f"probe: 'timeout' must be above 0 and at most {MAX_TIMEOUT:g} s", exitcodes.USAGE
        )
    return float(value)


def result_to_json(result: ProbeResult) -> dict[str, Any]:
    return {
        "up": result.up,
        "reason": result.reason,
        "rtt_ms": result.rtt_ms,
        "invalid_replies": result.invalid_replies,
        "detail": result.detail,
        "local": result.local,
    }


async def run_probe_request(
    request: dict[str, Any],
    transport: ProbeTransport,
    keys_for: KeysFor,
    targets: Callable[[], Iterable[cfg.Endpoint]] | None = None,
) -> dict[str, Any]:
    """Answer one "probe" request. `targets` (the backends the daemon probes)
    lets a probe of any other address close its socket afterwards, so that
    probes of ad hoc addresses do not pile up sockets until the next reload."""
    unknown = sorted(set(request) - _FIELDS)
    if unknown:
        raise RequestError(f"probe: unknown field {unknown[0][:64]!r}", exitcodes.USAGE)
    target_text = _text(request, "target", required=True)
    assert target_text is not None
    try:
        target = cfg.Endpoint.parse(target_text)
    except ValueError as exc:
        raise RequestError(f"probe: {target_text[:100]!r}: {exc}", exitcodes.USAGE) from None
    query = KeyQuery(
        service=_text(request, "service"),
        probe_public_key=_key(request, "probe_public_key"),
        server_public_key=_key(request, "server_public_key"),
        preshared_key=_key(request, "preshared_key"),
    )
    if query.service is None and query.server_public_key is None:
        raise RequestError("probe: 'server_public_key' or 'service' is required", exitcodes.USAGE)
    timeout = _timeout(request)
    keys = keys_for(query)
    if keys is None:
        return {"held": False}
    try:
        result = await transport.probe(keys, target, timeout)
    finally:
        if targets is not None:
            probed = set(targets())
            if target not in probed:
                transport.retain(probed)
    return {"held": True, "result": result_to_json(result)}


def held_keys(held: Callable[[], Iterable[tuple[str, noise.Keys]]]) -> KeysFor:
    """A KeysFor over the keys the daemon probes with, as (service name,
    Keys) pairs read at each request (they change on reload). A request
    naming a service gets that service's probe key, and its server key and
    preshared key unless it gives its own; one naming a probe public key
    gets the daemon's private key with that public key (None if none has
    it), with the server key and preshared key it gives."""

    def keys_for(query: KeyQuery) -> noise.Keys | None:
        pairs = list(held())
        if query.service is not None:
            base = next((k for name, k in pairs if name == query.service), None)
            if base is None:
                raise RequestError(
                    f"probe: unknown service {query.service[:100]!r}", exitcodes.USAGE
                )
            if query.probe_public_key not in (None, base.public_key):
                raise RequestError(
                    f"probe: service {query.service[:100]!r} probes with another probe key",
                    exitcodes.USAGE,
                )
            server = query.server_public_key or base.server_public_key
            own = server == base.server_public_key
            psk = query.preshared_key or (base.preshared_key if own else bytes(32))
        else:
            base = next((k for _, k in pairs if k.public_key == query.probe_public_key), None)
            if base is None:
                return None
            assert query.server_public_key is not None
            server, psk = query.server_public_key, query.preshared_key or bytes(32)
        try:
            return noise.Keys(base.private_key, server, psk)
        except ValueError as exc:
            raise RequestError(f"probe: server_public_key: {exc}", exitcodes.USAGE) from None

    return keys_for
