"""Reading a file without letting it hurt the reader: a FIFO, a device or a huge
file in its place must not hang it or exhaust its memory. Every config, key
and agent file goes through :func:`read_regular` (through
:mod:`natfail.config.files`), and natfailctl's look at ``[daemon] socket``
too; this module imports nothing of natfail's."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path


class Unreadable(Exception):
    """Why :func:`read_regular` gave up: ``kind`` is one of "missing", "denied",
    "open", "type", "vetted", "read" and "size"; ``detail`` says more."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail


def read_regular(
    path: Path,
    limit: int,
    vet: Callable[[os.stat_result], str | None] | None = None,
) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes. ``vet`` may refuse
    the file by its fstat (of the descriptor read, so the checked file is the
    read one)."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Unreadable("missing", "No such file or directory") from None
    except PermissionError:
        raise Unreadable("denied", "Permission denied") from None
    except (OSError, ValueError) as exc:
        raise Unreadable("open", os_reason(exc)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Unreadable("type")
        problem = vet(info) if vet is not None else None
        if problem is not None:
            raise Unreadable("vetted", problem)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # the file may grow while it is read
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise Unreadable("read", os_reason(exc)) from None
    finally:
        os.close(fd)
    if size > limit:
        raise Unreadable("size")
    return b"".join(chunks)


def os_reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
