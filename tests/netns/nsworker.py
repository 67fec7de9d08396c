"""Run Python code inside a lab namespace, from tests and benchmarks.

The daemon runs inside the gateway's namespace and needs no namespace handling, but
tests run in the root namespace. libnftables, libiptc (python-iptables) and netlink
sockets all work in the namespace of the calling thread/process, so :class:`NsWorker`
forks a child that enters the namespace with ``setns(2)`` once, at the start, while it
is single-threaded; the parent sends it calls over a pipe. Arguments, results and
exceptions are pickled; functions are sent by reference (they must be importable).

    with NsWorker(lab.gateway.ns) as w:
        dp = w.create(NftablesDataplane)     # an object living in the child
        dp.apply(ruleset)                    # runs in the gateway namespace
        w.call(some_module_function, arg)    # any importable function
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any

CLONE_NEWNET = 0x40000000


def setns(ns: str) -> None:
    """Moves the calling thread (the whole process when single-threaded) into ``ns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


class RemoteError(RuntimeError):
    """An exception in the worker that could not be pickled as itself."""


def _serve(
    ns: str,
    conn: multiprocessing.connection.Connection,
    parent_end: multiprocessing.connection.Connection,
) -> None:
    parent_end.close()  # or the child never sees EOF when the parent closes its end
    setns(ns)
    objects: dict[int, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        op, args = msg
        try:
            if op == "call":
                func, a, kw = args
                result: Any = func(*a, **kw)
            elif op == "create":
                cls, a, kw = args
                obj = cls(*a, **kw)
                objects[id(obj)] = obj
                result = id(obj)
            elif op == "method":
                handle, name, a, kw = args
                result = getattr(objects[handle], name)(*a, **kw)
            elif op == "drop":
                objects.pop(args, None)
                result = None
            else:
                raise ValueError(op)
            conn.send(("ok", result))
        except BaseException as e:
            try:
                conn.send(("err", e))
            except Exception:
                conn.send(("err", RemoteError("".join(traceback.format_exception(e)))))


class Remote:
    """A proxy for an object living in the worker: method calls are forwarded."""

    def __init__(self, worker: NsWorker, handle: int) -> None:
        self._worker = worker
        self._handle = handle

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def method(*args: Any, **kwargs: Any) -> Any:
            return self._worker._request("method", (self._handle, name, args, kwargs))

        return method


class NsWorker:
    def __init__(self, ns: str) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(ns, child, self._conn))  # may fork helpers
        self._proc.start()
        child.close()

    def _request(self, op: str, args: Any) -> Any:
        self._conn.send((op, args))
        status, value = self._conn.recv()
        if status == "err":
            raise value
        return value

    def call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self._request("call", (func, args, kwargs))

    def create(self, cls: Callable[..., Any], *args: Any, **kwargs: Any) -> Remote:
        return Remote(self, self._request("create", (cls, args, kwargs)))

    def close(self) -> None:
        try:
            self._conn.close()
        finally:
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)

    def __enter__(self) -> NsWorker:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
