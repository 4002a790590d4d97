"""The log port: the one interface every backend implements.

Everything above this module (worker, client, projections, CLI) talks to a
`Log` and never imports sqlite3 or aiokafka. The contract test suite in
`tests/test_log_contract.py` runs against every adapter.

Semantics, shared by all backends:

* A topic has a fixed number of partitions; offsets in a partition start at
  0 and grow by one per record, with no gaps.
* `append` returns only when the records are durable by the backend's
  standard (fsync for sqlite, acks=all for Kafka) and returns their offsets.
  Records of one call to one partition keep their order.
* An empty value is a tombstone: on a compacted topic (`TopicSpec.compact`)
  Kafka eventually drops the key's older records; other backends keep them
  all, and readers treat the empty value as "deleted".
* `read` returns records at offsets >= the given one, waiting up to
  `timeout` seconds for at least one to arrive.
* A group assigns each partition of a topic to exactly one live member;
  `generation` grows with every assignment the group hands out, so callers
  can derive fencing epochs from it.
"""

from __future__ import annotations

import abc
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    # None keeps records forever; run history is never compacted away.
    retention_ms: int | None = None
    # A table keyed by record key (the latest value per key matters), not a history.
    compact: bool = False


@dataclass(frozen=True, slots=True)
class Assignment:
    partitions: frozenset[int]
    generation: int


AssignCallback = Callable[[Assignment], Awaitable[None]]
RevokeCallback = Callable[[frozenset[int]], Awaitable[None]]


def partition_for(key: bytes, partitions: int) -> int:
    """Which partition a key lives in. Every backend and client uses this.

    CRC-32 is stable across processes and Python versions (unlike `hash`).
    Never change it: existing logs place runs by this function.
    """
    return zlib.crc32(key) % partitions


class Membership(abc.ABC):
    """A live seat in a consumer group; leave() gives its partitions up."""

    @property
    @abc.abstractmethod
    def assignment(self) -> Assignment: ...

    @abc.abstractmethod
    async def leave(self) -> None: ...


class Log(abc.ABC):
    """A partitioned, append-only, durable log with consumer groups."""

    url: str

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect; raises LogUnavailable with the URL when it cannot."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        """Create missing topics; existing ones keep their partition count."""

    @abc.abstractmethod
    async def partitions(self, topic: str) -> int:
        """Partition count; raises UnknownTopic for a topic never created."""

    @abc.abstractmethod
    async def append(
        self, topic: str, partition: int, records: Sequence[tuple[bytes, bytes]]
    ) -> list[int]:
        """Append (key, value) pairs to one partition; return their offsets."""

    @abc.abstractmethod
    async def read(
        self,
        topic: str,
        partition: int,
        offset: int,
        max_records: int = 1000,
        timeout: float = 0.0,
    ) -> list[Record]: ...

    @abc.abstractmethod
    async def end_offset(self, topic: str, partition: int) -> int:
        """The offset the next appended record will get."""

    @abc.abstractmethod
    async def join_group(
        self,
        group: str,
        topic: str,
        on_assign: AssignCallback,
        on_revoke: RevokeCallback,
    ) -> Membership: ...

    @abc.abstractmethod
    async def commit(self, group: str, topic: str, offsets: dict[int, int]) -> None:
        """Record that `group` has processed `topic` up to these offsets."""

    @abc.abstractmethod
    async def committed(self, group: str, topic: str) -> dict[int, int]: ...
