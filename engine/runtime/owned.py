"""The worker's table of owned partitions: their runs as folded so far.

Per owned partition: its `PartitionRuns` and the epoch of this worker's
claim (the epoch its events are fenced with, engine/runtime/fence.py). The
interceptors see every event folded here (tracing keeps each live run's
trigger context, engine/sdk/interceptors.py). And the events this worker
appended and has not read back yet: it folds its own events when it reads
them back, in log order like everyone else's; to save decoding, they are
kept by offset until then.

A checkpoint is handed back to the step that wrote it only once it has
been read back here (`read_back`): folding the partition up to it shows
whether a newer owner claimed the partition first, while this worker was
paused or cut off and its append waited. Then the checkpoint is fenced,
and the step must not go on to the next one, which the new owner may have
completed already. When every offset between the fold's position and the
checkpoint is one of this worker's own appends, no claim can be among
them, and the checkpoint is handed back at once.

Every other part of the worker looks runs up here; only the ownership part
(engine/runtime/ownership.py) adds and removes partitions.
"""

from __future__ import annotations

import asyncio

from stepline.core.events import Event
from stepline.log.base import partition_for
from stepline.projections.runs import PartitionRuns, RunState
from stepline.sdk.interceptors import Interceptors


class Owned:
    def __init__(self, hooks: Interceptors) -> None:
        self.nparts = 0  # of the runs topic, known once the worker starts
        self.parts: dict[int, PartitionRuns] = {}
        self.epochs: dict[int, int] = {}
        self._hooks = hooks
        self._own: dict[tuple[int, int], Event] = {}
        # Per partition: appends waiting to be read back (offset, claim epoch, future).
        self._reading_back: dict[int, list[tuple[int, int, asyncio.Future[int]]]] = {}
        # Per partition: where the run of this worker's own appends that
        # starts at the fold's position ends. Every offset between the two is
        # ours, so no newer claim is among them: an append below it needs no
        # reading back (the common case, which then costs nothing).
        self._own_end: dict[int, int] = {}

    def partition_of(self, run_id: str) -> int:
        return partition_for(run_id.encode(), self.nparts)

    def part_of(self, run_id: str) -> PartitionRuns | None:
        return self.parts.get(self.partition_of(run_id))

    def state(self, run_id: str) -> RunState | None:
        part = self.part_of(run_id)
        return None if part is None else part.runs.get(run_id)

    def fold(self, part: PartitionRuns, ev: Event, offset: int) -> RunState | None:
        """Fold one event, and show it to the interceptors."""
        st = part.apply(ev, offset)
        if st is not None:
            self._hooks.folded(ev, st, part.partition, offset)
        return st

    def forget(self, partitions: frozenset[int]) -> None:
        """The partitions are given up: the interceptors drop what they kept of
        their runs, and appends waiting to be read back there never will be."""
        self._hooks.released(partitions, self.partition_of)
        for p in partitions:
            self._own_end.pop(p, None)
            for _, _, fut in self._reading_back.pop(p, []):
                fut.cancel()

    def read_back(self, p: int, epoch: int, offset: int, out: asyncio.Future[int]) -> None:
        """Resolve `out` to `offset` once partition `p` is folded past it
        under the claim of `epoch`; cancel it if the claim is gone by then (a
        newer owner's claim came first, or the partition was revoked).

        Settled here and now when it can be (the common case): a future of
        its own would cost the step another turn of the loop."""
        part = self.parts.get(p)
        if out.done():
            return
        if part is None or self.epochs.get(p) != epoch:
            out.cancel()
        elif part.next_offset > offset or offset < self._own_end.get(p, 0):
            out.set_result(offset)
        else:
            self._reading_back.setdefault(p, []).append((offset, epoch, out))

    def caught_up(self, p: int) -> None:
        """The tail folded more of `p`: settle the appends it has read back."""
        waiting = self._reading_back.get(p)
        if not waiting:
            return
        part, epoch = self.parts.get(p), self.epochs.get(p)
        left = []
        for offset, claimed, fut in waiting:
            if fut.done():
                continue
            if part is None or epoch != claimed:
                fut.cancel()
            elif part.next_offset > offset:
                fut.set_result(offset)
            else:
                left.append((offset, claimed, fut))
        self._reading_back[p] = left

    def on_appended(self, p: int, offsets: list[int], events: list[Event]) -> None:
        """The Appender's callback: keep our own events until read back."""
        part = self.parts.get(p)
        if part is None:
            return
        for off, ev in zip(offsets, events):
            if off >= part.next_offset:
                self._own[(p, off)] = ev
        if offsets and offsets[0] == max(self._own_end.get(p, 0), part.next_offset) \
                and offsets[-1] - offsets[0] == len(offsets) - 1:
            self._own_end[p] = offsets[-1] + 1

    def appended(self, p: int, offset: int) -> Event | None:
        """The event this worker appended at `offset`, once, if it still has it."""
        return self._own.pop((p, offset), None)

    # --- introspection (tests, CLI, gauges) -----------------------------------

    def runs(self) -> dict[str, RunState]:
        out: dict[str, RunState] = {}
        for part in self.parts.values():
            out.update(part.runs)
        return out

    def run_counts(self) -> dict[str, int]:
        """Runs of the owned partitions by state (the `stepline.partition.runs` gauge)."""
        counts: dict[str, int] = {}
        for part in list(self.parts.values()):
            for status, n in part.run_counts().items():
                counts[status] = counts.get(status, 0) + n
        return counts
