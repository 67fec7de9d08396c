"""natfailctl's side of the control socket: one line of JSON out, one back."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from typing import Any

from natfail import exitcodes
from natfail.cli.common import Refused, Unreachable, UsageError

TIMEOUT = 10.0
MAX_REPLY = 4 * 1024 * 1024


def call(path: Path, request: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
    """Send `request`; return the reply of a successful one. A refusal raises
    Refused or UsageError with the daemon's message."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise Unreachable(f"daemon unreachable: no socket at {path}") from None
        except ConnectionRefusedError:
            raise Unreachable(f"daemon unreachable: nothing listens on {path}") from None
        except PermissionError:
            raise Refused(f"{path}: permission denied") from None
        except OSError as exc:
            raise Unreachable(f"daemon unreachable at {path}: {exc.strerror}") from None
        try:
            # A daemon with no room for us answers at once and closes before
            # reading: its refusal is still ours to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n") and len(data) < MAX_REPLY:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise Unreachable(f"daemon at {path} did not answer in {timeout:g} s") from None
        except OSError as exc:
            raise Unreachable(f"daemon at {path}: {exc.strerror}") from None
    finally:
        sock.close()
    if not data:
        raise Refused(f"the daemon at {path} closed the connection (not authorized?)")
    try:
        reply = json.loads(data)
    except ValueError:
        raise Refused(f"the daemon at {path} sent an unreadable reply") from None
    if not isinstance(reply, dict):
        raise Refused(f"the daemon at {path} sent an unreadable reply")
    if not reply.get("ok"):
        message = str(reply.get("error", "refused"))
        if reply.get("code") == exitcodes.USAGE:
            raise UsageError(message)
        raise Refused(message)
    return reply
