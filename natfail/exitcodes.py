"""Exit codes of both programs, as README.adoc's "Exit codes" gives them."""

from typing import Final

OK: Final = 0
FAILED: Final = 1  # the operation was refused or failed
USAGE: Final = 2  # bad usage or bad config
UNREACHABLE: Final = 3  # the daemon could not be reached

# `natfailctl status --check`, for monitoring systems (Nagios plugin codes,
# which the ones above already agree with: 3 is "unknown").
CHECK_WARNING: Final = 1  # a backend not up, or a warning
CHECK_CRITICAL: Final = 2  # a service without a healthy backend
