"""Executing one attempt of a run: its context, its span, its body.

The decider (engine/runtime/deciding.py) chooses what starts and when; this
part runs an attempt it started: the task found in the registry, a
RunContext whose emits go through the fence, the attempt's span, and the
attempt itself (engine/runtime/runner.py inline, engine/runtime/isolation.py
in a child process). It tells the decider how the attempt ended.

While the worker drains, `handover` is set: every attempt's context sees
it, and an attempt ends before its next step would start (`Handover`,
engine/sdk/context.py); an isolated child is told over its socket.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from stepline.client import Client
from stepline.consumers.lookback import find_past_event
from stepline.consumers.waits import WaitEntry, register, unregister
from stepline.core.events import RunDeadLettered, RunFailed, RunStarted, WaitCompleted
from stepline.errors import KeyStoreError, SubjectErased, UnknownTask
from stepline.log.base import Log
from stepline.log.topics import Topics
from stepline.projections.runs import RunState
from stepline.runtime.background import Background
from stepline.runtime.fence import Fence
from stepline.runtime.isolation import execute_in_child
from stepline.runtime.owned import Owned
from stepline.runtime.runner import HANDED_OVER, Outcome, record_failure, run_body
from stepline.runtime.slots import Slots
from stepline.sdk.context import RunContext, error_info
from stepline.sdk.interceptors import Interceptors
from stepline.sdk.port import bind_client
from stepline.sdk.task import Registry, Task
from stepline.sdk.waits import EVENT
from stepline.security.keystore import KeyStore

log = structlog.get_logger("stepline.worker")


async def execute_attempt(
    task: Task[Any, Any],
    state: RunState,
    ctx: RunContext,
    worker_id: str,
    rng: random.Random,
    hooks: Interceptors,
) -> Outcome:
    try:
        # Before the isolation split: an isolated child gets the plain
        # payload, and records through the scrubbing emit.
        state = await hooks.open_attempt(task, state, ctx)
    except (KeyStoreError, SubjectErased, ValueError) as exc:
        ctx.emit(RunStarted(state.attempt, worker_id, task.version))
        return await record_failure(task, state, ctx, exc, rng, hooks)
    if task.isolation == "process":
        return await execute_in_child(task, state, ctx, worker_id, rng, hooks)
    ctx.emit(RunStarted(state.attempt, worker_id, task.version))
    return await run_body(task, state, ctx, rng, task.max_duration, hooks)


@dataclass(frozen=True, slots=True)
class Ended:
    """How an attempt ended (one that raises CancelledError was revoked or shut down)."""

    offset: int | None = None  # where its outcome landed, if it recorded one
    executed: bool = False  # the task ran and its outcome is durable
    unrecorded: bool = False  # recording the outcome failed: the log refused it
    handed_over: bool = False  # stopped at a step boundary by a drain: the next owner resumes it


class Executor:
    def __init__(
        self,
        registry: Registry,
        log_: Log,
        topics: Topics,
        owned: Owned,
        fence: Fence,
        slots: Slots,
        background: Background,
        *,
        worker_id: str,
        clock: Callable[[], int],
        client: Client | None,
        keys: KeyStore | None,
        hooks: Interceptors,
    ) -> None:
        self.registry = registry
        self.log = log_
        self.topics = topics
        self._owned = owned
        self._fence = fence
        self._slots = slots
        self._background = background
        self.worker_id = worker_id
        self.clock = clock
        self.client = client
        self.keys = keys
        self._hooks = hooks
        self._rng = random.Random()
        # Set by the drain (Decider.drain): attempts stop at their next step boundary.
        self.handover = asyncio.Event()

    async def run(self, state: RunState, cancel_requested: Callable[[str], bool]) -> Ended:
        rid = state.run_id
        if self.client is not None:
            bind_client(self.client)  # this attempt's own context copy
        # The interceptors' scope of the attempt (its span, current while it
        # runs); the events it writes carry its trace context.
        span = self._hooks.attempt(state)
        tp = span.traceparent
        try:
            try:
                task = self.registry.get(state.task_id)
                if task.pool != self.topics.pool:
                    # Recorded on this pool's topic by a client that did not
                    # know the task's pool: this pool's workers never run it.
                    raise UnknownTask(state.task_id, reason=(
                        f"task {state.task_id!r} runs in pool {task.pool!r}, but this run was recorded "
                        f"for pool {self.topics.pool!r}: trigger it with a client that knows the app"))
            except UnknownTask as exc:
                info = error_info(exc, retriable=False)
                span.failed(exc)
                self._fence.emit(state, RunFailed(info, state.attempt), tp)
                offset = await self._fence.emit(
                    state, RunDeadLettered(exc.reason or f"task {state.task_id!r} is not registered on this worker"),
                    tp)
                span.ended("failed", "UnknownTask")
                return Ended(offset)
            outcome = await execute_attempt(task, state, self._context(state, tp), self.worker_id, self._rng,
                                            self._hooks)
            span.ended(outcome.kind, outcome.detail)
            if outcome.kind == HANDED_OVER:
                log.info("attempt stopped for the drain; the run's next owner resumes it", run_id=rid,
                         at=outcome.detail)
                return Ended(handed_over=True)
            return Ended(outcome.offset, executed=True)
        except asyncio.CancelledError:
            if not cancel_requested(rid):
                raise  # shutdown or revocation: the next owner resumes the run
            span.ended("cancelled")
            return Ended()
        except Exception as exc:
            # Recording the outcome failed (the log is down). The run stays
            # live on the log; nothing on it will wake this worker again, so
            # it tries the attempt again itself, backing off, for as long
            # as it owns the run (a new owner resumes it anyway).
            log.exception("could not record attempt outcome", run_id=rid)
            span.failed(exc)
            span.ended("error", "could not record the outcome")
            return Ended(unrecorded=True)
        finally:
            span.close()  # first: runs started from here must not inherit its context
            self._slots.let_go(rid, cancel_requested(rid))

    def _context(self, state: RunState, tp: str | None) -> RunContext:
        ctx: RunContext  # its emitter (below) refers to it
        ctx = RunContext(state.run_id, state.task_id, state.attempt, state.steps,
                         lambda body: self._fence.emit(state, body, tp, ctx.take_attached()),
                         self.clock, emit_log=self.log,
                         register_wait=self._register_wait, request=self._fence.request,
                         unregister_wait=self._unregister_wait, keys=self.keys,
                         patches=state.patch_answers(), step_scope=self._hooks.step,
                         handover=self.handover, step_failures=state.step_failures())
        return ctx

    # --- event waits (consumers/waits.py) ----------------------------------

    def forget_wait(self, run_id: str, step: int) -> None:
        """Drop a timed-out event wait from the router's table. Best effort:
        a leftover entry only costs a WaitCompleted the fold ignores."""
        self._background.spawn(unregister(self.log, self.topics.waits, run_id, step))

    async def _unregister_wait(self, run_id: str, step: int) -> None:
        await unregister(self.log, self.topics.waits, run_id, step)

    async def _register_wait(self, entry: WaitEntry) -> None:
        await register(self.log, self.topics.waits, entry)
        if entry.lookback:
            # Registered first, then searched: an event the search does not
            # reach was appended after the wait, and the router offers it.
            seen = await find_past_event(self.log, self.topics.events, entry)
            if seen is not None:
                await self._fence.request(entry.run_id, entry.task_id,
                                          WaitCompleted(entry.step, EVENT, seen.event_id, seen.raw))
                self.forget_wait(entry.run_id, entry.step)
