"""The Debian package as an operator installs it (README "Installing on a
gateway"): `scripts/package` builds it, `apt-get install` installs it with
Debian's own python3-* packages, the installed programs work, the natfail user
and the probe key exist, the units are installed and neither enabled nor
started; the installed daemon, on Debian's libraries, fails over in the lab.
Afterwards the package is purged together with every package its installation
brought in, and whatever /etc/natfail or /var/lib/natfail held before is put
back, so the machine is left as it was.

It lives under tests/netns: it needs root (apt, dpkg) and the lab, and the
suite's policy applies (skips with the reason, a failure with CI=true)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from natfail import __version__
from natfail.lab import Lab, wait_until
from tests.netns.gateway import KINDS, Gateway

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "natfail"
USER = "natfail"
CONFIG = Path("/etc/natfail/natfail.toml")
KEY = Path("/etc/natfail/probe.key")
UNIT_DIR = Path("/lib/systemd/system")
UNITS = ("natfail.service", "natfail-agent.service")
# Where the operator's own files would be: moved aside for the test, put back after.
KEPT = (Path("/etc/natfail"), Path("/var/lib/natfail"))
# What a package build could leave in a tree (debhelper's and pybuild's files).
BUILD_LEFTOVER = re.compile(r"debian/|\.pybuild|\.egg-info|\.(deb|buildinfo|changes)$|build/")
# Debian's tools and interpreter, not the suite's venv or pyenv.
SYSTEM_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
    "HOME": "/root",
    "DEBIAN_FRONTEND": "noninteractive",
}


def run(
    argv: list[str], timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=SYSTEM_ENV,
        cwd=cwd or "/",
        check=False,
    )


def installed_packages() -> set[str]:
    proc = run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n"])
    assert proc.returncode == 0, proc.stderr
    return {
        name
        for name, _, status in (line.partition(" ") for line in proc.stdout.splitlines())
        if status == "installed"
    }


def git_status() -> set[str]:
    """`git status --porcelain` of the checkout, empty when it is not one."""
    proc = run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all"])
    return set(proc.stdout.splitlines()) if proc.returncode == 0 else set()


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def apt_install(deb: Path) -> subprocess.CompletedProcess[str]:
    """`apt-get install` of the .deb; on a machine whose package lists are
    missing or stale, once more after `apt-get update`."""
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", str(deb)]
    proc = run(argv, timeout=600)
    if proc.returncode != 0:
        update = run(["apt-get", "update", "-q"], timeout=300)
        assert update.returncode == 0, update.stdout + update.stderr
        proc = run(argv, timeout=600)
    return proc


@dataclass(frozen=True)
class Installed:
    deb: Path
    brought_in: frozenset[str]  # what apt installed besides natfail


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """Builds the package, installs it with apt, and purges it (and what it
    brought in) after the module."""
    if PACKAGE in installed_packages():
        pytest.skip(f"the {PACKAGE} package is installed on this machine: the test would purge it")
    out = tmp_path_factory.mktemp("deb")
    tree_before = git_status()
    build = run([str(REPO / "scripts" / "package"), "-o", str(out)], timeout=600, cwd=REPO)
    assert build.returncode == 0, build.stdout + build.stderr
    deb = Path(build.stdout.strip().splitlines()[-1])
    assert deb == out / f"natfail_{__version__}_all.deb" and deb.is_file(), build.stdout
    # The build leaves nothing in the tree that git would show.
    left = [line for line in git_status() - tree_before if BUILD_LEFTOVER.search(line)]
    assert not left, left

    had_user = user_exists(USER)
    aside = tmp_path_factory.mktemp("aside")
    moved = []
    for path in KEPT:
        if path.exists():
            shutil.move(path, aside / path.name)
            moved.append(path)
    before = installed_packages()
    try:
        install = apt_install(deb)
        assert install.returncode == 0, install.stdout + install.stderr
        after = installed_packages()
        assert PACKAGE in after
        yield Installed(deb, frozenset(after - before - {PACKAGE}))
    finally:
        extra = sorted(installed_packages() - before - {PACKAGE})
        purge = run(["apt-get", "purge", "-y", "-q", PACKAGE, *extra], timeout=600)
        if not had_user and user_exists(USER):
            run(["userdel", USER])
        for path in KEPT:
            if path.exists() and path not in moved:
                shutil.rmtree(path)
        for path in moved:
            shutil.move(aside / path.name, path)
        assert purge.returncode == 0, purge.stdout + purge.stderr
    assert PACKAGE not in installed_packages()
    assert installed_packages() >= before - {PACKAGE}
    for unit in UNITS:
        assert not (UNIT_DIR / unit).exists()
    for path in KEPT:
        assert path.exists() == (path in moved), path


def test_it_depends_on_debian_packages_only(installed: Installed) -> None:
    """Everything natfail imports comes from Debian's packages: every module
    of the installed code imports with Debian's python3."""
    fields = run(["dpkg-deb", "-f", str(installed.deb), "Depends", "Architecture"])
    assert fields.returncode == 0, fields.stderr
    for dep in (
        "python3-scapy",
        "python3-pyroute2",
        "python3-iptables",
        "python3-nacl",
        "python3-prometheus-client",
        "wireguard-tools",
        "nftables",
        "libnftables1",
        "iptables",
        "conntrack",
    ):
        assert dep in fields.stdout, fields.stdout
    assert "Architecture: all" in fields.stdout
    walk = (
        "import importlib, pkgutil, natfail\n"
        "assert natfail.__file__.startswith('/usr/lib/python3/dist-packages/'), natfail.__file__\n"
        "for m in pkgutil.walk_packages(natfail.__path__, 'natfail.'):\n"
        "    if not m.name.endswith('__main__'):  # those run the program\n"
        "        importlib.import_module(m.name)\n"
        "import scapy.all, pyroute2, iptc, nacl, prometheus_client\n"
    )
    proc = run(["/usr/bin/python3", "-c", walk])
    assert proc.returncode == 0, proc.stderr


