"""Where natfail's files are unless the config says otherwise. Light on
purpose: natfailctl reads these before anything else is imported."""

from __future__ import annotations

from pathlib import Path
from typing import Final

DEFAULT_CONFIG: Final = Path("/etc/natfail/natfail.toml")
DEFAULT_SOCKET: Final = Path("/run/natfail/natfail.sock")
UNIX_PATH_MAX: Final = 107  # sun_path is 108 bytes, including the NUL
