"""`python mdwe_exec.py PROGRAM ARGS...`: execs PROGRAM with no way to map
memory writable and executable, as systemd's MemoryDenyWriteExecute=yes
does (prctl PR_SET_MDWE, Linux 6.3+, kept across fork and execve)."""

from __future__ import annotations

import ctypes
import os
import sys

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(f"mdwe_exec: PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
