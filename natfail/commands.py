"""The control socket's commands, named once for the daemon, the control
server and natfailctl."""

from typing import Final

# Operator commands: change a service's pin or drained set.
OPERATOR: Final = ("switch", "release", "drain", "undrain")
# Of those, the ones that name a backend.
WITH_BACKEND: Final = ("switch", "drain", "undrain")
# What a member of the socket's group may run; root may run every command.
READ_ONLY: Final = frozenset({"status", "ping", "events"})
# natfailctl's commands that talk to the daemon.
DAEMON: Final = ("status", "events", *OPERATOR, "reload")