def test_the_programs_run(installed: Installed) -> None:
    for prog in ("natfail", "natfailctl"):
        proc = run([f"/usr/bin/{prog}", "--version"])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"{prog} {__version__}", proc.stdout
        assert run(["man", "-w", prog]).returncode == 0
    assert Path("/usr/share/bash-completion/completions/natfailctl").is_file()
    assert Path("/usr/share/doc/natfail/examples/agent.toml").is_file()


def test_the_user_and_the_probe_key(installed: Installed) -> None:
    """The natfail user exists; the probe key was created for it, readable by
    nobody else, and the commented example config is a conffile."""
    user = pwd.getpwnam(USER)
    assert user.pw_shell == "/usr/sbin/nologin" and user.pw_dir == "/nonexistent"
    assert user.pw_uid < 1000  # a system user
    key = KEY.stat()
    assert (key.st_uid, key.st_gid) == (user.pw_uid, user.pw_gid)
    assert stat.S_IMODE(key.st_mode) == 0o600
    conf = CONFIG.stat()
    assert (conf.st_uid, stat.S_IMODE(conf.st_mode)) == (0, 0o644)
    assert stat.S_IMODE(CONFIG.parent.stat().st_mode) == 0o755
    conffiles = run(["dpkg-query", "-W", "-f", "${Conffiles}", PACKAGE])
    assert str(CONFIG) in conffiles.stdout, conffiles.stdout
    assert Path("/usr/lib/sysusers.d/natfail.conf").is_file()


def test_check_config_accepts_the_shipped_example(installed: Installed) -> None:
    """The shipped example with the key the package made: what the unit's
    ExecStartPre runs (as natfail) passes, and so does root's natfailctl."""
    expected = f"{CONFIG}: ok: 1 service(s) (wg0), 2 backend(s), firewall nftables"
    as_natfail = run(["setpriv", "--reuid", USER, "--regid", USER, "--init-groups",
                      "/usr/bin/natfailctl", "check-config", str(CONFIG)])  # fmt: skip
    assert (as_natfail.returncode, as_natfail.stdout.strip(), as_natfail.stderr) == (
        0,
        expected,
        "",
    ), as_natfail
    as_root = run(["/usr/bin/natfailctl", "check-config", str(CONFIG)])
    assert (as_root.returncode, as_root.stdout.strip(), as_root.stderr) == (0, expected, ""), (
        as_root
    )


def test_the_units_are_installed_but_neither_enabled_nor_started(installed: Installed) -> None:
    for unit in UNITS:
        text = (UNIT_DIR / unit).read_text()
        exec_lines = [line for line in text.splitlines() if line.startswith("Exec")]
        assert exec_lines and all(
            "/usr/bin/natfail" in line or line.startswith("ExecReload=") for line in exec_lines
        ), exec_lines
        assert "/opt/natfail" not in text, unit
        enabled = run(["systemctl", "is-enabled", unit])
        assert enabled.stdout.strip() == "disabled", enabled
        assert not list(Path("/etc/systemd/system").glob(f"*.wants/{unit}"))
        if Path("/run/systemd/system").is_dir():  # systemd is PID 1
            active = run(["systemctl", "is-active", unit])
            assert active.stdout.strip() == "inactive", active
    assert run(["pgrep", "-f", "^/usr/bin/python3 /usr/bin/natfail"]).returncode == 1


def _installed_daemon(lab: Lab, firewall: str) -> Gateway:
    """The lab's gateway with the installed /usr/bin/natfail in place of this
    checkout's (the runner's argv is prefix + [python, -m, natfail, -c, FILE])."""
    prefix = ["env", "-u", "PYTHONPATH", "-u", "PYTHONHOME", "PATH=" + SYSTEM_ENV["PATH"],
              "/bin/sh", "-c", 'shift 3; exec /usr/bin/natfail "$@"', "natfail"]  # fmt: skip
    gateway = Gateway(lab, firewall, prefix=prefix)
    gateway.remove_rules()
    (lab.dir / "state" / "state.json").unlink(missing_ok=True)
    return gateway


@pytest.mark.parametrize("firewall", KINDS)
def test_the_installed_daemon_fails_over(installed: Installed, fresh: Lab, firewall: str) -> None:
    """The installed daemon on Debian's scapy, pyroute2, python-iptables, PyNaCl
    and prometheus-client: it picks a, and moves to b when a dies."""
    gateway = _installed_daemon(fresh, firewall)
    gateway.start()
    try:
        assert gateway.proc is not None
        pid = gateway.proc.pid
        assert wait_until(
            lambda: b"/usr/bin/natfail" in Path(f"/proc/{pid}/cmdline").read_bytes(), 5
        )
        assert os.readlink(f"/proc/{pid}/exe").startswith("/usr/bin/python3")
        assert gateway.wait_active("a"), gateway.logs()
        fresh.backend("a").stop()
        assert gateway.wait_active("b", 10), gateway.logs()
    finally:
        gateway.stop(signal.SIGTERM)
        gateway.remove_rules()
    assert "Traceback" not in gateway.logs(), gateway.logs()
