"""A doorbell for the embedded log: rung by every commit, in every process.

An idle `SqliteLog` with parked readers used to look at `PRAGMA
data_version` a hundred times a second in case another process had
committed, about 2% of a core for nothing. Now every writer, once its COMMIT
has returned (the transaction visible to every connection), writes one byte
to `.<db>.locks/commits`, and on Linux an inotify watch on that folder tells
the poll, which sleeps until then. The ring has to follow the commit: the
WAL file itself is written before the transaction is visible (the frames,
then the fsync, then the shared-memory index), so a watch on it wakes the
poll too early, and the poll would then sleep through the commit.

The fd is read only while the poll waits on it: between waits the kernel
queues the events (identical ones coalesced, an overflow reported as
`IN_Q_OVERFLOW`, which rings too), so a process busy appending pays no
wake-up per commit. Where inotify cannot be had (another OS, the per-user
limit of instances reached) `open_bell` says None and the log polls as
before; a writer that cannot ring (an older version) is noticed by the idle
poll's look once a second.
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
from typing import Any

from .sqlite_file import lock_file

_IN_MODIFY = 0x00000002
_IN_Q_OVERFLOW = 0x00004000
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_MASK = _IN_MODIFY
# The file every writer touches after each commit, in the log's lock folder.
_RING = "commits"
_RING_NAME = _RING.encode()
# struct inotify_event: int wd; uint32_t mask, cookie, len; char name[len].
_EVENT = struct.Struct("iIII")

_libc: Any = None


def _inotify() -> Any:
    global _libc
    if _libc is None:
        import ctypes  # here: not on the import path of every command

        # The process's own symbols hold libc's (find_library would run ldconfig).
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Bell:
    """Rings when a process commits to one SQLite log (see the module)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._loop: asyncio.AbstractEventLoop | None = None

    def _drain(self) -> bool:
        """Read what the kernel queued; True if a commit rang."""
        rung = False
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return rung
            except OSError:
                return True  # broken: let the caller look
            if not data:
                return rung
            at = 0
            while at + _EVENT.size <= len(data):
                _, mask, _, size = _EVENT.unpack_from(data, at)
                name = data[at + _EVENT.size:at + _EVENT.size + size].rstrip(b"\0")
                at += _EVENT.size + size
                if mask & _IN_Q_OVERFLOW or name == _RING_NAME:
                    rung = True

    async def wait(self, timeout: float) -> bool:
        """Until a commit rings (at once if one did since the last wait) or
        `timeout` passes; True if it rang."""
        if self._drain():
            return True
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        rang = False

        def readable() -> None:
            nonlocal rang
            if self._drain():
                rang = True
                _settle(waiter)

        self._loop = loop
        loop.add_reader(self._fd, readable)
        timer = loop.call_later(timeout, _settle, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if self._loop is loop:  # unless close() came first and removed it
                loop.remove_reader(self._fd)
                self._loop = None
        return rang

    def close(self) -> None:
        if self._fd < 0:
            return
        # The poll may be waiting: a cancelled wait finishes after this.
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        self._loop = None
        os.close(self._fd)
        self._fd = -1


def open_bell(path: str) -> Bell | None:
    """A bell for the SQLite log at `path`, or None where inotify is not had."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = _inotify()
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    folder = os.path.dirname(lock_file(path, _RING))
    if libc.inotify_add_watch(fd, os.fsencode(folder), _MASK) < 0:
        os.close(fd)
        return None
    return Bell(fd)


class Ringer:
    """A writer's side: one byte written after each commit. A ring that
    fails never fails the commit (the others look once a second anyway)."""

    def __init__(self, path: str) -> None:
        try:
            self._fd = os.open(lock_file(path, _RING), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            self._fd = -1

    def ring(self) -> None:
        if self._fd >= 0:
            try:
                os.pwrite(self._fd, b"\0", 0)
            except OSError:
                pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
