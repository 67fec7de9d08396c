from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import pytest

from natfail.io.hooks import SubprocessHookRunner, SwitchEvent

EVENT = SwitchEvent("wg0", "a", "b", "failover", "10.0.0.3:51820")


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "hook"
    path.write_text(f"#!{sys.executable}\n{body}\n")
    path.chmod(0o755)
    return path


def test_hook_gets_argv_and_environment_without_a_shell(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    hook = _script(tmp_path, (
        "import json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'env': {{k: v for k, v in os.environ.items()"
        f" if k.startswith('NATFAIL_')}}}}, open({str(out)!r}, 'w'))"
    ))
    assert asyncio.run(SubprocessHookRunner().run(hook, EVENT))
    seen = json.loads(out.read_text())
    assert seen["argv"] == ["wg0", "a", "b", "failover"]
    assert seen["env"] == {
        "NATFAIL_SERVICE": "wg0", "NATFAIL_FROM": "a", "NATFAIL_TO": "b",
        "NATFAIL_TO_ADDRESS": "10.0.0.3:51820", "NATFAIL_REASON": "failover",
    }


def test_shell_metacharacters_stay_data(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    hook = _script(tmp_path, f"import json, sys\njson.dump(sys.argv[1:], open({str(out)!r}, 'w'))")
    event = SwitchEvent("wg0", None, "b; touch /tmp/pwned", "manual", "x")
    assert asyncio.run(SubprocessHookRunner().run(hook, event))
    assert json.loads(out.read_text()) == ["wg0", "", "b; touch /tmp/pwned", "manual"]


def test_failures_are_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    failing = _script(tmp_path, "import sys\nprint('no route to pager')\nsys.exit(3)")
    assert not asyncio.run(SubprocessHookRunner().run(failing, EVENT))
    assert "exited 3: no route to pager" in caplog.text
    assert not asyncio.run(SubprocessHookRunner().run(tmp_path / "missing", EVENT))
    assert "could not start" in caplog.text
    slow = _script(tmp_path, "import time\ntime.sleep(30)")
    assert not asyncio.run(SubprocessHookRunner(timeout=0.3).run(slow, EVENT))
    assert "killed after 0.3 s" in caplog.text
