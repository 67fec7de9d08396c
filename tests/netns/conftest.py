"""Fixtures for the namespace tests: each test module gets its own lab.

A module that wants another lab overrides ``lab_options``::

    @pytest.fixture(scope="module")
    def lab_options() -> dict[str, Any]:
        return {"backends": 3, "preshared_key": True}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from natfail.lab import Lab, LabBackend


@pytest.fixture(scope="module")
def lab_options() -> dict[str, Any]:
    """Keyword arguments for the module's :class:`Lab`."""
    return {}


@pytest.fixture(scope="module")
def lab(lab_options: dict[str, Any]) -> Iterator[Lab]:
    """A lab for the whole test module, torn down after it even when tests fail."""
    with Lab(**lab_options) as the_lab:
        yield the_lab


def set_static_dnat(lab: Lab, v4: LabBackend | None, v6: LabBackend | None = None) -> None:
    """The lab's fixed DNAT (not natfail): public:51820 -> the given backend(s)."""
    lab.set_static_dnat(v4, v6)


def clear_static_dnat(lab: Lab) -> None:
    set_static_dnat(lab, None, None)


StaticDnat = Callable[[Lab, "LabBackend | None", "LabBackend | None"], None]


@pytest.fixture
def static_dnat() -> StaticDnat:
    """:func:`set_static_dnat` as a fixture: ``static_dnat(lab, backend_v4, backend_v6)``."""
    return set_static_dnat


@pytest.fixture
def fresh(lab: Lab) -> Iterator[Lab]:
    """The module's lab with every backend running, fresh WireGuard sessions, an empty
    conntrack table and no static DNAT; the DNAT and conntrack are cleared after, too."""
    clear_static_dnat(lab)
    lab.flush_conntrack()
    lab.reset_sessions()
    for backend in lab.backends:
        if not backend.running:
            backend.start()
    yield lab
    if not lab.closed:
        clear_static_dnat(lab)
        lab.flush_conntrack()
