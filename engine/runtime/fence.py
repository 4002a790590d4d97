"""Appending a run's events, fenced by the epoch of its partition's claim.

Every event a worker writes for a run it owns carries the epoch of its
claim on the run's partition (engine/runtime/ownership.py), and the next
sequence number of the run; the projection drops events of older epochs,
so a replaced owner's late writes never count. Requests (to runs owned
here or not, such as a child's answer to its parent) go unfenced, with
epoch 0. Both go through the worker's Appender, which batches per
partition and keeps submission order.

A step's checkpoint (StepCompleted) is handed back to the step only once
the worker has read it back under its claim (`Owned.read_back`): an
acknowledged append is not an accepted one. A worker paused or cut off
past its session still gets its late appends acknowledged, after the new
owner's claim; they are fenced, and the step must not go on to the next
one, which the new owner may have completed already. Then the future is
cancelled, and the attempt ends as on a revoke.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from stepline.core.events import Body, Event, StepCompleted
from stepline.core.ids import new_event_id
from stepline.log.appender import Appender
from stepline.log.base import Outgoing
from stepline.log.topics import DEFAULT_POOL
from stepline.projections.runs import RunState, fold_run
from stepline.runtime.owned import Owned
from stepline.runtime.slots import Slots


def _copy_result(src: asyncio.Future[int], dst: asyncio.Future[int]) -> None:
    if dst.done():
        return
    if src.cancelled():
        dst.cancel()
    elif src.exception() is not None:
        dst.set_exception(src.exception())  # type: ignore[arg-type]
    else:
        dst.set_result(src.result())


# Appends a request to a run of another worker pool (on that pool's runs topic).
Foreign = Callable[[Event, str], "asyncio.Future[int]"]


class Fence:
    def __init__(self, owned: Owned, appender: Appender, slots: Slots, clock: Callable[[], int],
                 pool: str = DEFAULT_POOL, foreign: Foreign | None = None) -> None:
        self._owned = owned
        self._appender = appender
        self.pool = pool
        self._foreign = foreign
        self._slots = slots
        self._clock = clock
        # The last sequence number written per live run (the fold's may lag).
        self._seq: dict[str, int] = {}

    def emit(self, state: RunState, body: Body, traceparent: str | None = None,
             outgoing: Sequence[Outgoing] = ()) -> asyncio.Future[int]:
        rid = state.run_id
        p = self._owned.partition_of(rid)
        epoch = self._owned.epochs.get(p)
        if epoch is None:
            # The partition was revoked while this attempt went on (its code
            # swallowed the cancellation). Whatever it says now, the next
            # owner decides: write nothing, and end the attempt as a revoke
            # does. (Written, it would carry epoch 0, which every fold drops,
            # but a reader that started after the last claim, such as a
            # client awaiting a result, could not tell it was stale.)
            revoked: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            revoked.cancel()
            return revoked
        ev = self._event(state, body, epoch, traceparent)
        return self._submit(ev, p, epoch, body, outgoing)

    def emit_folded(self, state: RunState, body: Body) -> tuple[RunState, asyncio.Future[int]] | None:
        """Emit `body`; return the run's state with it folded in, as this
        worker's fold will make it when it reads the event back, and the
        append's future: None (and nothing written) if the partition is no
        longer owned here.

        Only for an event whose effect the fold cannot refuse given `state`:
        it carries the claim's epoch and the run's next sequence number, so
        the fold drops it only if a newer owner claimed the partition, and
        then every later event of this worker is dropped as well."""
        p = self._owned.partition_of(state.run_id)
        epoch = self._owned.epochs.get(p)
        if epoch is None:
            return None
        ev = self._event(state, body, epoch, None)
        appended = self._submit(ev, p, epoch, body, ())
        folded = fold_run(state, ev)
        assert folded is not None, "a live run's state folds to a state"
        return folded, appended

    def _event(self, state: RunState, body: Body, epoch: int, traceparent: str | None) -> Event:
        rid = state.run_id
        seq = max(self._seq.get(rid, 0), state.seq) + 1
        self._seq[rid] = seq
        return Event(new_event_id(), body.TYPE, rid, state.task_id, seq, self._clock(),
                     epoch, body, traceparent)

    def _submit(self, ev: Event, p: int, epoch: int, body: Body, outgoing: Sequence[Outgoing]) -> asyncio.Future[int]:
        rid = ev.run_id
        gate = self._slots.gate(rid, body)
        out: asyncio.Future[int] | None = None
        landed = None
        if isinstance(body, StepCompleted):
            out, landed = self._read_back(p, epoch)
        if gate is None:
            appended = self._appender.submit(ev, rid.encode(), p, outgoing, landed)
        else:
            # Later events of the run queue up behind the release, in order
            # (done-callbacks run in the order they were added).
            appended = asyncio.get_running_loop().create_future()

            def submit(_: asyncio.Future[int]) -> None:
                inner = self._appender.submit(ev, rid.encode(), p, outgoing)
                inner.add_done_callback(lambda f: _copy_result(f, appended))

            gate.add_done_callback(submit)
            if landed is not None:
                appended.add_done_callback(landed)
        return appended if out is None else out

    def _read_back(self, p: int, epoch: int) -> tuple[asyncio.Future[int], Callable[[asyncio.Future[int]], None]]:
        """The future a checkpoint's step awaits, and what settles it once
        the append landed (called by the Appender in the same turn of the
        loop: on the one-run-at-a-time path every turn is latency)."""
        out: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def landed(f: asyncio.Future[int]) -> None:
            if f.cancelled() or f.exception() is not None:
                _copy_result(f, out)
            else:
                self._owned.read_back(p, epoch, f.result(), out)

        return out, landed

    def request(self, run_id: str, task_id: str, body: Body, pool: str | None = None) -> asyncio.Future[int]:
        """Append a request (epoch 0, unfenced) to any run, owned here or not,
        of this worker's pool or of `pool` (a child answering its parent)."""
        ev = Event(new_event_id(), body.TYPE, run_id, task_id, 0, self._clock(), 0, body)
        if pool is not None and pool != self.pool:
            assert self._foreign is not None, "requests to other pools need the worker's foreign appends"
            return self._foreign(ev, pool)
        return self._appender.submit(ev, run_id.encode(), self._owned.partition_of(run_id))

    def forget(self, run_id: str) -> None:
        """The run is no longer running here: its next writer starts from the fold."""
        self._seq.pop(run_id, None)
