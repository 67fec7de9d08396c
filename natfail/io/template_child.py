"""The initiation's template, built by scapy in a short-lived child process.

scapy is what lays the packet out (see :func:`natfail.core.noise.initiation_template`),
but importing it costs the process some 25 MiB for good; the daemon only needs
the template's bytes and offsets. So the daemon asks a child to build it and
keeps only the result; if the child fails, it builds the template itself."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from natfail.core import noise
from natfail.oneline import one_line

log = logging.getLogger("natfail")

_CHILD = (
    "import json; from natfail.core import noise; "
    "print(json.dumps(noise.initiation_template().to_json()))"
)


def load_template(timeout: float = 30.0) -> noise.InitiationTemplate:
    """Build the template in a child and make the probes use it."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD],
            capture_output=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise ValueError(one_line(done.stderr.decode(errors="replace"))[-200:])
        template = noise.InitiationTemplate.from_json(json.loads(done.stdout))
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        log.warning("building the probe template in a child failed (%s); building it here", exc)
        template = noise.initiation_template()
    noise.use_template(template)
    return template
