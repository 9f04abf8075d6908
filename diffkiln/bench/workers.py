"""Worker processes: each bench path (and the one-off tools) lives in its own child process.

Why processes: a path's peak RSS is then its own process's high-water mark, one path's allocator state or thread
pools cannot slow another, and a path that crashes or runs out of memory fails alone. The parent drives every
worker one call at a time (only one worker computes at any moment), so runs can be interleaved A B C A B C….

Protocol over a multiprocessing Pipe: the child sends ("ok", {"memory": …}) once its backend's libraries are
imported, then answers each (op, kwargs) with ("ok", value) or ("error", one line), by calling `backend.op_<op>`.
"close" answers with the memory record and ends the child.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing
import os
import sys
import traceback

from diffkiln.bench.measure import memory

BACKENDS = {
    "tools": "diffkiln.bench.tools:ToolsBackend",
    "torch": "diffkiln.bench.torch_ref:TorchBackend",
    "kiln": "diffkiln.bench.kiln_runner:KilnBackend",
}


class WorkerError(RuntimeError):
    """A worker op failed or the worker died; the message is one line for the report."""


class Worker:
    """Parent-side handle: start() spawns the child, call() runs one op in it, close() ends it."""

    def __init__(self, label: str, backend: str, **options):
        self.label, self.backend, self.options = label, backend, options
        self.proc = self.conn = None
        self.memory: dict = {}

    def start(self) -> Worker:
        ctx = multiprocessing.get_context("spawn")  # never fork a parent that may hold threads
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=serve, args=(child, self.backend, self.options), name=f"bench-{self.label}", daemon=True
        )
        with _main_without_phantom_file():
            self.proc.start()
        child.close()
        return self

    def ready(self) -> dict:
        """Wait until the child has imported its libraries; returns its memory then."""
        self.memory.update(self._reply()["memory"])
        return self.memory

    def call(self, op: str, **kwargs):
        try:
            self.conn.send((op, kwargs))
        except OSError:  # broken pipe: the child is gone
            raise WorkerError(self._death()) from None
        return self._reply()

    def close(self) -> dict:
        """End the child; returns its memory record (peak RSS over its whole life), or {} when it already died."""
        if self.proc is None:
            return self.memory
        try:
            if self.proc.is_alive():
                self.memory.update(self.call("close"))
        except (WorkerError, OSError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()  # our own child, stuck: end it
            self.proc.join(timeout=10)
        self.conn.close()
        self.proc = None
        return self.memory

    def _reply(self):
        while not self.conn.poll(0.2):
            if not self.proc.is_alive() and not self.conn.poll(0):
                raise WorkerError(self._death())
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):  # the child closed or reset the pipe as it died
            raise WorkerError(self._death()) from None
        if status == "error":
            raise WorkerError(value)
        return value

    def _death(self) -> str:
        self.proc.join(timeout=5)
        code = self.proc.exitcode
        if code is not None and code < 0:
            hint = " (killed: most likely out of memory)" if code == -9 else ""
            return f"{self.label} worker died from signal {-code}{hint}"
        return f"{self.label} worker exited with status {code}"


@contextlib.contextmanager
def _main_without_phantom_file():
    """spawn re-runs the parent's main script in the child; a main read from stdin (`python - <<EOF`) has
    `__file__ = '<stdin>'`, which the child cannot open: hide it while the child starts (it needs nothing there)."""
    main = sys.modules["__main__"]
    phantom = getattr(main, "__file__", None)
    if phantom is None or os.path.isfile(phantom):
        yield
        return
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = phantom


def _one_line(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    place = f" [{where.filename.rsplit('/', 1)[-1]}:{where.lineno}]" if where else ""
    return (text[-1] if text else type(exc).__name__) + place


def serve(conn, backend: str, options: dict) -> None:
    """Child main loop: build the backend, then answer ops until "close" (or the parent goes away)."""
    record = {"interpreter": memory()["rss"]}
    try:
        module, cls = BACKENDS[backend].split(":")
        instance = getattr(importlib.import_module(module), cls)(**options)
        record["after_imports"] = memory()["rss"]
        conn.send(("ok", {"memory": record}))
    except Exception as e:
        conn.send(("error", _one_line(e)))
        return
    while True:
        try:
            op, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        if op == "close":
            record["after_last_op"] = memory()["rss"]
            record["peak"] = memory()["peak"]
            conn.send(("ok", record))
            return
        try:
            result = getattr(instance, f"op_{op}")(**kwargs)
            conn.send(("ok", result))
        except Exception as e:
            conn.send(("error", _one_line(e)))
