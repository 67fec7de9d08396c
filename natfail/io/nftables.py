"""The nftables dataplane: libnftables' JSON API, in process, through ctypes.

natfail owns ``table inet natfail`` (see :mod:`natfail.core.ruleset`) and never lists,
changes or deletes anything else: every command names that table. Each change is one
``nft_run_cmd_from_buffer`` call with one JSON document, which libnftables sends to the
kernel as one batch: one transaction, all or nothing.

A swap is "delete the element, add the element" in the ``dnatN``/``markN`` maps and in
the ``fenceN`` sets, in one transaction: the backend losing the traffic is fenced in the
same instant its DNAT goes. The three base chains and their rules never change, so
there is never a moment with no rule. A table left by a natfail without the fence reads
as not intact and is rebuilt whole by the next apply (one transaction too).

The object remembers what it last installed or read, and computes the next change
against that (no listing on the hot path). If the kernel disagrees (somebody changed or
deleted the table), the transaction fails as a whole, the object reads the table and
tries once more from what it found (repairing a damaged table by recreating it, in one
transaction too). :meth:`NftablesDataplane.read` refreshes the memory: a daemon that
checks for drift with ``read()`` and then calls ``apply()`` repairs exactly the drift.

libnftables.so.1 comes from Debian's ``libnftables1`` package (needs no Python binding).
The library works in the network namespace of the process that created the context.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import threading
from typing import Any, Final

from natfail.core.ruleset import (
    NFT_FAMILY,
    NFT_TABLE,
    Ruleset,
    nft_commands,
    nft_full_commands,
    nft_parse,
)
from natfail.io.dataplane import DataplaneError
from natfail.oneline import one_line

__all__ = ["Libnftables", "NftablesDataplane"]

NFT_CTX_DEFAULT: Final = 0
NFT_CTX_OUTPUT_HANDLE: Final = 1 << 3
NFT_CTX_OUTPUT_JSON: Final = 1 << 4

_LIB_NAMES: Final = ("libnftables.so.1", "libnftables.so")
_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def _load() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        errors = []
        names = [*_LIB_NAMES]
        found = ctypes.util.find_library("nftables")
        if found:
            names.append(found)
        for name in names:
            try:
                lib = ctypes.CDLL(name, use_errno=True)
                break
            except OSError as e:
                errors.append(str(e))
        else:
            raise DataplaneError(
                "cannot load libnftables (install libnftables1): " + "; ".join(errors)
            )
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_set_flags.restype = None
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.restype = ctypes.c_int
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.restype = ctypes.c_int
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        _lib = lib
        return lib


class Libnftables:
    """One libnftables context with JSON output and buffered output/errors.

    Not thread-safe: one caller at a time (a lock guards it)."""

    def __init__(self) -> None:
        self._lib = _load()
        ctx = self._lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not ctx:
            raise DataplaneError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        self._lib.nft_ctx_output_set_flags(ctx, NFT_CTX_OUTPUT_JSON | NFT_CTX_OUTPUT_HANDLE)
        if self._lib.nft_ctx_buffer_output(ctx) or self._lib.nft_ctx_buffer_error(ctx):
            self.close()
            raise DataplaneError("libnftables: cannot buffer output")
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()

    def run(self, commands: list[dict[str, Any]]) -> tuple[int, str, str]:
        """Runs one JSON document ``{"nftables": commands}``; returns (rc, output, error)."""
        if not self._ctx:
            raise DataplaneError("libnftables context is closed")
        doc = json.dumps({"nftables": commands}, separators=(",", ":")).encode()
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, doc)
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        return rc, out.decode(errors="replace"), err.decode(errors="replace")


_TABLE: Final = {"table": {"family": NFT_FAMILY, "name": NFT_TABLE}}


class NftablesDataplane:
    """:class:`natfail.io.dataplane.Dataplane` on ``table inet natfail``."""

    name = "nftables"
    inline = True
    """Short enough to call on the event loop (see natfail.firewall)."""

    def __init__(self, nft: Libnftables | None = None) -> None:
        self._nft = nft or Libnftables()
        self._known: Ruleset | None = None  # what we believe is installed (intact table)
        self.last_commands: list[dict[str, Any]] = []  # for logs and tests

    def close(self) -> None:
        self._nft.close()

    # -- reading ----------------------------------------------------------------------

    def _listing(self) -> list[dict[str, Any]] | None:
        """The JSON listing of natfail's table, None when it does not exist."""
        rc, out, err = self._nft.run([{"list": _TABLE}])
        if rc != 0:
            if "No such file or directory" in err or "does not exist" in err:
                return None
            raise DataplaneError(f"nft list table {NFT_FAMILY} {NFT_TABLE}: {one_line(err)}")
        try:
            items = json.loads(out)["nftables"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataplaneError(f"nft list table: unreadable JSON output: {e}") from None
        if not isinstance(items, list):
            raise DataplaneError("nft list table: unexpected JSON output")
        return items

    def _read(self) -> tuple[Ruleset, bool, bool]:
        """(installed, table exists, table intact)."""
        listing = self._listing()
        if listing is None:
            return Ruleset(), False, False
        installed, intact = nft_parse(listing)
        return installed, True, intact

    def read(self) -> Ruleset:
        return self.inspect()[0]

    def intact(self) -> bool:
        return self.inspect()[1]

    def inspect(self) -> tuple[Ruleset, bool]:
        installed, _, ok = self._read()
        self._known = installed if ok else None
        return installed, ok

    # -- changing ---------------------------------------------------------------------

    def _run(self, cmds: list[dict[str, Any]]) -> str | None:
        self.last_commands = cmds
        rc, _, err = self._nft.run(cmds)
        return None if rc == 0 else (one_line(err) or f"exit {rc}")

    def apply(self, desired: Ruleset) -> None:
        if self._known is not None:
            cmds = nft_commands(self._known, desired)
            if not cmds:
                return
            if self._run(cmds) is None:
                self._known = desired
                return
        # no memory, or the kernel disagreed: read and compute from what is there
        installed, exists, intact = self._read()
        if intact:
            cmds = nft_commands(installed, desired)
        else:
            cmds = nft_full_commands(desired, table_exists=exists)
        if cmds:
            error = self._run(cmds)
            if error is not None:
                self._known = None
                raise DataplaneError(f"nftables transaction failed: {error}")
        self._known = desired

    def remove_all(self) -> None:
        self._known = None
        error = self._run([{"add": _TABLE}, {"delete": _TABLE}])
        if error is not None:
            raise DataplaneError(f"nft delete table {NFT_FAMILY} {NFT_TABLE}: {error}")
