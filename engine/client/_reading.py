"""Reading runs back: a run's state and history, lists of runs, and waiting for results."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from stepline.client._base import ClientBase, Progress, _Watcher
from stepline.core import codec
from stepline.core.events import (
    JSON,
    Event,
    Payload,
)
from stepline.errors import (
    UnknownRun,
)
from stepline.log.base import partition_for
from stepline.projections.runs import (
    TERMINAL,
    PartitionRuns,
    RunState,
    fold_run,
)


class Reading(ClientBase):
    """What a client reads from the log."""

    async def history(
        self, run_id: str, progress: Progress | None = None, *, claims: bool = False
    ) -> list[tuple[int, Event]]:
        """Every event of a run, in log order, with its offset.

        With `claims=True` the partition's PartitionClaimed events come too,
        so that a fold of the result fences a replaced owner's late events
        exactly as the worker's own fold does.
        """
        key = run_id.encode()
        out: list[tuple[int, Event]] = []
        pool = await self.home(run_id)
        p = partition_for(key, await self.open_pool(pool))
        topic = self.runs_topic(pool)
        end = await self.log.end_offset(topic, p)
        offset = 0
        while offset < end:
            recs = await self.log.read(topic, p, offset, 5000)
            for r in recs:
                if r.key == key or (claims and r.key == b"" and codec.peek_type(r.value) == b"PartitionClaimed"):
                    out.append((r.offset, codec.decode(r.value)))
            offset = recs[-1].offset + 1 if recs else end
            if progress:
                progress(offset, end)
        return out

    async def get_run(self, run_id: str) -> RunState:
        part = PartitionRuns(0)  # the number is not read: one run is folded
        for off, ev in await self.history(run_id, claims=True):
            part.apply(ev, off)
        state = part.runs.get(run_id)
        if state is None:
            raise UnknownRun(run_id)
        return state

    async def events(
        self, progress: Progress | None = None
    ) -> AsyncIterator[tuple[int, int, Event]]:
        """Every event on the runs topics of every pool as (partition, offset,
        event), in log order within each partition, up to the ends as of the call."""
        async for _, p, offset, ev in self.pool_events(progress):
            yield p, offset, ev

    async def pool_events(
        self, progress: Progress | None = None
    ) -> AsyncIterator[tuple[str, int, int, Event]]:
        """`events`, with the pool of each: (pool, partition, offset, event)."""
        ends: dict[tuple[str, int], int] = {}
        for pool in await self.pools():
            topic = self.runs_topic(pool)
            for p in range(await self.open_pool(pool)):
                ends[(pool, p)] = await self.log.end_offset(topic, p)
        total, done = sum(ends.values()), 0
        for (pool, p), end in ends.items():
            topic = self.runs_topic(pool)
            offset = 0
            while offset < end:
                recs = await self.log.read(topic, p, offset, 5000)
                for r in recs:
                    if r.offset >= end:
                        break
                    yield pool, p, r.offset, codec.decode(r.value)
                step = (recs[-1].offset + 1 - offset) if recs else end - offset
                offset += step
                done += step
                if progress:
                    progress(min(done, total), total)

    async def list_runs(self, progress: Progress | None = None) -> list[RunState]:
        """All runs of every pool, folded from the log (newest first)."""
        parts: dict[tuple[str, int], PartitionRuns] = {}
        async for pool, p, offset, ev in self.pool_events(progress):
            part = parts.get((pool, p))
            if part is None:
                part = parts[(pool, p)] = PartitionRuns(p)
            part.apply(ev, offset)
        runs = [r for part in parts.values() for r in part.runs.values()]
        runs.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
        return runs

    async def wait(self, run_id: str, timeout: float | None = None, from_offset: int | None = None) -> RunState:
        """Wait until the run is completed, failed or cancelled; its state then."""
        pool = await self.home(run_id)
        p = partition_for(run_id.encode(), await self.open_pool(pool))
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        w = self._watchers.get((pool, p))
        covered = w is not None and from_offset is not None and from_offset >= w.start
        if w is None:
            start = (from_offset if from_offset is not None
                     else await self.log.end_offset(self.runs_topic(pool), p))
            w = self._watchers[(pool, p)] = _Watcher(self, pool, p, start)
            covered = from_offset is not None
        w.waiters.setdefault(run_id, []).append(fut)
        if run_id in w.recent:
            fut.set_result(w.recent[run_id])
        if not covered:
            # The watcher may have passed this run's end already: look it up.
            state = await self.get_run(run_id)
            if state.status in TERMINAL:
                return state
        # A timer on the future rather than `asyncio.timeout`: a result()
        # per run, and the context manager costs several times more.
        timer = None if timeout is None else asyncio.get_running_loop().call_later(timeout, _expire, fut)
        try:
            ev = await fut
        except _Expired:
            raise TimeoutError(f"run {run_id} did not finish within {timeout} s") from None
        finally:
            if timer is not None:
                timer.cancel()
            waiting = w.waiters.get(run_id)
            if waiting and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del w.waiters[run_id]
        return self._terminal_state(run_id, ev)

    def _terminal_state(self, run_id: str, ev: Event) -> RunState:
        """A state good enough for result(): built from the terminal event alone.

        The watcher sees only terminal events; folding the whole run to
        answer a result() would read its partition again.
        """
        start = RunState(run_id, ev.task_id, "pending", Payload(JSON, b"null"), ev.time, ev.time)
        return fold_run(start, ev) or start


class _Expired(Exception):
    """A wait's time ran out (set on its future by the timer)."""


def _expire(fut: asyncio.Future[Event]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())
