"""Reading a config for a reload in a child process.

Parsing a thousand services is 0.4 s of pure Python (tomllib most of it). In
a thread of the daemon it would wait for the interpreter lock behind the
busy probe loop, and on the loop it would stall the probes; in a child it
runs on another core. The child returns the checked config and the raw
bytes of every key file it names; no file is opened by the daemon's loop."""

from __future__ import annotations

from pathlib import Path

from natfail.config.checks import check_files
from natfail.config.keys import load_key_file
from natfail.config.problems import ConfigError
from natfail.config.reader import load
from natfail.core.model import Config, DaemonSettings


def read_checked(path: Path, daemon: DaemonSettings) -> tuple[Config, dict[Path, bytes]]:
    """The config at ``path``, checked as the daemon needs it, and its key
    files' contents by path; ConfigError (or KeyFileError) when unusable."""
    new = load(path)
    problems = check_files(new)
    if problems:
        raise problems[0].error()
    if new.daemon != daemon:
        raise ConfigError(
            path,
            "daemon",
            "[daemon] settings change only with a restart (systemctl restart natfail)",
        )
    files: dict[Path, bytes] = {}
    for service in new.services:
        for file in (service.probe.private_key_file, service.preshared_key_file):
            if file is not None and file not in files:
                files[file] = load_key_file(file)
    return new, files
