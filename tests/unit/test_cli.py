"""The programs' contract: exit codes, one-line errors, no tracebacks, and a
natfailctl that starts without scapy or the daemon."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from natfail.cli import ctl, daemon_main
from tests.unit import test_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "etc" / "natfail.toml"
KEY = base64.b64encode(bytes(range(32))).decode()


def run_ctl(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "natfail.cli.ctl", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def write_valid(tmp_path: Path, *, with_key: bool = True) -> Path:
    key_file = tmp_path / "probe.key"
    if with_key:
        key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        key_file.chmod(0o600)
    conf = tmp_path / "natfail.toml"
    conf.write_text(f'[probe]\nprivate_key_file = "{key_file}"\n\n' + test_config.MINIMAL)
    return conf


def test_check_config_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["check-config", str(write_valid(tmp_path))]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert len(out.out.splitlines()) == 1
    assert "ok" in out.out and "wg0" in out.out


def test_check_config_missing_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["check-config", str(write_valid(tmp_path, with_key=False))]) == 2
    err = capsys.readouterr().err
    assert "probe.key" in err and "private_key_file" in err


def test_check_config_example_only_complains_about_the_probe_key(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = ctl.main(["check-config", str(EXAMPLE)])
    err = capsys.readouterr().err.strip().splitlines()
    if code == 0:
        assert err == []
    else:
        assert code == 2
        assert err and all("private_key_file" in line for line in err), err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert ctl.main(["check-config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and len(err.splitlines()) == 1


def test_check_config_uses_dash_c(tmp_path: Path) -> None:
    assert ctl.main(["-c", str(write_valid(tmp_path)), "check-config"]) == 0


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["no-such-command"],
        ["check-config", "a", "b"],
        ["probe"],
        ["probe", "x:1"],
        ["--bogus", "check-config"],
    ],
)
def test_usage_errors_exit_2_in_one_line(argv: list[str]) -> None:
    proc = run_ctl(*argv)
    assert proc.returncode == 2, proc
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_daemon_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        daemon_main.main(["--nope"])
    assert exc.value.code == 2


def test_daemon_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nfirewal = 'nftables'\n")
    assert daemon_main.main(["-c", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "firewal" in err and "firewall" in err and len(err.splitlines()) == 1


def test_probe_bad_target_and_key(tmp_path: Path) -> None:
    proc = run_ctl("probe", "example.com:51820", "--server-key", KEY)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = run_ctl("probe", "10.0.0.2:51820", "--server-key", "short")
    assert proc.returncode == 2 and "server-key" in proc.stderr
    proc = run_ctl(
        "probe",
        "10.0.0.2:51820",
        "--server-key",
        KEY,
        "--probe-key-file",
        str(tmp_path / "missing.key"),
    )
    assert proc.returncode == 2 and "missing.key" in proc.stderr


def test_probe_peer_generate(tmp_path: Path) -> None:
    conf = write_valid(tmp_path, with_key=False)
    proc = run_ctl("-c", str(conf), "probe-peer")
    assert proc.returncode == 1 and "--generate" in proc.stderr
    proc = run_ctl("-c", str(conf), "probe-peer", "--generate")
    assert proc.returncode == 0, proc.stderr
    key_file = tmp_path / "probe.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert "[Peer]" in proc.stdout and "PublicKey = " in proc.stdout
    private = key_file.read_text().strip()
    assert private not in proc.stdout
    # a second run keeps the key
    again = run_ctl("-c", str(conf), "probe-peer", "--generate")
    assert key_file.read_text().strip() == private
    assert again.stdout == proc.stdout


def test_probe_peer_prints_the_agent_config_each_backend_needs(tmp_path: Path) -> None:
    conf = write_valid(tmp_path)
    conf.write_text(
        conf.read_text().replace("priority = 100\n", 'priority = 100\nagent = "10.0.0.2:51821"\n')
    )
    proc = run_ctl("-c", str(conf), "probe-peer")
    assert proc.returncode == 0, proc.stderr
    public = proc.stdout.split("PublicKey = ")[1].split()[0]
    agent_part = proc.stdout.split("/etc/natfail/agent.toml")[1]
    assert "# for backend a of wg0" in agent_part
    assert 'listen = "10.0.0.2:51821"' in agent_part
    assert f'gateways = ["{public}"]' in agent_part
    # what it prints is an agent config the agent itself accepts
    agent_toml = tmp_path / "agent.toml"
    body = agent_part.split("# for backend a of wg0\n")[1]
    agent_toml.write_text(body)
    check = run_ctl("check-config", "--agent", str(agent_toml))
    assert check.returncode == 0, check.stdout + check.stderr


def test_natfailctl_imports_neither_scapy_nor_asyncio() -> None:
    code = (
        "import sys, natfail.cli.ctl as c\n"
        "c._build_parser()\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('scapy', 'asyncio', 'pyroute2')"
        " or m == 'natfail.daemon']\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == ""


@pytest.mark.parametrize("broken", test_config.BROKEN)
def test_check_config_rejects_each_broken_config(
    broken: test_config.Broken, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "natfail.toml"
    path.write_text(broken.doc)
    assert ctl.main(["check-config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"natfailctl: {path}: {broken.key}")
    assert broken.fragment in lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "--json"],
        ["events", "--json", "-n", "5"],
        ["switch", "wg0", "b"],
        ["release", "wg0"],
        ["drain", "wg0", "a"],
        ["undrain", "wg0", "a"],
        ["reload"],
    ],
)
def test_no_daemon_exits_3_in_one_line(tmp_path: Path, argv: list[str]) -> None:
    proc = run_ctl("--socket", str(tmp_path / "natfail.sock"), *argv)
    assert proc.returncode == 3, proc
    assert proc.stderr.strip().splitlines() == [
        f"natfailctl: daemon unreachable: no socket at {tmp_path / 'natfail.sock'}"
    ]


def test_socket_comes_from_the_config(tmp_path: Path) -> None:
    conf = write_valid(tmp_path)
    conf.write_text(f'[daemon]\nsocket = "{tmp_path / "x.sock"}"\n' + conf.read_text())
    proc = run_ctl("-c", str(conf), "status")
    assert proc.returncode == 3 and str(tmp_path / "x.sock") in proc.stderr


# --------------------------------------------------------------------------
# secrets: a key file others may read is refused, as ssh refuses one


def test_check_config_and_daemon_refuse_a_group_readable_key(tmp_path: Path) -> None:
    conf = write_valid(tmp_path)
    key_file = tmp_path / "probe.key"
    secret = key_file.read_text().strip()
    key_file.chmod(0o640)
    for proc in (
        run_ctl("check-config", str(conf)),
        subprocess.run(
            [sys.executable, "-m", "natfail", "-c", str(conf)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ),
    ):
        assert proc.returncode == 2, proc
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert str(key_file) in lines[0] and "permissions 0640 are too open" in lines[0]
        assert secret not in proc.stderr + proc.stdout


@pytest.mark.parametrize("option", ["--probe-key-file", "--psk-file"])
def test_probe_refuses_a_world_readable_key(tmp_path: Path, option: str) -> None:
    good = tmp_path / "good.key"
    good.write_text(KEY + "\n")
    good.chmod(0o600)
    loose = tmp_path / "loose.key"
    loose.write_text(KEY + "\n")
    loose.chmod(0o644)
    argv = ["probe", "127.0.0.1:9", "--server-key", KEY, "--probe-key-file", str(good)]
    argv += [option, str(loose)]
    proc = run_ctl(*argv)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert str(loose) in lines[0] and "permissions 0644 are too open" in lines[0]
    assert "Traceback" not in proc.stderr
    # the key is public test data here, yet the message must not quote a file's content
    assert KEY not in proc.stderr


def test_a_backend_in_two_services_fails_check_config_and_start(tmp_path: Path) -> None:
    conf = write_valid(tmp_path)
    second = test_config.MINIMAL.replace('name = "wg0"', 'name = "wg1"').replace(
        ':51820"\n', ':51821"\n', 1
    )
    conf.write_text(conf.read_text() + "\n" + second)
    for argv in (
        ["-m", "natfail.cli.ctl", "check-config", str(conf)],
        ["-m", "natfail", "-c", str(conf)],
    ):
        proc = subprocess.run(
            [sys.executable, *argv], capture_output=True, text=True, timeout=30, check=False
        )
        assert proc.returncode == 2, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert "service[1].backend[0].address" in line and "one service" in line
        assert "Traceback" not in proc.stderr


def test_natfailctl_with_a_fifo_or_dev_zero_as_config_never_hangs(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.toml"
    zero.symlink_to("/dev/zero")
    for conf in (fifo, zero):
        for argv in (["check-config", str(conf)], ["-c", str(conf), "status"]):
            proc = run_ctl(*argv)  # its timeout (30 s) would fail a hang
            assert proc.returncode == 2, (argv, proc.stderr)
            (line,) = proc.stderr.strip().splitlines()
            assert "not a regular file" in line


AGENT_KEY = base64.b64encode(bytes(range(32))).decode()


def _agent_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_agent_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _agent_file(
        tmp_path, f'listen = "10.0.0.2:51821"\ngateways = ["{AGENT_KEY}"]\ninterfaces = ["wg0"]\n'
    )
    assert ctl.main(["check-config", "--agent", str(good)]) == 0
    assert daemon_main.main(["agent", "--check-config", "-c", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.count("ok:") == 2 and "10.0.0.2:51821" in out


def test_agent_check_config_reports_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _agent_file(tmp_path, 'listen = "10.0.0.2"\ngateways = ["nope"]\ninterfaces = ["wg0"]\n')
    assert ctl.main(["check-config", "--agent", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "listen" in err[0] and "gateways" in err[1], err
    assert daemon_main.main(["agent", "--check-config", "-c", str(bad)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_masquerade_with_agents_is_one_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_valid(tmp_path)
    text = path.read_text()
    assert "priority = 100" in text
    path.write_text(
        text.replace("priority = 100", 'priority = 100\nagent = "10.0.0.2:51821"', 1) + "\n"
    )
    text = path.read_text()
    if "source_nat" in text:
        text = text.replace('source_nat = "preserve"', 'source_nat = "masquerade"')
    else:
        text = text.replace(
            "[[service.backend]]", 'source_nat = "masquerade"\n\n[[service.backend]]', 1
        )
    path.write_text(text)
    assert ctl.main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "masquerade" in err[0] and "warning" in err[0], err


def test_check_config_reports_every_problem_of_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "natfail.toml"
    conf.write_text(
        '[daemon]\nfirewall = "pf"\n\n[probe]\ninterval = -1\n\n'
        + test_config.MINIMAL
        + '\n[[service.backend]]\nname = "b"\naddress = "10.0.0.3"\npriority = 90\n'
        + '\n[[service]]\nname = "wg1"\npublic = "nope"\n'
    )
    assert ctl.main(["check-config", str(conf)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": ")[2] for line in lines] == [
        "daemon.firewall",
        "probe.interval",
        "service[0].backend[1].address",
        "service[1].public",
    ], lines
    assert all("(line " in line for line in lines)
    # the daemon refuses the same file with the first of them, one line
    assert daemon_main.main(["-c", str(conf)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "daemon.firewall" in line
