"""Groups of the sqlite backend: worker processes split a group's partitions by flock.

Each partition of a group has a lock file, `.<db>.locks/group-<group>.p<N>.lock`;
a member holds an exclusive `flock` on the lock of every partition it owns,
and a shared one on `group-<group>.lock` while it is a member (so "is a
worker of the group alive" is one probe: can that lock be taken
exclusively). The OS drops a process's locks when it dies, even by kill -9,
and a waiting joiner then takes the partitions over with a new generation;
the partitions' epochs (max of that generation and the last claim + 1) fence
the previous owner per partition.

A plain joiner wants every partition; a process told it is member k of N
(`split_groups`, what `stepline worker --processes N` starts) wants the
partitions p with p % N == k. Either takes the locks it wants all at once
or none: it tries each without waiting, in partition order, and on the
first one held lets go of what it took and polls again. So no process ever
holds some partitions while waiting for others (no deadlock, and no
partition kept from a process that could have all of its own), and a
second plain worker waits, holding nothing, as a standby until the whole
group is free. Inside one process, one member per (group, topic) holds a
seat; the others queue for it.

A joiner that finds a lock held says so once (a standby worker would
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

# How often a waiting joiner retries the locks it wants.
_LOCK_POLL_S = 0.05

log = structlog.get_logger("stepline.log.sqlite")


@dataclass
class _Held:
    fd: int
    holders: int = 0


class SqliteGroups:
    """The seats per (group, topic) inside this process, and the flocks per
    group and partition that split the group between processes."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._seats: dict[tuple[str, str], asyncio.Future[None]] = {}
        # Lock file -> its descriptor, shared by this process's seats that want it.
        self._held: dict[str, _Held] = {}
        self._holding: dict[tuple[str, str], list[str]] = {}
        self._group_gates: dict[str, asyncio.Lock] = {}
        self._members: list[SoleMembership] = []
        # (k, N): this process is member k of N and owns the partitions p % N == k.
        self.member: tuple[int, int] | None = None

    def lock_path(self, group: str) -> str:
        """The file a member holds shared, and a probe tries exclusively."""
        return lock_file(self._path, f"group-{urllib.parse.quote(group, safe='')}.lock")

    def partition_lock_path(self, group: str, partition: int) -> str:
        """The file whose exclusive flock makes a process the partition's owner in the group."""
        return lock_file(self._path, f"group-{urllib.parse.quote(group, safe='')}.p{partition}.lock")

    def wanted(self, partitions: int) -> list[int]:
        """The partitions this process takes of a topic with `partitions` partitions."""
        if self.member is None:
            return list(range(partitions))
        k, n = self.member
        return [p for p in range(partitions) if p % n == k]

    def held(self, group: str) -> bool:
        """Whether a process (this one or another) is a member of the group: a
        worker of the group is alive. Asked by trying the group's lock
        exclusively without waiting and letting it go at once; a joiner
        polling meanwhile just tries again."""
        mine = self._held.get(self.lock_path(group))
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
        """Take the seat and the flocks, then the next generation (a write)."""
        key = (group, topic)
        await self._take_seat(key)
        wanted = self.wanted(partitions)
        try:
            self._holding[key] = await self._lock(group, wanted)
        except BaseException:
            self._free_seat(key)
            raise
        try:
            generation = await next_generation()
            assignment = Assignment(frozenset(wanted), int(generation))
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
        for held in self._held.values():
            os.close(held.fd)  # releases the flock
        self._held.clear()
        self._holding.clear()
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

    async def _lock(self, group: str, partitions: list[int]) -> list[str]:
        """Hold the flocks of `partitions` and the group's, all or none; shared
        by this process's seats in the group. Returns the lock files held."""
        # The gate stops two seats of one group both opening a lock file:
        # flock on a second descriptor would wait for the first, forever.
        gate = self._group_gates.setdefault(group, asyncio.Lock())
        wants = [(self.partition_lock_path(group, p), fcntl.LOCK_EX) for p in partitions]
        wants.append((self.lock_path(group), fcntl.LOCK_SH))
        said = False
        async with gate:
            while True:
                blocked = self._try_all(wants)
                if blocked is None:
                    break
                if not said:
                    # Another process owns a partition we want; the OS frees
                    # its locks when it leaves or dies, even by kill -9.
                    said = True
                    log.info("another process is this group's member: waiting as a standby until it leaves",
                             group=group, partitions=partitions, lock=blocked)
                await asyncio.sleep(_LOCK_POLL_S)
        if said:
            log.info("the group's member left: taking over", group=group, partitions=partitions)
        return [path for path, _ in wants]

    def _try_all(self, wants: list[tuple[str, int]]) -> str | None:
        """Take every lock of `wants` without waiting (the ones this process
        already holds count once more); on the first one held elsewhere let go
        of what this try took and return its path. None: all taken."""
        taken: list[str] = []
        for path, mode in wants:
            held = self._held.get(path)
            if held is None:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    self._let_go(taken)
                    return path
                except BaseException:
                    os.close(fd)
                    self._let_go(taken)
                    raise
                held = self._held[path] = _Held(fd)
            held.holders += 1
            taken.append(path)
        return None

    def _let_go(self, paths: list[str]) -> None:
        for path in paths:
            held = self._held.get(path)
            if held is not None:
                held.holders -= 1
                if held.holders <= 0:
                    del self._held[path]
                    os.close(held.fd)

    def _release_seat(self, key: tuple[str, str]) -> None:
        self._members = [m for m in self._members if m.key != key]
        self._let_go(self._holding.pop(key, []))
        self._free_seat(key)
