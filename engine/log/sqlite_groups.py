"""Groups of the sqlite backend: one worker process per group.

`join` holds an exclusive `flock` on `.<db>.locks/group-<group>.lock`; the OS drops it
when the holder dies, even by kill -9, and a waiting joiner then takes over
with a new generation. Inside one process, one member per (group, topic)
holds a seat; the others queue for it.

A joiner that finds the lock held says so once (a standby worker would
otherwise look hung) and keeps polling; cancelling the join (a signal to
`stepline worker`) stops the wait at once.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from .base import AssignCallback, Assignment, Membership, RevokeCallback
from .membership import SoleMembership
from .sqlite_file import lock_file

# How often a waiting joiner retries the group lock.
_LOCK_POLL_S = 0.05

log = structlog.get_logger("stepline.log.sqlite")


@dataclass
class _GroupLock:
    fd: int
    holders: int = 0


class SqliteGroups:
    """The seats per (group, topic) inside this process, and the flock per
    group that keeps other processes out."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._seats: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._group_locks: dict[str, _GroupLock] = {}
        self._group_gates: dict[str, asyncio.Lock] = {}
        self._members: list[SoleMembership] = []

    def lock_path(self, group: str) -> str:
        """The file whose flock makes this process the group's only member."""
        return lock_file(self._path, f"group-{urllib.parse.quote(group, safe='')}.lock")

    def held(self, group: str) -> bool:
        """Whether a process (this one or another) holds the group's lock: a
        worker of the group is alive. Asked by trying the lock without
        waiting and letting it go at once; a joiner polling meanwhile just
        tries again."""
        mine = self._group_locks.get(group)
        if mine is not None and mine.holders > 0:
            return True
        path = self.lock_path(group)
        if not os.path.exists(path):
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock this probe took
        return False

    async def join(
        self,
        group: str,
        topic: str,
        partitions: int,
        next_generation: Callable[[], Awaitable[int]],
        on_assign: AssignCallback,
        on_revoke: RevokeCallback,
    ) -> Membership:
        """Take the seat and the flock, then the next generation (a write)."""
        key = (group, topic)
        await self._take_seat(key)
        try:
            await self._lock_group(group)
        except BaseException:
            self._free_seat(key)
            raise
        try:
            generation = await next_generation()
            assignment = Assignment(frozenset(range(partitions)), int(generation))
            member = SoleMembership(key, assignment, on_revoke, lambda m: self._release_seat(m.key))
            self._members.append(member)
            await on_assign(assignment)
        except BaseException:
            self._release_seat(key)
            raise
        return member

    def close(self) -> None:
        for member in self._members:
            member.left = True
        self._members.clear()
        for lock in self._group_locks.values():
            os.close(lock.fd)  # releases the flock
        self._group_locks.clear()
        self._seats.clear()

    async def _take_seat(self, key: tuple[str, str]) -> None:
        """One member per (group, topic) inside this process; others queue."""
        loop = asyncio.get_running_loop()
        while key in self._seats:
            await asyncio.shield(self._seats[key])
        self._seats[key] = loop.create_future()

    def _free_seat(self, key: tuple[str, str]) -> None:
        seat = self._seats.pop(key, None)
        if seat is not None and not seat.done():
            seat.set_result(None)

    async def _lock_group(self, group: str) -> None:
        """Hold the group's flock; shared by this process's seats in the group."""
        # The gate stops two seats of one group both opening the lock file:
        # flock on a second descriptor would wait for the first, forever.
        gate = self._group_gates.setdefault(group, asyncio.Lock())
        async with gate:
            held = self._group_locks.get(group)
            if held is None:
                fd = os.open(self.lock_path(group), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    await self._flock(fd, group)
                except BaseException:
                    os.close(fd)
                    raise
                held = self._group_locks[group] = _GroupLock(fd)
            held.holders += 1

    async def _flock(self, fd: int, group: str) -> None:
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # Another process is the member; the OS frees the lock when
                # it leaves or dies, even by kill -9.
                if not said:
                    said = True
                    log.info("another process is this group's member: waiting as a standby until it leaves",
                                group=group, lock=self.lock_path(group))
                await asyncio.sleep(_LOCK_POLL_S)
        if said:
            log.info("the group's member left: taking over", group=group)

    def _release_seat(self, key: tuple[str, str]) -> None:
        self._members = [m for m in self._members if m.key != key]
        group = key[0]
        held = self._group_locks.get(group)
        if held is not None:
            held.holders -= 1
            if held.holders <= 0:
                del self._group_locks[group]
                os.close(held.fd)
        self._free_seat(key)
