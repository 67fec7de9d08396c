"""natfail.io.fdlimit: the soft open file limit raised to the hard one."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

from natfail.io import fdlimit

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = """
import resource, sys
from natfail.io import fdlimit
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))
print(fdlimit.raise_nofile_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))
print(fdlimit.raise_nofile_limit())
"""


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    # In a child: the limit is the process's own.
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={"PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.split() == ["4096", "4096", "4096", "4096"]


def test_a_refused_raise_keeps_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def refuse(which: int, limits: tuple[int, int]) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (64, max(hard, 65)))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert fdlimit.raise_nofile_limit() == 64


def test_what_backends_need() -> None:
    assert fdlimit.needed(3000) == 3000 + fdlimit.RESERVED
    # The unit's LimitNOFILE= covers the design scale.
    unit = (REPO / "systemd" / "natfail.service").read_text()
    [line] = [x for x in unit.splitlines() if x.startswith("LimitNOFILE=")]
    assert int(line.split("=", 1)[1]) >= fdlimit.needed(3000)
