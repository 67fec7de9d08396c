"""The daemon under the restrictions of systemd/natfail.service that can be
reproduced without systemd as PID 1: its own unprivileged user (nobody here,
natfail in production), CAP_NET_ADMIN and CAP_NET_RAW as its only
capabilities (bounding and ambient sets, as AmbientCapabilities= gives them),
no new privileges, and no writable+executable memory
(MemoryDenyWriteExecute=, through PR_SET_MDWE). It must still probe, switch
and clean conntrack with either dataplane.

Not reproduced here: the mount namespace (ProtectSystem= and friends) and
the seccomp filter; the unit test checks systemd's score of those."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from natfail.lab import PUBLIC_V4, Lab, wait_until
from tests.netns.gateway import KINDS, Gateway

UID = GID = 65534  # nobody:nogroup: unprivileged and present on every Debian system
CAPS = "net_admin,net_raw"  # what the unit grants
CAP_BITS = {"net_admin": 12, "net_raw": 13}
# (firewall, capabilities): the unit's set for both; nftables also with
# CAP_NET_ADMIN alone, which README tells nftables-only gateways they may use.
# (libiptc opens a raw socket, so iptables needs CAP_NET_RAW.)
CONFINEMENTS = [(kind, CAPS) for kind in KINDS] + [("nftables", "net_admin")]
MDWE = Path(__file__).with_name("mdwe_exec.py")


def _reachable_python() -> list[str]:
    """A prefix that lets the unprivileged user reach this interpreter. When
    it lives under /root (pyenv), which is 0700, a private mount namespace
    lays an empty 0755 tmpfs over /root with only the interpreter's tree
    bound back into it; in production it lives in /opt, and ProtectHome=
    hides /root anyway."""
    real = Path(os.path.realpath(sys.executable))
    if real.parts[:2] != ("/", "root") or len(real.parts) < 4:
        return []
    tree = f"/root/{real.parts[2]}"
    script = (
        'set -e; s=$(mktemp -d); mount --bind /root "$s"; '
        "mount -t tmpfs -o mode=0755 natfail-test /root; "
        f'mkdir {tree}; mount --bind "$s/{real.parts[2]}" {tree}; exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


def _prefix(caps: str) -> list[str]:
    plus = "+" + caps.replace(",", ",+")
    return [
        *_reachable_python(),
        "setpriv",
        f"--reuid={UID}",
        f"--regid={GID}",
        "--clear-groups",
        f"--inh-caps=-all,{plus}",
        f"--ambient-caps=-all,{plus}",
        f"--bounding-set=-all,{plus}",
        "--no-new-privs",
        "--",
        sys.executable,
        str(MDWE),
    ]


def _mdwe_works() -> bool:
    probe = [
        sys.executable,
        str(MDWE),
        sys.executable,
        "-c",
        "import mmap; mmap.mmap(-1, 4096, prot=7)",
    ]
    proc = subprocess.run(probe, capture_output=True, text=True, check=False)
    return proc.returncode != 0 and "PermissionError" in proc.stderr


class ConfinedGateway(Gateway):
    """The daemon under setpriv, with the capabilities ``caps`` only."""

    def __init__(self, lab: Lab, firewall: str, caps: str) -> None:
        super().__init__(lab, firewall, prefix=_prefix(caps))
        self.caps = caps


@pytest.fixture(params=CONFINEMENTS, ids=[f"{k}-{c.replace(',', '+')}" for k, c in CONFINEMENTS])
def confined(request: pytest.FixtureRequest, fresh: Lab) -> Iterator[ConfinedGateway]:
    if not _mdwe_works():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    firewall, caps = request.param
    gw = ConfinedGateway(fresh, firewall, caps)
    gw.remove_rules()
    # The daemon's files, owned by its user: the lab's directory is root's only.
    home = Path(tempfile.mkdtemp(prefix="natfail-confined-"))
    os.chmod(home, 0o755)
    text = gw.config.read_text()
    lab_key = fresh.probe_key.file
    key = home / "probe.key"
    shutil.copyfile(lab_key, key)
    os.chmod(key, 0o600)
    text = text.replace(str(lab_key), str(key))
    if fresh.psk_file is not None:
        psk = home / "probe.psk"
        shutil.copyfile(fresh.psk_file, psk)
        os.chmod(psk, 0o600)
        text = text.replace(str(fresh.psk_file), str(psk))
    text = text.replace(str(fresh.dir / "natfail.sock"), str(home / "run" / "natfail.sock"))
    text = text.replace(str(fresh.dir / "state"), str(home / "state"))
    gw.config = home / "natfail.toml"
    gw.config.write_text(text)
    for sub in ("run", "state"):
        (home / sub).mkdir(mode=0o700)
    for path in (home / "run", home / "state", key, *home.glob("probe.*")):
        os.chown(path, UID, GID)
    gw.home = home  # type: ignore[attr-defined]
    gw.start()
    assert gw.wait_active("a"), gw.logs()
    yield gw
    gw.stop()
    assert "Traceback" not in gw.logs(), gw.logs()
    gw.remove_rules()
    shutil.rmtree(home, ignore_errors=True)


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _daemon_pid(gw: Gateway) -> int:
    """The python process under ip netns exec / setpriv / mdwe_exec (they exec)."""
    assert gw.proc is not None
    return gw.proc.pid


def test_confined_daemon_probes_switches_and_cleans(confined: ConfinedGateway) -> None:
    gw, lab = confined, confined.lab
    status = _proc_status(_daemon_pid(gw))
    assert status["Uid"].split()[0] == str(UID), status["Uid"]
    # the granted capabilities only, in every set
    caps = sum(1 << CAP_BITS[c] for c in gw.caps.split(","))
    for field in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(status[field], 16) == caps, (field, status[field])
    assert status["NoNewPrivs"].strip() == "1"
    sock = Path(gw.config.read_text().split('socket = "', 1)[1].split('"', 1)[0])
    assert sock.stat().st_uid == UID and sock.stat().st_mode & 0o777 == 0o660

    lab.client_rehandshake()
    assert lab.client_ping(count=2, interval=0.1, timeout=3)
    assert "10.0.0.2" in gw.conntrack()
    lab.backend("a").stop()
    assert gw.wait_active("b", 10), gw.logs()
    # no client flow (through the public address) is left on a; the gateway's own
    # probes of the dead backend are not client flows
    client_flows = [line for line in gw.conntrack().splitlines() if PUBLIC_V4 in line]
    assert not [line for line in client_flows if "10.0.0.2" in line], gw.conntrack()
    assert wait_until(lambda: lab.client_ping(count=1, interval=0.2, timeout=1), 30, 0.1)
    # a manual switch and the nft monitor child (ambient caps) work too
    lab.backend("a").start()
    assert wait_until(lambda: gw.backend_state("a") == "up", 10), gw.logs()
    proc = gw.ctl("switch", "wg0", "a")
    assert proc.returncode == 0, proc.stderr
    if gw.firewall == "nftables":
        lab.exec(lab.gateway, ["nft", "flush", "ruleset"])
        assert wait_until(lambda: "repaired natfail's firewall rules" in gw.logs(), 5), gw.logs()
    lab.client_rehandshake()
    assert lab.client_ping(count=2, interval=0.1, timeout=3)
    assert "cannot" not in gw.logs(), gw.logs()
