"""The query projection: every run and domain event in SQLite, for the API's lists.

`QueryProjector` follows the log into a `QueryStore` (projections/
query_store.py): the runs topic through a consumer group of its own, and
every partition of the events topic. Run events go through the same pure
fold as everywhere else (`PartitionRuns` / `fold_run`); a run's state is
kept in memory (an LRU) and, when it is not there, read back from the
state JSON the store keeps beside its row, so resuming never refolds.

Where it resumes is the store's own offsets, written in the same
transaction as the rows (see query_store.py), never the group's commits:
the group only decides which process follows which runs partition.

The group is `<namespace>.query.<db id>`, one per database file: every
projection needs every partition, so two servers with databases of their
own must not share a group (they would split the partitions between them
and each list half the runs), while two processes on one file do share it.

`rebuild()` drops a projection and builds it again from offset 0; it is
what `stepline replay --projection query` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import structlog

from stepline.core import codec
from stepline.core.events import Event, PauseChanged
from stepline.errors import SchemaError, UnknownTopic
from stepline.log import open_log
from stepline.log.base import Assignment, Log, Membership, Record, skip_unreadable
from stepline.log.topics import DEFAULT_NAMESPACE, DEFAULT_POOL, Topics
from stepline.projections.query_store import (
    DEFAULT_QUERY_DB,
    Page,
    QueryProjectionError,
    QueryStore,
    RunFeed,
    RunFilter,
    StaleOffsets,
)
from stepline.projections.runs import PartitionRuns, RunState

log = structlog.get_logger("stepline.query")

Progress = Callable[[int, int], None]

# Run states kept in memory across all runs partitions; a miss costs one
# indexed read of the run's state JSON.
DEFAULT_CACHE_RUNS = 50_000
# After a follower fails (the log went away), wait this long before retrying.
RETRY_DELAY_S = 1.0
# How often a following projector looks for the runs topic of a worker pool
# that appeared after it started (a pool's first trigger creates it).
POOL_SCAN_S = 5.0


class _RunsPartition:
    """One runs partition's fold, its states in an LRU over the store."""

    def __init__(self, partition: int, next_offset: int, epoch: int, cache_size: int) -> None:
        self.part = PartitionRuns(partition, epoch=epoch, next_offset=next_offset)
        # From offset 0 with nothing evicted, a run not in memory does not
        # exist yet: no need to ask the store.
        self.complete = next_offset == 0
        self.cache_size = max(1, cache_size)

    async def fold(self, store: QueryStore, events: list[tuple[int, Event]]) -> dict[str, RunState]:
        """Apply a batch; the runs it changed, at their latest state."""
        runs = self.part.runs
        ids = {ev.run_id for _, ev in events if ev.run_id}
        if not self.complete:
            missing = [i for i in ids if i not in runs]
            if missing:
                runs.update(await store.load_runs(missing))
        for i in ids:  # most recently used last
            if i in runs:
                runs[i] = runs.pop(i)
        changed: dict[str, RunState] = {}
        for offset, ev in events:
            before = runs.get(ev.run_id)
            after = self.part.apply(ev, offset)
            if after is not None and after is not before:
                changed[ev.run_id] = after
        return changed

    def trim(self) -> None:
        """Evict the least recently used states; call once the batch is stored."""
        runs = self.part.runs
        excess = len(runs) - self.cache_size
        if excess > 0:
            self.complete = False
            for run_id in list(itertools.islice(runs, excess)):
                del runs[run_id]


def _decode(recs: list[Record], topic: str) -> list[tuple[int, Event]]:
    out = []
    for r in recs:
        try:
            out.append((r.offset, codec.decode(r.value)))
        except SchemaError as exc:
            # The projection is a view: a record it cannot read is skipped,
            # not allowed to stop every list.
            log.warning("skipping a record the query projection cannot decode", topic=topic,
                        partition=r.partition, offset=r.offset, error=str(exc))
    return out


