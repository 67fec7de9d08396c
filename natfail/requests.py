"""The control socket's requests, answered by the running daemon.

Reading requests (status, events, ping) are answered from memory. Operator
commands go to the service's controller (:func:`natfail.core.controller.command`)
under the daemon's lock, and are carried out like any other outcome: a
firewall that refuses the move leaves everything as it was."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from natfail import commands, exitcodes
from natfail.core import controller as ctl
from natfail.core.records import KEPT
from natfail.io import probe_request
from natfail.io.control import Peer, RequestError

if TYPE_CHECKING:
    from natfail.daemon import Daemon, ServiceRuntime

log = logging.getLogger("natfail")


class Requests:
    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon

    def handle_now(self, request: dict[str, Any], peer: Peer) -> dict[str, Any] | None:
        """The answer to a reading request, from memory; None for any other."""
        command = request["command"]
        if command == "status":
            return self._d.status()
        if command == "ping":
            return {"message": "pong"}
        if command == "events":
            return self._events(request)
        return None

    async def handle(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        answer = self.handle_now(request, peer)
        if answer is not None:
            return answer
        command = request["command"]
        if command == "reload":
            log.info("reload requested by uid %d", peer.uid)
            return {"message": await self._d.reload()}
        if command == commands.PROBE:
            d = self._d
            return await probe_request.run_probe_request(
                request,
                d.transport,
                probe_request.held_keys(lambda: ((n, rt.keys) for n, rt in d.services.items())),
                targets=lambda: (b.address for s in d.config.services for b in s.backends),
            )
        if command not in commands.OPERATOR:
            raise RequestError(f"unknown command {command!r}", exitcodes.USAGE)
        return await self._operator(command, request, peer)

    def _events(self, request: dict[str, Any]) -> dict[str, Any]:
        count = request.get("count", 20)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= KEPT:
            raise RequestError(f"count must be a whole number from 1 to {KEPT}", exitcodes.USAGE)
        return {"events": [r.to_json() for r in self._d.switches.last(count)]}

    def _service(self, request: dict[str, Any]) -> ServiceRuntime:
        name = request.get("service")
        rt = self._d.services.get(name) if isinstance(name, str) else None
        if rt is None:
            raise RequestError(f"no service {name!r} (services: {', '.join(self._d.services)})")
        return rt

    async def _operator(self, command: str, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        d = self._d
        # Under the lock: a reload running meanwhile cannot swap the service
        # out between the check of the request and the switch.
        async with d.lock:
            rt = self._service(request)
            wanted = ctl.Request(
                command,  # type: ignore[arg-type]  # one of commands.OPERATOR
                request.get("backend"),
                request.get("force", False),
            )
            result = ctl.command(rt.state, wanted, d.monotonic())
            if isinstance(result, ctl.Refused):
                raise RequestError(
                    result.message, exitcodes.USAGE if result.usage else exitcodes.FAILED
                )
            ok, unsaved = await d.executor.carry_out([(rt, result.outcome)])
            if not ok:
                log.error(
                    "%s: %s by uid %d refused: the firewall refused the change",
                    rt.service.name,
                    command,
                    peer.uid,
                )
                raise RequestError(
                    f"{rt.service.name}: the firewall refused the change, nothing changed; "
                    "see the log"
                )
            log.info("%s (uid %d)", result.message, peer.uid)
            if unsaved is not None:
                # In effect now, but an "ok" would be a lie about the restart.
                raise RequestError(
                    f"{result.message}, but the state file could not be written "
                    f"({unsaved}): this is lost when natfail restarts"
                )
        return {"message": result.message, "active": rt.active}
