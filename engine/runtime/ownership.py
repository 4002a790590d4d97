"""Partition ownership: claim, rebuild, tail, revoke.

Lifecycle of an owned partition:

1. Rebuild: load the partition's newest snapshot (engine/runtime/snapshots.py;
   none: start from offset 0) and fold the rest of the partition into
   its `PartitionRuns`.
2. Claim: append PartitionClaimed with an epoch above every epoch seen and
   the group's generation, then read up to the claim, so nothing a previous
   owner wrote before it is missed. From here on events of older epochs are
   dropped by the projection.
3. Resume: every live run is put back where it belongs (the decider,
   engine/runtime/deciding.py): ready to start, on a timer (delays, retries,
   sleeps), or restarted if it was running when the previous owner died.
4. Tail: new events are folded in log order, and each touched run is
   re-examined (`Decider.react`).

On revoke everything for the partitions stops before anyone else may own
them, and a recent snapshot is left for the next owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from stepline.core import codec
from stepline.core.events import Event, PartitionClaimed, PauseChanged
from stepline.core.ids import new_event_id
from stepline.errors import LogError, SchemaError
from stepline.log.appender import Appender
from stepline.log.base import Assignment, Log
from stepline.log.quarantine import quarantine
from stepline.log.topics import Topics
from stepline.projections import catchup
from stepline.projections.packing import JsonPacker
from stepline.projections.runs import PartitionRuns, RunState
from stepline.projections.snapshot import SnapshotError
from stepline.runtime.background import Background
from stepline.runtime.deciding import Decider
from stepline.runtime.owned import Owned
from stepline.runtime.slots import Slots
from stepline.runtime.snapshots import SnapshotStore

log = structlog.get_logger("stepline.worker")


def _claim_epoch(value: bytes) -> int | None:
    try:
        return codec.decode(value).epoch
    except SchemaError:
        return None


class Partitions:
    def __init__(
        self,
        log_: Log,
        topics: Topics,
        owned: Owned,
        appender: Appender,
        decider: Decider,
        slots: Slots,
        background: Background,
        *,
        worker_id: str,
        clock: Callable[[], int],
        read_batch: int,
        snapshot_every: int,
        keep_ended: int | None = None,
    ) -> None:
        self.log = log_
        self.topics = topics
        self._owned = owned
        self._background = background
        self.worker_id = worker_id
        self.clock = clock
        self.read_batch = read_batch
        # Events folded between snapshots of a partition; a revoke also
        # snapshots when at least a tenth of that has accumulated.
        self.snapshot_every = snapshot_every
        # Offsets a run that ended for good stays whole in memory before only
        # its id is kept (PartitionRuns.keep_ended); None keeps them all.
        self.keep_ended = keep_ended
        # Suspended runs are kept packed (projections/packing.py): a sleeper
        # costs a few hundred bytes instead of a couple of kilobytes.
        self._packer = JsonPacker()
        self._folded_since: dict[int, int] = {}
        # Where each claimed partition's rebuild started (0 without a snapshot).
        self.rebuilt_from: dict[int, int] = {}
        self._readers: dict[int, asyncio.Task[None]] = {}
        # Partitions let go on seeing a newer claim, still winding down: a
        # revoke or a new claim of the same partition waits for that first.
        self._losing: dict[int, asyncio.Task[None]] = {}
        self._snapshots = SnapshotStore(log_, topics.snapshots)
        # Claims are appended through the worker's appender; the runs of
        # owned partitions are the decider's to act on.
        self._appender = appender
        self._decider = decider
        self._slots = slots

    async def on_assign(self, assignment: Assignment) -> None:
        for p in sorted(assignment.partitions):
            await self._claim(p, assignment.generation)
        # Start only once every partition is rebuilt, so the first runs
        # admitted are the best by priority across all of them.
        self._decider.pump()

    async def on_revoke(self, partitions: frozenset[int]) -> None:
        """Stop everything for these partitions before anyone else may own them."""
        readers, leaving = self._let_go(partitions)
        for reader in readers:
            reader.cancel()
        await self._wind_down(partitions, readers, leaving)
        await self._lost_wound_down(partitions)

    async def _lost_wound_down(self, partitions: frozenset[int]) -> None:
        pending = [t for p in partitions if (t := self._losing.pop(p, None)) is not None]
        await asyncio.gather(*pending, return_exceptions=True)

    def _let_go(self, partitions: frozenset[int]) -> tuple[list[asyncio.Task[None]], list[PartitionRuns]]:
        """Forget the partitions at once, without waiting: no run of theirs
        starts from here on (a run ending frees a slot, and the pump would
        otherwise pick a queued run of a partition being let go), and nothing
        more is written for them (the fence needs their epoch)."""
        owned = self._owned
        readers = [self._readers.pop(p) for p in partitions if p in self._readers]
        leaving = [part for p in partitions if (part := owned.parts.pop(p, None)) is not None]
        for p in partitions:
            owned.epochs.pop(p, None)
        self._slots.forget(lambda rid: owned.partition_of(rid) in partitions)
        owned.forget(partitions)
        return readers, leaving

    async def _wind_down(self, partitions: frozenset[int], readers: list[asyncio.Task[None]],
                         leaving: list[PartitionRuns]) -> None:
        doomed = self._decider.stop_attempts(partitions)
        await asyncio.gather(*readers, *doomed, return_exceptions=True)
        for p in partitions:
            await self.log.unfence(self.topics.runs, p)
        # Leave a recent snapshot for the next owner. Its state is a fold of
        # a log prefix, valid whoever writes it, even after losing ownership.
        for part in leaving:
            if self._folded_since.get(part.partition, 0) >= max(1, self.snapshot_every // 10):
                await self._snapshot(part)

    def _claimed_elsewhere(self, p: int, part: PartitionRuns) -> bool:
        """A newer owner's claim was folded: this worker lost `p` without
        being told (paused or cut off past its session, the group moved on).
        Let it go now rather than at the revoke its group will send: the
        steps in flight stop, and those waiting for their checkpoint to be
        read back learn it was fenced."""
        if part.epoch == self._owned.epochs.get(p):
            return False
        log.warning("partition claimed by a newer owner while owned here; letting it go", partition=p,
                    epoch=self._owned.epochs.get(p), newer=part.epoch, worker=self.worker_id)
        lost = frozenset({p})
        _, leaving = self._let_go(lost)  # its reader is the running tail, which ends here
        self._losing[p] = asyncio.create_task(self._wind_down(lost, [], leaving), name=f"stepline-lost-{p}")
        return True

    async def _claim(self, p: int, generation: int) -> None:
        await self._lost_wound_down(frozenset({p}))
        # Fence before the claim is written: a previous owner's transaction
        # (a checkpoint with emitted records) either committed before our
        # claim, and is accepted, or is aborted now and can never commit.
        await self.log.fence(self.topics.runs, p)
        part = await self._load_snapshot(p)
        self.rebuilt_from[p] = part.next_offset
        await self.catch_up(part, await self.log.end_offset(self.topics.runs, p))
        # What the rebuild folded counts towards the next snapshot: a worker
        # restarted more often than `snapshot_every` events arrive would
        # otherwise never write one, and every restart would rebuild from 0.
        self._folded_since[p] = part.next_offset - self.rebuilt_from[p]
        epoch = max(generation, part.epoch + 1)
        claim = Event(
            new_event_id(), PartitionClaimed.TYPE, "", "", 0, self.clock(), epoch,
            PartitionClaimed(p, self.worker_id),
        )
        await self._appender.submit(claim, b"", p)
        await self.catch_up(part, await self.log.end_offset(self.topics.runs, p))
        if part.epoch != epoch:  # someone claimed after us: we are already fenced
            log.warning("partition claimed by a newer owner", partition=p, epoch=epoch)
            await self.log.unfence(self.topics.runs, p)
            return
        self._owned.epochs[p] = epoch
        self._owned.parts[p] = part
        live = list(part.live_runs())
        self._decider.claimed(live)
        log.info("partition claimed", partition=p, epoch=epoch, live_runs=len(live),
                 worker=self.worker_id)
        self._readers[p] = asyncio.create_task(self._tail(p), name=f"stepline-tail-{p}")
        if self._folded_since[p] >= self.snapshot_every:
            # A long rebuild: leave a snapshot now so the next owner starts there.
            self._background.spawn(self._snapshot(part), name=f"stepline-snapshot-{p}")

    async def _load_snapshot(self, p: int) -> PartitionRuns:
        try:
            part = await self._snapshots.load(p)
        except (SnapshotError, LogError) as exc:
            log.warning("snapshot unusable, rebuilding from offset 0", partition=p, error=str(exc))
            part = None
        part = part if part is not None else PartitionRuns(p)
        part.keep_ended = self.keep_ended
        part.runs.use(self._packer)
        return part

    async def _snapshot(self, part: PartitionRuns) -> None:
        try:
            await self._snapshots.save(part)
            self._folded_since[part.partition] = 0
        except LogError as exc:  # a shortcut lost, nothing else
            log.warning("could not write a snapshot", partition=part.partition, error=str(exc))

    async def catch_up(self, part: PartitionRuns, end: int) -> None:
        while part.next_offset < end:
            recs = await self.log.read(self.topics.runs, part.partition, part.next_offset, self.read_batch)
            if not recs:
                return  # the rest below `end` holds no record (Kafka transaction markers)
            # Runs that end and leave the compaction window within the
            # rebuild are recorded as ended without decoding their events.
            skip = catchup.plan(part, [r.value for r in recs], [r.offset for r in recs], end,
                                codec.peek_envelope, _claim_epoch)
            for i, r in enumerate(recs):
                if i in skip.skip:
                    continue
                ev = self._decode(r.value, part.partition, r.offset)
                if ev is not None:
                    self._owned.fold(part, ev, r.offset)
            part.ended.update(skip.ended)
            part.fenced += skip.fenced
            part.next_offset = recs[-1].offset + 1

    def _decode(self, value: bytes, p: int, offset: int) -> Event | None:
        own = self._owned.appended(p, offset)
        if own is not None:
            return own
        try:
            return codec.decode(value)
        except SchemaError as exc:
            # Never block the partition on one bad record; keep it aside
            # with the reason (a rebuild meets it again: one entry per place).
            log.error("undecodable event quarantined", partition=p, offset=offset, error=str(exc))
            self._background.spawn(quarantine(self.log, self.topics.quarantine, self.topics.runs, p,
                                              offset, value, str(exc), f"worker {self.worker_id}"))
            return None

    async def _tail(self, p: int) -> None:
        decider = self._decider
        part = self._owned.parts[p]
        topic = self.topics.runs
        while True:
            recs = await self.log.read(topic, p, part.next_offset, self.read_batch, timeout=1.0)
            touched: dict[str, RunState] = {}
            for r in recs:
                ev = self._decode(r.value, p, r.offset)
                if ev is None:
                    part.next_offset = r.offset + 1
                    continue
                st = self._owned.fold(part, ev, r.offset)
                if st is not None:
                    touched[st.run_id] = st
                elif isinstance(ev.body, PauseChanged):
                    touched.update(decider.paused_runs(part, ev.body))
            if self._claimed_elsewhere(p, part):
                return
            self._owned.caught_up(p)
            for st in touched.values():
                decider.react(st)
            if touched:
                decider.pump()
            folded = self._folded_since[p] = self._folded_since.get(p, 0) + len(recs)
            if folded >= self.snapshot_every:
                await self._snapshot(part)
