"""Exit codes of both programs, as README.adoc's "Exit codes" gives them."""

from typing import Final

OK: Final = 0
FAILED: Final = 1  # the operation was refused or failed
USAGE: Final = 2  # bad usage or bad config
UNREACHABLE: Final = 3  # the daemon could not be reached