class QueryProjector:
    """Follows the log into a QueryStore. Start it, then read the store.

    `store.feed` tells listeners (the SSE stream) which runs each write changed.
    """

    def __init__(
        self, log: Log, store: QueryStore, *, topics: Topics | None = None,
        batch: int = 2000, cache_runs: int = DEFAULT_CACHE_RUNS,
        on_applied: Callable[[int], None] | None = None,
    ) -> None:
        self.log = log
        self.store = store
        self.topics = topics or Topics()
        self.batch = batch
        self.cache_runs = cache_runs
        self.on_applied = on_applied
        self.applied = 0
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._joiner: asyncio.Task[None] | None = None
        # One group membership per worker pool's runs topic (the Log port
        # joins a group to one topic), by topic.
        self._memberships: dict[str, Membership] = {}
        self._runs_topics: list[str] = [self.topics.runs]
        self._runs_partitions = 1

    @property
    def group(self) -> str:
        return f"{self.topics.namespace}.query.{self.store.db_id}"

    @property
    def feed(self) -> RunFeed:
        return self.store.feed

    async def __aenter__(self) -> QueryProjector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Follow every events partition now, and the runs partitions the group gives us.

        Joining the group waits while another process on the same database
        holds its seat (sqlite and memory logs have one); that happens in
        the background, so start() returns at once.
        """
        if not self.store.db_id:
            raise QueryProjectionError("open the QueryStore before starting its projector")
        await self.log.ensure_topics(self.topics.specs())
        await self._find_runs_topics()
        await self._forget_if_log_replaced()
        for p in range(await self.log.partitions(self.topics.events)):
            self._spawn(self.topics.events, p)
        self._joiner = asyncio.create_task(self._supervise(self._join), name="stepline-query-join")

    async def _find_runs_topics(self) -> list[str]:
        """Every worker pool's runs topic on the log (the default pool's first);
        returns those not known before."""
        found = [name for name in await self.log.topic_names(self.topics.runs_prefix)
                 if self.topics.pool_of(name) is not None]
        new = [name for name in found if name not in self._runs_topics]
        self._runs_topics += new
        self._runs_partitions = sum([await self.log.partitions(t) for t in self._runs_topics])
        return new

    async def close(self) -> None:
        if self._joiner is not None:
            self._joiner.cancel()
            await asyncio.gather(self._joiner, return_exceptions=True)
            self._joiner = None
        for membership in self._memberships.values():
            await membership.leave()
        self._memberships.clear()
        await self._stop(list(self._tasks))

    async def _forget_if_log_replaced(self) -> None:
        """A store of another log, or ahead of this one (a new memory://, a
        deleted file), starts over: it would never match the log again."""
        identity = await self._log_identity()
        known = await self.store.meta("log_identity")
        if identity is not None and known != identity:
            if known is not None:
                log.warning("the query projection is of another log; rebuilding it", path=str(self.store.path))
                await self.store.reset()
            await self.store.set_meta("log_identity", identity)
            if known is not None:
                return
        for topic in (*self._runs_topics, self.topics.events):
            for p, (offset, _) in (await self.store.offsets(topic)).items():
                try:
                    end = await self.log.end_offset(topic, p)
                except UnknownTopic:
                    end = 0
                if offset > end:
                    log.warning("the query projection is ahead of the log; rebuilding it",
                                path=str(self.store.path), topic=topic, partition=p, stored=offset, end=end)
                    await self.store.reset()
                    return

    async def _log_identity(self) -> str | None:
        """The log's first default-pool runs record, hashed: None while that topic is empty."""
        return await log_identity(self.log, self.topics.runs, await self.log.partitions(self.topics.runs))

    async def _join(self) -> None:
        """Join each pool's runs topic's group, and look for new pools now and then."""
        for topic in list(self._runs_topics):
            await self._join_topic(topic)
        while True:
            await asyncio.sleep(POOL_SCAN_S)
            for topic in await self._find_runs_topics():
                await self._join_topic(topic)

    async def _join_topic(self, topic: str) -> None:
        if topic in self._memberships:
            return
        pool = self.topics.pool_of(topic)
        group = self.group if pool == DEFAULT_POOL else f"{self.group}.{pool}"

        async def on_assign(assignment: Assignment) -> None:
            for p in sorted(assignment.partitions):
                self._spawn(topic, p)

        async def on_revoke(partitions: frozenset[int]) -> None:
            await self._stop([(topic, p) for p in partitions])

        self._memberships[topic] = await self.log.join_group(group, topic, on_assign, on_revoke)

    async def _stop(self, keys: list[tuple[str, int]]) -> None:
        tasks = [t for k in keys if (t := self._tasks.pop(k, None)) is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, topic: str, p: int) -> None:
        running = self._tasks.get((topic, p))
        if running is not None and not running.done():
            return  # assigned again without a revoke in between: keep following
        self._tasks[(topic, p)] = asyncio.create_task(
            self._supervise(lambda: self.follow(topic, p)), name=f"stepline-query-{topic}-{p}")

    async def _supervise(self, make: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while True:
            try:
                await make()
                return
            except asyncio.CancelledError:
                raise
            except StaleOffsets as exc:
                log.info("query projection reloads a partition", reason=str(exc))
            except Exception:
                log.exception("query projection follower failed; retrying", delay_s=RETRY_DELAY_S)
                await asyncio.sleep(RETRY_DELAY_S)

    # --- following ---------------------------------------------------------------

    async def follow(self, topic: str, p: int, until: int | None = None) -> None:
        """Project one partition from the store's offset on; up to `until` (exclusive), or forever."""
        offset, epoch = (await self.store.offsets(topic)).get(p, (0, 0))
        runs = topic in self._runs_topics
        fold = _RunsPartition(p, offset, epoch, self.cache_runs // max(1, self._runs_partitions)) if runs else None
        while until is None or offset < until:
            raw = await self.log.read(topic, p, offset, self.batch, timeout=1.0)
            recs = raw if until is None else [r for r in raw if r.offset < until]
            if not recs:
                if raw:
                    return  # all below `until` is done; gaps (see below) came before it
                if runs:
                    # Kafka transactions (stepline.emit) leave markers that no
                    # read returns: step over them, or the stored offset would
                    # never reach the end offset (wait_caught_up, lag, rebuild).
                    skipped = await skip_unreadable(self.log, topic, p, offset)
                    if skipped > offset:
                        await self.store.apply_batch(topic, p, offset, skipped, epoch=fold.part.epoch if fold else 0)
                        offset = skipped
                continue
            events = _decode(recs, topic)
            end = recs[-1].offset + 1
            if fold is not None:
                changed = await fold.fold(self.store, events)
                pauses = [ev for _, ev in events if isinstance(ev.body, PauseChanged)]
                await self.store.apply_batch(topic, p, offset, end, runs=changed.values(), epoch=fold.part.epoch,
                                             pauses=pauses)
                fold.trim()
            else:
                await self.store.apply_batch(topic, p, offset, end, events=events)
            offset = end
            self.applied += len(recs)
            if self.on_applied is not None:
                self.on_applied(len(recs))

    async def catch_up(self) -> None:
        """Bring the store up to the runs topic's ends as of the call, without
        joining the group (a one-off reader such as `stepline runs cancel`).

        Safe beside a server following the same file: a batch another
        projector wrote first is refused whole (StaleOffsets), and this
        reads on from wherever the store then is.
        """
        await self.log.ensure_topics(self.topics.specs())
        await self._find_runs_topics()
        await self._forget_if_log_replaced()
        for topic in self._runs_topics:
            for p in range(await self.log.partitions(topic)):
                end = await self.log.end_offset(topic, p)
                while True:
                    try:
                        await self.follow(topic, p, until=end)
                        break
                    except StaleOffsets:
                        continue

    async def lag(self) -> int:
        """Records on the log not yet in the store (both topics)."""
        behind = 0
        for topic in (*self._runs_topics, self.topics.events):
            stored = await self.store.offsets(topic)
            for p in range(await self.log.partitions(topic)):
                behind += max(0, await self.log.end_offset(topic, p) - stored.get(p, (0, 0))[0])
        return behind

    async def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until the store holds everything on the log as of the call."""
        targets: dict[tuple[str, int], int] = {}
        await self._find_runs_topics()
        for topic in (*self._runs_topics, self.topics.events):
            for p in range(await self.log.partitions(topic)):
                targets[(topic, p)] = await self.log.end_offset(topic, p)
        async with asyncio.timeout(timeout):
            while True:
                stored = {t: await self.store.offsets(t) for t in (*self._runs_topics, self.topics.events)}
                if all(stored[t].get(p, (0, 0))[0] >= end for (t, p), end in targets.items()):
                    return
                await asyncio.sleep(0.02)


# --- rebuilding ---------------------------------------------------------------------


async def log_identity(log_: Log, runs_topic: str, partitions: int) -> str | None:
    """The log's first runs record, hashed: None while the runs topic is empty.

    `stepline prune` may remove that record; it then stores the new identity
    in the read models it prunes, which would otherwise start over.
    """
    for p in range(partitions):
        first = await log_.read(runs_topic, p, 0, 1)
        if first and first[0].offset == 0:
            return f"{p}:{hashlib.sha256(first[0].value).hexdigest()[:32]}"
    return None


def _remove_db(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)


async def _ends(log_: Log, topics: Topics) -> dict[tuple[str, int], int]:
    ends: dict[tuple[str, int], int] = {}
    runs = [name for name in await log_.topic_names(topics.runs_prefix) if topics.pool_of(name) is not None]
    for topic in (*runs, topics.events):
        try:
            count = await log_.partitions(topic)
        except UnknownTopic:
            continue  # nothing was ever written there
        for p in range(count):
            ends[(topic, p)] = await log_.end_offset(topic, p)
    return ends


async def rebuild(
    log_url: str, db_path: str, progress: Progress | None = None, *, namespace: str = DEFAULT_NAMESPACE,
) -> int:
    """Drop the query projection at `db_path` and build it again from offset 0.

    Reads every partition of the runs and events topics up to their ends as
    of the call, reporting `progress(done, total)` records; returns the
    number of records applied. The new database is built beside the old one
    (`<db_path>.rebuild`) and moved over it at the end, so a failed rebuild
    leaves the old projection as it was. Stop servers using the file first.
    """
    topics = Topics(namespace=namespace)
    target = str(db_path)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    tmp = target + ".rebuild"
    _remove_db(tmp)
    done = 0
    async with open_log(log_url) as log_:
        ends = await _ends(log_, topics)
        total = sum(ends.values())
        if progress is not None:
            progress(0, total)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        async with QueryStore(tmp, bulk=True) as store:
            projector = QueryProjector(log_, store, topics=topics, batch=5000, on_applied=advance)
            projector._runs_topics = sorted({t for t, _ in ends if topics.pool_of(t) is not None})
            projector._runs_partitions = sum(1 for t, _ in ends if topics.pool_of(t) is not None) or 1
            await asyncio.gather(*(projector.follow(t, p, until=end) for (t, p), end in ends.items() if end))
            await store.finish_bulk()
    _remove_db(target)
    os.replace(tmp, target)
    return done


__all__ = [
    "DEFAULT_QUERY_DB",
    "Page",
    "QueryProjector",
    "QueryStore",
    "RunFilter",
    "rebuild",
]
