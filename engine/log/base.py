"""The log port: the one interface every backend implements.

Everything above this module (worker, client, projections, CLI) talks to a
`Log` and never imports sqlite3 or aiokafka. The contract test suite in
`tests/test_log_contract.py` runs against every adapter.

Semantics, shared by all backends:

* A topic has a fixed number of partitions; offsets in a partition start at
  0 and grow by one per record, with no gaps, except on Kafka once
  transactions write to it (`append_atomic`): a transaction's commit or
  abort marker, and the records of an aborted one, take offsets no read
  returns. A read with `timeout=0` that returns nothing therefore means "no
  readable record from here to the end offset", so loops of the form
  `while offset < end` must stop on an empty read rather than spin.
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
* Records may carry headers (`headers=`, one tuple of (name, value) pairs
  per record) where the backend keeps them (`record_headers`: Kafka, so
  other tools can filter without decoding); the others accept and drop
  them, and a record's key and value are the same either way.
* Retention (`stepline prune`): `remove` takes chosen records out of a
  partition (sqlite), `delete_before` a partition's prefix (Kafka's
  DeleteRecords). Offsets never move: the records left keep theirs, a read
  from a removed offset returns the next record kept, and `end_offset`
  never goes back, so offsets stored elsewhere (snapshots, the query
  projection, consumer groups) stay valid.
* Atomic appends (`append_atomic`, what `sl.emit` rides on) exist only where
  the backend has transactions (`transactional`): the Kafka log. A
  partition's owner calls `fence` when it claims the partition; from then on
  no earlier holder can commit a transaction to it.
"""

from __future__ import annotations

import abc
import struct
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from ..core.frozen import fast_init
from ..errors import EmitUnsupported, RetentionUnsupported

_WORDS = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp_ms: int


# One per record read, on every backend, by every tail and watcher.
fast_init(Record)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    # None keeps records forever; run history is never compacted away.
    retention_ms: int | None = None
    # A table keyed by record key (the latest value per key matters), not a history.
    compact: bool = False


# Per-record headers: (name, value) pairs, as Kafka record headers.
Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A record for a topic outside the engine (`sl.emit`), written in the
    same transaction as engine events by `Log.append_atomic`."""

    topic: str  # the broker's own name: no namespace prefix is added
    key: bytes | None
    value: bytes
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class Assignment:
    partitions: frozenset[int]
    generation: int


AssignCallback = Callable[[Assignment], Awaitable[None]]
RevokeCallback = Callable[[frozenset[int]], Awaitable[None]]


def partition_for(key: bytes, partitions: int) -> int:
    """Which partition of an engine topic (runs, queues, waits...) a key
    lives in. Every backend and client uses this.

    CRC-32 is stable across processes and Python versions (unlike `hash`).
    Never change it: existing logs place runs by this function. The events
    topic, which other services publish to, uses `kafka_partition_for`.
    """
    return zlib.crc32(key) % partitions


def kafka_partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for `key`: the Java
    client's `toPositive(murmur2(key)) % n` (aiokafka's and librdkafka's
    `murmur2_random` agree). Stepline places the events topic's keys by it,
    on every backend, so a service in another language that publishes with
    the same key keeps per-key order with Stepline's publishes."""
    return (_murmur2(key) & 0x7FFFFFFF) % partitions


