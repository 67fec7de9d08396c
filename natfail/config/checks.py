"""What the daemon will need on disk beyond the config itself: the key files
it names and its notify hooks, each wrong one a
:class:`~natfail.config.problems.Problem`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from natfail.config.files import foreign_owner, os_reason
from natfail.config.keys import KeyFileError, load_key_file
from natfail.config.problems import Problem, Where, render
from natfail.core.model import Config


def _executable_problem(path: Path) -> str | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return "does not exist"
    except (OSError, ValueError) as exc:
        return f"cannot be inspected: {os_reason(exc)}"
    mode = info.st_mode
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if mode & 0o022:
        return (
            f"permissions {stat.S_IMODE(mode):04o} let group or others change it, and it "
            "runs with natfail's privileges (chmod go-w)"
        )
    owner = foreign_owner(info.st_uid, "a notify hook")
    if owner is not None:
        return owner
    if not os.access(path, os.X_OK):
        return "is not executable"
    return None


def check_files(config: Config) -> list[Problem]:
    """What the daemon will need on disk, one Problem per file that will not do,
    naming the config file, the key path and the file: probe private keys (the [probe]
    default when some service uses it, and each [service.probe] override),
    preshared keys, and notify executables. Never contains key material."""
    problems: list[Problem] = []

    def report(where: Where, file: Path, reason: str) -> None:
        problems.append(Problem(config.path, render(where), reason, file=file))

    key_files: list[tuple[Where, Path]] = []
    default_key = config.probe.private_key_file
    if any(s.probe.private_key_file == default_key for s in config.services):
        key_files.append((("probe", "private_key_file"), default_key))
    seen = {default_key}
    for index, service in enumerate(config.services):
        own_key = service.probe.private_key_file
        if own_key not in seen:
            seen.add(own_key)
            key_files.append((("service", index, "probe", "private_key_file"), own_key))
        if service.preshared_key_file is not None:
            key_files.append((("service", index, "preshared_key_file"), service.preshared_key_file))

    for where, file in key_files:
        try:
            load_key_file(file)
        except KeyFileError as exc:
            report(where, file, exc.reason)

    for index, service in enumerate(config.services):
        if service.notify is not None:
            reason = _executable_problem(service.notify)
            if reason is not None:
                report(("service", index, "notify"), service.notify, reason)
    return problems


def warnings(config: Config) -> list[str]:
    """What is valid but will not do what the operator likely wants, one line each."""
    out: list[str] = []
    for index, service in enumerate(config.services):
        if service.source_nat == "masquerade" and any(b.agent for b in service.backends):
            out.append(
                f'{config.path}: service[{index}] ({service.name}): source_nat = "masquerade" '
                "shows the backends the gateway, not the clients, so their agents cannot "
                'bring clients over (hitless failover needs "preserve")'
            )
    return out
