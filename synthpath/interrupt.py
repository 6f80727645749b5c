"""Stopping cleanly on SIGINT/SIGTERM, and naming the disk when the disk is the problem.

:func:`signals_stop` turns SIGINT (Ctrl-C) and SIGTERM (``kill``, a batch system's time
limit) into :class:`Interrupted`, raised in the main thread wherever it is. Stages write
only into ``<stage>.partial`` and resume from it, so any point outside :func:`critical` is
a safe point to stop at; :func:`critical` (used around a stage's manifest write and rename)
holds a signal back until the block is done, so a stage is never half-finalised. A second
signal while a critical block runs is still deferred; the CLI exits 130 (SIGINT) or 143
(SIGTERM), the shell convention 128 + signal number.

:func:`disk_problem` recognises a full disk, an exceeded quota, a read-only file system or
a folder without write permission anywhere in an exception's chain (also in
errors of libraries, such as safetensors, that do not raise ``OSError``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import threading
from typing import Iterator


class Interrupted(BaseException):
    """The run was asked to stop (SIGINT or SIGTERM). A ``BaseException`` like
    ``KeyboardInterrupt``, so ``except Exception`` blocks in stages do not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = signal.Signals(signum).name
        self.stage: str | None = None
        self.partial = None
        super().__init__(f"interrupted by {self.name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state = {"depth": 0, "pending": None, "pid": None}


def _handler(signum, frame) -> None:
    if os.getpid() != _state["pid"]:  # a forked worker (e.g. a DataLoader's): behave as by default
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)
    if _state["depth"] > 0:
        _state["pending"] = _state["pending"] or signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_stop() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (main thread only;
    elsewhere this is a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _state["pid"] = os.getpid()
    for s in old:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back until the block ends, then stop (when handled by
    :func:`signals_stop`). Nesting is allowed."""
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0 and _state["pending"] is not None:
            signum, _state["pending"] = _state["pending"], None
            raise Interrupted(signum)


_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}
_DISK_TEXT = re.compile(r"No space left on device|Disk quota exceeded|Read-only file system|StorageFull|"
                        r"ReadOnlyFilesystem", re.I)


def disk_problem(exc: BaseException) -> tuple[str, str | None] | None:
    """``(what, path)`` when ``exc`` (or an exception it was raised from) is a full disk, a
    read-only file system or a permission error; ``None`` otherwise."""
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            return _DISK_ERRNOS[e.errno], e.filename
        m = _DISK_TEXT.search(str(e))
        if m:
            text = m.group(0).lower()
            what = ("the file system is read-only" if "read" in text else
                    "the disk quota is exceeded" if "quota" in text else "the disk is full")
            return what, getattr(e, "filename", None)
        e = e.__cause__ or e.__context__
    return None


__all__ = ["Interrupted", "signals_stop", "critical", "disk_problem"]