def _murmur2(data: bytes) -> int:
    """MurmurHash2 (32-bit, seed 0x9747b28c) as org.apache.kafka.common.utils.Utils.murmur2,
    as an unsigned 32-bit value."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    whole = length - length % 4
    for (k,) in _WORDS.iter_unpack(data[:whole]):
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    rest = length - whole
    if rest:
        if rest == 3:
            h ^= data[whole + 2] << 16
        if rest >= 2:
            h ^= data[whole + 1] << 8
        h ^= data[whole]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h


async def skip_unreadable(log_: Log, topic: str, partition: int, offset: int) -> int:
    """Where a reader that found nothing at `offset` goes on from: `offset`
    itself, or the end offset when only offsets without records (Kafka
    transaction markers, aborted records) lie in between. The end is read
    first: everything below it is settled, so an empty read from `offset`
    then proves there is nothing to skip over."""
    if not log_.transactional:
        return offset
    end = await log_.end_offset(topic, partition)
    if offset >= end or await log_.read(topic, partition, offset, 1):
        return offset
    return end


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
    async def topic_names(self, prefix: str = "") -> list[str]:
        """The names of the topics that exist and start with `prefix`, sorted
        (how readers find the runs topics of worker pools)."""

    # Whether appends keep `headers=` (Kafka). Writers build headers only
    # then, and pass them only then, so a Log written before headers
    # existed keeps working.
    record_headers: bool = False

    @abc.abstractmethod
    async def append(
        self,
        topic: str,
        partition: int,
        records: Sequence[tuple[bytes, bytes]],
        headers: Sequence[Headers] | None = None,
    ) -> list[int]:
        """Append (key, value) pairs to one partition; return their offsets.
        `headers`, one per record, are kept where `record_headers` is set."""

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

    async def offset_for_time(self, topic: str, partition: int, time_ms: int) -> int:
        """The first offset whose record timestamp is at or after `time_ms`
        (the end offset when there is none): where a scan "since then" starts.

        This default bisects with single-record reads, O(log n), which
        assumes timestamps grow with offsets. Writers' clocks may disagree a
        little, so callers that need exactness start a margin earlier and
        filter by the events' own times. Kafka answers from its time index.
        """
        lo, hi = 0, await self.end_offset(topic, partition)
        while lo < hi:
            mid = (lo + hi) // 2
            found = await self.read(topic, partition, mid, 1)
            if not found:
                return hi
            if found[0].timestamp_ms < time_ms:
                lo = found[0].offset + 1
            else:
                hi = mid
        return lo

    # --- retention: what `stepline prune` removes ---

    # Whether `remove` can take single records out of a partition (sqlite);
    # Kafka deletes whole prefixes (`delete_before`) only.
    removes_records: bool = False

    async def start_offset(self, topic: str, partition: int) -> int:
        """The lowest offset a record may still be kept at (Kafka's log start
        offset; 0 where records are removed one by one)."""
        return 0

    async def remove(self, topic: str, partition: int, records: Mapping[bytes, Sequence[int]],
                     below: int) -> list[bytes]:
        """Remove records chosen by offset, grouped by key, in one atomic step;
        return the keys whose records were removed.

        A key with any record at or after `below` (the end offset the caller
        planned against) is left whole: something was appended for it since,
        such as a retry of a run being pruned. Offsets are not renumbered.
        """
        raise RetentionUnsupported(f"{self.url} cannot remove records; prune works on sqlite:// and kafka://")

    async def delete_before(self, topic: str, partition: int, offset: int) -> None:
        """Remove every record of the partition below `offset`."""
        raise RetentionUnsupported(f"{self.url} cannot delete records; prune works on sqlite:// and kafka://")

    # --- transactions: only a backend that sets `transactional` has them ---

    transactional: bool = False

    async def fence(self, topic: str, partition: int) -> None:
        """Become the partition's only transactional writer: every earlier
        holder's open transaction on it is aborted and its later commits
        fail. The partition's owner calls this on claim, before it writes
        its claim. A no-op where there are no transactions."""
        return None

    async def unfence(self, topic: str, partition: int) -> None:
        """Give the partition's transactional writer up (on revoke)."""
        return None

    async def check_outgoing(self, topic: str) -> None:
        """Raise unless `append_atomic` can write records to `topic`:
        EmitUnsupported without transactions, UnknownTopic for a missing topic."""
        raise EmitUnsupported(self.url)

    async def append_atomic(
        self,
        topic: str,
        partition: int,
        records: Sequence[tuple[bytes, bytes]],
        outgoing: Sequence[Outgoing],
        headers: Sequence[Headers] | None = None,
    ) -> list[int]:
        """Append like `append`, and write `outgoing` to their topics, in one
        transaction: readers see all of it or none. Needs `fence` first."""
        raise EmitUnsupported(self.url)

    @abc.abstractmethod
    async def join_group(
        self,
        group: str,
        topic: str,
        on_assign: AssignCallback,
        on_revoke: RevokeCallback,
        *,
        instance_id: str | None = None,
    ) -> Membership:
        """Join `group` for `topic`'s partitions; returns once assigned.

        `instance_id` is the member's stable identity where the log has one
        (Kafka's static membership, `group.instance.id`): a member joining
        with the instance id of one that vanished (killed, restarted) takes
        its place and its partitions at once, instead of after the vanished
        member's session expires. Two live members must never share one.
        Logs without such a thing ignore it."""

    def split_groups(self, member: int, members: int) -> None:
        """This process is member `member` (0-based) of `members` processes
        started together (`stepline worker --processes N`). A log whose groups
        do not balance themselves (sqlite: a flock per partition) then gives
        this process, in every group it joins, only the partitions p with
        p % members == member. Logs that balance their groups (Kafka) and
        in-process ones (memory) ignore it."""
        if not 0 <= member < members:
            raise ValueError(f"member {member} of {members}: needs 0 <= member < members")

    async def group_alive(self, group: str) -> bool | None:
        """Whether `group` has a member now (some worker of it is running),
        as far as the log can tell; None when it cannot tell. For people
        (`stepline runs why`), never for deciding ownership."""
        return None

    @abc.abstractmethod
    async def commit(self, group: str, topic: str, offsets: dict[int, int]) -> None:
        """Record that `group` has processed `topic` up to these offsets."""

    @abc.abstractmethod
    async def committed(self, group: str, topic: str) -> dict[int, int]: ...
