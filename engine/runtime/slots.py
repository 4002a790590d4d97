"""The run side of queue admission: slots of limited queues, asked and held.

A run of a limited queue starts only with a slot granted by the queue's
owner (engine/runtime/admission.py). This part keeps, per run: the
SlotRequested it appended and has not seen granted; the slot its attempt
holds; and the release that must be durable before the attempt's outcome
is (see `gate`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from stepline.core.events import (
    Body,
    RetryScheduled,
    RunCompleted,
    RunFailed,
    RunSuspended,
    SlotReleased,
    SlotRequested,
)
from stepline.projections.runs import CANCELLED, RunState
from stepline.runtime.admission import Admission
from stepline.sdk.task import Queue

log = structlog.get_logger("stepline.worker")

# Events that end an attempt; a slot held for the attempt is released first.
_ENDS_ATTEMPT = (RunCompleted, RunSuspended, RetryScheduled, RunFailed)


class Slots:
    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._asked: dict[str, SlotRequested] = {}
        self._holding: dict[str, tuple[str, str | None, str]] = {}
        self._gates: dict[str, asyncio.Future[int]] = {}

    def asked(self, run_id: str) -> bool:
        return run_id in self._asked

    def ask(self, state: RunState, queue: Queue) -> None:
        rid = state.run_id
        if rid in self._asked:
            return
        rate = queue.rate_limit
        body = SlotRequested(
            queue.name, state.concurrency_key, state.priority, state.created_at,
            queue.concurrency_limit, queue.key_limit,
            rate.limit if rate else None, rate.period_ms if rate else None,
        )
        self._asked[rid] = body
        fut = self._admission.request(rid, state.task_id, body)

        def failed(f: asyncio.Future[int]) -> None:
            if not f.cancelled() and f.exception() is not None and self._asked.get(rid) is body:
                # Ask again on the next reaction to this run.
                del self._asked[rid]
                log.warning("slot request failed", run_id=rid, error=str(f.exception()))

        fut.add_done_callback(failed)

    def granted(self, run_id: str) -> None:
        self._asked.pop(run_id, None)

    def withdraw(self, state: RunState, reason: str) -> None:
        """Give back a slot asked for (or granted too late) by a run that no longer wants it."""
        asked = self._asked.pop(state.run_id)
        _log_failure(self._admission.release(
            state.run_id, state.task_id, SlotReleased(asked.queue, asked.concurrency_key, reason)))

    def forget(self, in_partitions: Callable[[str], bool]) -> None:
        """Revoked partitions: the next owner asks again; the queue keeps one request."""
        for rid in [r for r in self._asked if in_partitions(r)]:
            del self._asked[rid]

    def hold(self, state: RunState) -> None:
        """An attempt starts with the run's granted slot (if it has one)."""
        if state.slot is not None:
            self._holding[state.run_id] = (state.slot, state.concurrency_key, state.task_id)

    def let_go(self, run_id: str, cancelled: bool) -> None:
        """An attempt is over. A cancelled run gives its slot back; otherwise
        (revoked, shutting down) the run keeps its slot: its next owner
        resumes it as a holder."""
        holding = self._holding.pop(run_id, None)
        if holding is not None and cancelled:
            queue_name, key, task_id = holding
            _log_failure(self._admission.release(
                run_id, task_id, SlotReleased(queue_name, key, CANCELLED)))

    def gate(self, run_id: str, body: Body) -> asyncio.Future[int] | None:
        """What the run's next event must wait for: the release of its slot.

        Called for each event the run appends, in order; the event that
        ends an attempt releases the slot the attempt holds.
        """
        if run_id in self._holding and isinstance(body, _ENDS_ATTEMPT):
            # The user's code is done: free the slot, durably, before the
            # outcome is recorded. In the other order a crash between the two
            # would leave the slot held by a run that has ended.
            queue, key, task_id = self._holding.pop(run_id)
            self._gates[run_id] = self._admission.release(
                run_id, task_id, SlotReleased(queue, key, body.TYPE))
        gate = self._gates.get(run_id)
        if gate is None:
            return None
        if gate.done():
            del self._gates[run_id]
            if not gate.cancelled() and gate.exception() is not None:
                log.warning("slot release failed; the slot may stay held", run_id=run_id,
                            error=str(gate.exception()))
            return None
        return gate


def _log_failure(fut: asyncio.Future[int]) -> None:
    def done(f: asyncio.Future[int]) -> None:
        if not f.cancelled() and f.exception() is not None:
            log.warning("could not append to the queues topic", error=str(f.exception()))

    fut.add_done_callback(done)
