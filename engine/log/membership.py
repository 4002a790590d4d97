"""A membership with a fixed assignment: the memory backend gives a group's
only member every partition, the sqlite backend a process the partitions
whose locks it holds, until it leaves."""

from __future__ import annotations

from collections.abc import Callable

from .base import Assignment, Membership, RevokeCallback

__all__ = ["SoleMembership"]


class SoleMembership(Membership):
    """Holds its partitions of (group, topic) `key` until `leave()`, which
    revokes them once and then gives the seat back through `release`."""

    def __init__(self, key: tuple[str, str], assignment: Assignment, on_revoke: RevokeCallback,
                 release: Callable[[SoleMembership], None]) -> None:
        self.key = key
        self._assignment = assignment
        self._on_revoke = on_revoke
        self._release = release
        self.left = False

    @property
    def assignment(self) -> Assignment:
        return self._assignment

    async def leave(self) -> None:
        if self.left:
            return
        self.left = True
        try:
            await self._on_revoke(self._assignment.partitions)
        finally:
            self._release(self)
