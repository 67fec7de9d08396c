"""What a lab leaves on the machine, and removing what dead labs left behind.

Before anything else of a lab exists, its owner writes a marker file under
/run/natfail-lab/ (its pid and start time, its namespaces, interfaces and
paths), and removes it after everything else: a lab whose owner is gone is
dead, and so is anything named like a lab that has no marker."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from natfail.lab.processes import LabError, kill_pids, ns_pids, proc_starttime, run
from natfail.lab.wireguard import WG_RUN_DIR, remove_sockets, wg_pids

log = logging.getLogger("natfail.lab")

MARKER_DIR: Final = Path("/run/natfail-lab")

_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789"
ID_LEN: Final = 6
_WG_SOCK_RE: Final = re.compile(rf"^w[cbx]([a-z0-9]{{{ID_LEN}}})\d*\.sock$")


def netns_list() -> list[str]:
    try:
        cp = run(["ip", "netns", "list"], check=False, timeout=5.0)
    except LabError:
        return []
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def destroy(namespaces: Sequence[str], ifnames: set[str], paths: Sequence[Path]) -> None:
    """Kills, unlinks and deletes everything given; logs problems, never raises."""
    try:
        pids = set(wg_pids(ifnames))
        for ns in namespaces:
            pids.update(ns_pids(ns))
        kill_pids(sorted(pids))
    except Exception as e:
        log.warning("lab cleanup: killing processes: %s", e)
    remove_sockets(ifnames)
    existing = set(netns_list())
    for ns in namespaces:
        if ns in existing:
            try:
                run(["ip", "netns", "del", ns], timeout=5.0)
            except Exception as e:
                log.warning("lab cleanup: %s", e)
    for path in paths:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        except Exception as e:
            log.warning("lab cleanup: removing %s: %s", path, e)


def marker_path(lab_id: str) -> Path:
    return MARKER_DIR / f"{lab_id}.json"


def write_marker(
    lab_id: str, prefix: str, namespaces: Sequence[str], ifnames: set[str], paths: Sequence[Path]
) -> None:
    MARKER_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    data = {
        "id": lab_id,
        "prefix": prefix,
        "pid": os.getpid(),
        "starttime": proc_starttime(os.getpid()),
        "namespaces": list(namespaces),
        "ifnames": sorted(ifnames),
        "paths": [str(p) for p in paths],
        "created": time.time(),
    }
    tmp = MARKER_DIR / f".{lab_id}.tmp"
    tmp.write_text(json.dumps(data))
    tmp.replace(marker_path(lab_id))


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def marker_alive(data: dict[str, Any]) -> bool:
    pid = data.get("pid")
    return isinstance(pid, int) and proc_starttime(pid) == data.get("starttime")


def list_str(data: dict[str, Any], key: str) -> list[str]:
    value = data.get(key)
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def tmpdirs_of(lab_id: str) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"natfail-lab-{lab_id}-*"))


def new_id() -> str:
    """A lab id no marker and no temp dir uses."""
    while True:
        lab_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LEN))
        if not marker_path(lab_id).exists() and not tmpdirs_of(lab_id):
            return lab_id


def cleanup_stale(prefix: str = "nf") -> list[str]:
    """Removes what dead labs left behind; returns the ids of the labs it cleaned.

    A lab is dead when the process that built it (pid and start time in its
    marker file under /run/natfail-lab/) is gone. Namespaces named
    ``<prefix><id>-...`` and wireguard-go sockets ``wc<id>``/``wb<id>N`` whose lab
    has no marker at all are leftovers too. Labs of live processes are never
    touched. Never raises.
    """
    cleaned: list[str] = []
    try:
        ns_re = re.compile(rf"^{re.escape(prefix)}([a-z0-9]{{{ID_LEN}}})-(?:gw|cl|b\d+)$")
        markers = sorted(MARKER_DIR.glob("*.json")) if MARKER_DIR.is_dir() else []
        for path in markers:
            data = read_marker(path)
            if data is None or marker_alive(data):
                continue
            if data.get("prefix") != prefix:
                continue
            lab_id = path.stem
            namespaces = list_str(data, "namespaces")
            paths = [Path(p) for p in list_str(data, "paths")] + tmpdirs_of(lab_id)
            destroy(namespaces, set(list_str(data, "ifnames")), [*paths, path])
            cleaned.append(lab_id)

        # Leftovers without a marker: a marker is written before anything else of a
        # lab exists and removed after everything else, so "no marker" means dead.
        orphans: dict[str, tuple[list[str], set[str]]] = {}
        for ns in netns_list():
            m = ns_re.match(ns)
            if m:
                orphans.setdefault(m.group(1), ([], set()))[0].append(ns)
        if WG_RUN_DIR.is_dir():
            for sock in WG_RUN_DIR.iterdir():
                m = _WG_SOCK_RE.match(sock.name)
                if m:
                    orphans.setdefault(m.group(1), ([], set()))[1].add(sock.name[: -len(".sock")])
        for lab_id, (namespaces, ifnames) in sorted(orphans.items()):
            if marker_path(lab_id).exists():
                continue
            destroy(namespaces, ifnames, tmpdirs_of(lab_id))
            if lab_id not in cleaned:
                cleaned.append(lab_id)
    except Exception as e:
        log.warning("lab cleanup_stale: %s", e)
    return cleaned
