"""natfailctl's way to the daemon: ``daemon.socket`` of the config file, read
from its [daemon] table alone when the file's shape allows it.

Importing the config package and validating a thousand services took
natfailctl 150 ms before it even asked the daemon anything; the table alone
takes a few. When the file's shape or the value leaves any doubt, the answer
is None and the caller reads the whole file (``natfail.config.load``), which
also says what is wrong."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Final

from natfail.locations import CONFIG_FILE_LIMIT, DEFAULT_SOCKET, UNIX_PATH_MAX
from natfail.regular_file import Unreadable, read_regular
from natfail.tomlshim import tomllib

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


def socket_in(path: Path) -> Path | None:
    """``daemon.socket`` of the config file at ``path`` (relative to its
    directory), the default socket when the table does not set it; None when
    the whole file must be read to tell."""
    try:
        fragment = daemon_fragment(read_regular(path, CONFIG_FILE_LIMIT).decode("utf-8-sig"))
        if fragment is None:
            return None
        value = tomllib.loads(fragment).get("socket")
    except (Unreadable, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return socket_value(value, path)


def socket_value(value: object, config: Path) -> Path | None:
    """The socket a ``daemon.socket`` value names (None: not set, the default),
    relative to the config file's directory; None when it names none."""
    if value is None:
        return DEFAULT_SOCKET
    if not isinstance(value, str) or not value or "\0" in value:
        return None
    socket = Path(value)
    if not socket.is_absolute():
        socket = Path(os.path.abspath(config)).parent / socket
    if len(str(socket).encode("utf-8", "surrogatepass")) > UNIX_PATH_MAX:
        return None
    return socket
