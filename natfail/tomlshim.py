"""tomllib (Python 3.11 and later), or the tomli it came from on 3.10."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has no tomllib
    import tomli as tomllib

__all__ = ["tomllib"]
