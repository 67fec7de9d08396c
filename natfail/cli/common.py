"""What both programs share: an argument parser that keeps the exit codes of
the contract, and a guard that turns any escape into one line on stderr."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from natfail import exitcodes


class UsageError(Exception):
    """Bad usage or bad input detected after argument parsing (exit 2)."""


class Refused(Exception):
    """The operation was refused or failed (exit 1)."""


class Unreachable(Exception):
    """The daemon could not be reached (exit 3)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse already exits 2 on usage errors; this keeps its message to one
    line (no usage dump) so scripts and the journal get a single clear line.
    Every program has ``--version``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        from natfail import __version__

        self.add_argument("--version", action="version", version=f"%(prog)s {__version__}")

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(exitcodes.USAGE)


def fail(prog: str, message: str, code: int) -> int:
    sys.stderr.write(f"{prog}: {message}\n")
    return code


def guarded(prog: str, body: Callable[[], int]) -> int:
    """Run `body`; map our own exceptions to exit codes and anything
    unexpected to exit 1 with one line, never a traceback."""
    try:
        return body()
    except UsageError as exc:
        return fail(prog, str(exc), exitcodes.USAGE)
    except Refused as exc:
        return fail(prog, str(exc), exitcodes.FAILED)
    except Unreachable as exc:
        return fail(prog, str(exc), exitcodes.UNREACHABLE)
    except KeyboardInterrupt:
        return fail(prog, "interrupted", exitcodes.FAILED)
    except BrokenPipeError:
        return exitcodes.FAILED
    except Exception as exc:  # the promise is: no traceback ever reaches a user
        return fail(prog, f"internal error: {type(exc).__name__}: {exc}", exitcodes.FAILED)
