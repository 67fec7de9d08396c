"""The control socket's commands, named once for the daemon, the control
server and natfailctl."""

from typing import Final

# Operator commands: change a service's pin or drained set.
OPERATOR: Final = ("switch", "release", "drain", "undrain")
# Of those, the ones that name a backend.
WITH_BACKEND: Final = ("switch", "drain", "undrain")
# One probe run by the daemon with its own transport, clock and keys, for
# `natfailctl probe` while a daemon runs (natfail.io.probe_request). Root
# only: it sends from the daemon's probe identity to any address.
PROBE: Final = "probe"
# What a member of the socket's group may run; root may run every command.
READ_ONLY: Final = frozenset({"status", "ping", "events"})
# natfailctl's commands that talk to the daemon through natfail.cli.daemon_cmds
# (`probe` talks to it from natfail.cli.probe_cmds, when one runs).
DAEMON: Final = ("status", "events", *OPERATOR, "reload")
