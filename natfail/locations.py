"""Where natfail's files are unless the config says otherwise, and how large
the config may be. Light on purpose: natfailctl reads these before anything
else is imported."""

from __future__ import annotations

from pathlib import Path
from typing import Final

DEFAULT_CONFIG: Final = Path("/etc/natfail/natfail.toml")
DEFAULT_SOCKET: Final = Path("/run/natfail/natfail.sock")
UNIX_PATH_MAX: Final = 107  # sun_path is 108 bytes, including the NUL
CONFIG_FILE_LIMIT: Final = 4 * 1024 * 1024
"""Far more than 1000 services need (about 300 bytes each), far less than hurts."""
