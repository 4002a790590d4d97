"""Inside a run: the journal, `@step`, and durable `sleep`.

Every attempt runs the task function from the top. Each `@step` call and
each durable wait takes the next position in the run's journal, in the
order the calls start (deterministic, also under `asyncio.gather`, whose
children start in argument order). A position the journal already holds as
completed returns the recorded output without running the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, Protocol, TypeVar, overload

from stepline.consumers.waits import WaitEntry
from stepline.core.events import Body, ErrorInfo, PatchRecorded, StepCompleted, StepFailed, StepStarted
from stepline.core.ids import step_idempotency_key
from stepline.core.payloads import Codec, annotations_of, describe_args
from stepline.errors import NonDeterminismError, NotInRunContext, StepRetriesExhausted
from stepline.projections.runs import DONE_STEPS, AttemptError, StepState
from stepline.sdk.retry import Retry

if TYPE_CHECKING:
    from stepline.log.base import Log, Outgoing
    from stepline.security.keystore import KeyStore

P = ParamSpec("P")
R = TypeVar("R")

SLEEP = "sleep"


class Emitter(Protocol):
    def __call__(self, body: Body) -> asyncio.Future[int]:
        """Queue an event for this run; the future resolves once it is durable."""
        ...


class StepCaller(Protocol):
    def __call__(self, pos: int, name: str, fn: Callable[..., Awaitable[Any]],
                 args: tuple[object, ...], kwargs: dict[str, object]) -> Awaitable[Any]:
        """Run step `pos` (`name`): `fn(*args, **kwargs)`, awaited, with something around it."""
        ...


@dataclass(frozen=True, slots=True)
class Wait:
    """One open wait: the journal position it holds and what wakes it."""

    step: int
    reason: str  # sleep | event | token | child
    wake_at: int | None = None  # deadline (a sleep's end, a wait's timeout)
    condition: str | None = None  # JSON, for humans and the dashboard
    group: int | None = None  # the wait_for_any it is a branch of: the first to resolve wins


class Suspend(BaseException):
    """Unwinds a run that must wait. A BaseException, so that a task's own
    `except Exception` cannot swallow a durable wait by accident."""

    def __init__(self, *waits: Wait) -> None:
        super().__init__(", ".join(w.reason for w in waits))
        self.waits = waits


class Handover(BaseException):
    """Ends an attempt at a step boundary because its worker is stopping
    (`Worker.drain`): the step about to start is left to the run's next
    owner, which replays the completed ones and starts there. Nothing is
    recorded for it: the run stays running on the log, as after a crash,
    but every step that finished is checkpointed. A BaseException, like
    Suspend, so that a task's `except Exception` cannot keep it running."""

    def __init__(self, step: int, name: str) -> None:
        super().__init__(f"handed over before step {step} ({name})")
        self.step = step


def error_info(exc: BaseException, retriable: bool = True) -> ErrorInfo:
    stack = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ErrorInfo(type(exc).__qualname__, str(exc), stack, retriable)


def _no_step_scope(name: str, position: int) -> AbstractContextManager[object]:
    return _NO_STEP


_NO_STEP = contextlib.nullcontext()


def now_ms() -> int:
    return int(time.time() * 1000)


class Requester(Protocol):
    def __call__(self, run_id: str, task_id: str, body: Body, pool: str | None = None) -> asyncio.Future[int]:
        """Append a request (unfenced) to another run, e.g. a child's result to
        its parent; `pool` names the run's worker pool when it is not this one's."""
        ...


@dataclass(eq=False)
class RunContext:
    run_id: str
    task_id: str
    attempt: int
    journal: Mapping[int, StepState]
    emit: Emitter
    clock: Callable[[], int] = now_ms
    # Where event waits are registered for the router; None outside a worker.
    register_wait: Callable[[WaitEntry], Awaitable[None]] | None = None
    # Appends to other runs (a child's result to its parent); None outside a worker.
    request: Requester | None = None
    # Subject keys of sensitive payload fields (engine/security/keystore.py); None: not configured.
    keys: KeyStore | None = None
    # Withdraws an event wait from the router's table (a wait_for_any branch
    # that lost); None outside a worker.
    unregister_wait: Callable[[str, int], Awaitable[None]] | None = None
    # The run's recorded answers to `patched()` (RunState.patches), by patch id.
    patches: Mapping[str, bool] = field(default_factory=dict)
    # The log steps' `stepline.emit` records go to, with their checkpoints
    # (engine/sdk/emit.py); None where nothing can be emitted. Whoever sets it
    # makes `emit` take `take_attached()` along with each event.
    emit_log: Log | None = None
    # Opens the interceptors' scope around each executed step (a span and its
    # timing, engine/sdk/interceptors.py); none outside a worker.
    step_scope: Callable[[str, int], AbstractContextManager[object]] = _no_step_scope
    # Set when the worker drains: no step starts any more, and the attempt
    # ends with Handover at the next step boundary. None outside a worker.
    handover: asyncio.Event | None = None
    # Runs each executed step's body in place of a plain call: `stepline
    # debug` (engine/history/debug.py) opens the debugger there. None in a worker.
    call_step: StepCaller | None = None
    # The failed tries of each step in this attempt (RunState.step_failures):
    # where a step with its own retry policy resumes counting.
    step_failures: Mapping[int, tuple[AttemptError, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Records emitted by each executing step, until its checkpoint.
        self.outbox: dict[int, list[Outgoing]] = {}
        self._attached: list[Outgoing] = []
        self._next = 0
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # The exception a step already recorded as StepFailed, so the runner
        # does not record the same failure twice when it reaches the body.
        self.recorded_failure: BaseException | None = None

    def next_position(self, name: str) -> tuple[int, StepState | None]:
        pos = self._next
        self._next += 1
        rec = self.journal.get(pos)
        if rec is not None and rec.name != name:
            raise NonDeterminismError(self.run_id, pos, rec.name, name)
        return pos, rec

    def observe_step(self, name: str, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        """Called with a step's arguments just before it takes its position.
        Nothing here; a shadow replay (engine/history/shadow.py) compares them."""

    def patched(self, patch: str) -> bool:
        """The run's answer to `stepline.patched(patch)`; see there."""
        known = self.patches.get(patch)
        if known is not None:
            return known
        # A position at or after this point already in the journal means
        # the history here was made by code that did not ask: the old path.
        applied = not any(pos >= self._next for pos in self.journal)
        self.patches = {**self.patches, patch: applied}
        # Not awaited: every later checkpoint queues behind it, so none of
        # them is durable without it, and until one is, asking again gives
        # the same answer.
        self.emit(PatchRecorded(patch, applied, self._next))
        return applied

    def complete_step(self, body: StepCompleted) -> asyncio.Future[int]:
        """Append a step's checkpoint, with what the step emitted, atomically.

        The records ride along beside `emit` rather than through it, so that
        whatever wraps `emit` (the scrubbing of sensitive fields) still sees
        the checkpoint: those wrappers call through synchronously, and the
        worker's emitter takes the records with `take_attached()`.
        """
        self._attached = self.outbox.pop(body.step, [])
        try:
            return self.emit(body)
        finally:
            left, self._attached = self._attached, []
            if left:  # nothing took them: a bug, and silence would lose them
                raise RuntimeError(f"step {body.step} of run {self.run_id}: emitted records "
                                   "were not taken by the emitter")

    def take_attached(self) -> list[Outgoing]:
        taken, self._attached = self._attached, []
        return taken

    def step_started(self) -> None:
        self._active += 1
        self._idle.clear()

    def step_ended(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    async def quiesce(self) -> None:
        """Wait until no step of this run is executing."""
        await self._idle.wait()

    async def hand_over(self, step: int, name: str) -> NoReturn:
        """Step `step` was about to execute while the worker drains: end the
        attempt here, once the steps running beside it (asyncio.gather)
        have finished and recorded their checkpoints."""
        await self.quiesce()
        raise Handover(step, name)


_current: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar(
    "stepline_run", default=None
)


def current_run() -> RunContext | None:
    return _current.get()


def enter_run(ctx: RunContext | None) -> contextvars.Token[RunContext | None]:
    """Make `ctx` the run that the task body's steps and waits see here (the
    runtime around an attempt, a replay or shadow around a recorded one)."""
    return _current.set(ctx)


def exit_run(token: contextvars.Token[RunContext | None]) -> None:
    """Undo `enter_run`."""
    _current.reset(token)


def require_run(what: str) -> RunContext:
    ctx = _current.get()
    if ctx is None:
        raise NotInRunContext(f"{what} can only be used inside a running task")
    return ctx


def patched(patch: str) -> bool:
    """Whether this run takes the code path added by `patch`.

    For changing a task while runs of it are in flight (Temporal's
    `workflow.patched`): `if sl.patched("new-discount"): <new> else: <old>`.
    True for a run that reaches this point for the first time on code
    that asks; False for a run whose history already went past this point
    on code that did not ask, so it keeps replaying the old path. The
    answer is recorded (PatchRecorded) and every later replay of the run
    gets the same. Once no run recorded before the patch is in flight, drop
    the old branch and keep `patched` (or remove both once no run that
    recorded the answer may replay).
    """
    ctx = require_run("stepline.patched()")
    return ctx.patched(patch)


def idempotency_key() -> str:
    """The current step's stable key (`run_id:step`), for external APIs."""
    ctx = require_run("stepline.idempotency_key()")
    pos = _step_position.get()
    if pos is None:
        raise NotInRunContext("stepline.idempotency_key() must be called inside a step")
    return step_idempotency_key(ctx.run_id, pos)


_step_position: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "stepline_step", default=None
)


def _step_wrapper(fn: Callable[P, Awaitable[R]], name: str, retry: Retry | None = None) -> Callable[P, Awaitable[R]]:
    _, ret = annotations_of(fn)
    codec = Codec(ret)

    @functools.wraps(fn)
    async def run_step(*args: P.args, **kwargs: P.kwargs) -> R:
        ctx = _current.get()
        if ctx is None:
            return await fn(*args, **kwargs)  # a plain call outside any run
        ctx.observe_step(name, args, kwargs)
        pos, rec = ctx.next_position(name)
        if rec is not None and rec.status == "completed" and rec.output is not None:
            value: R = codec.load(rec.output, f"recorded output of step {pos} ({name})")
            return value
        if ctx.handover is not None and ctx.handover.is_set() and _step_position.get() is None:
            # The worker is stopping: this step is the next owner's. (Not a
            # step called inside another: that one is under way, and waiting
            # for it to quiesce would wait for ourselves.)
            await ctx.hand_over(pos, name)
        nested = _step_position.get() is not None
        ctx.step_started()
        token = _step_position.set(pos)
        active = True
        try:
            if retry is None:
                return await _try_step(ctx, fn, args, kwargs, pos, name, codec, None)
            tries = await _resume_tries(ctx, retry, pos, name)
            while True:
                try:
                    return await _try_step(ctx, fn, args, kwargs, pos, name, codec, (retry, tries + 1))
                except _TryAgain as again:
                    tries += 1
                    if await _backoff(ctx, again.delay) and not nested:
                        active = False
                        ctx.step_ended()
                        await ctx.hand_over(pos, name)
        finally:
            _step_position.reset(token)
            if active:
                ctx.step_ended()

    return run_step


class _TryAgain(Exception):
    """A try of a step with its own policy failed and was recorded; the policy says wait `delay` s."""

    def __init__(self, delay: float) -> None:
        self.delay = delay


async def _try_step(
    ctx: RunContext, fn: Callable[..., Awaitable[R]], args: tuple[object, ...], kwargs: dict[str, object],
    pos: int, name: str, codec: Codec, own: tuple[Retry, int] | None,
) -> R:
    """One execution of a step: StepStarted, the call, StepCompleted or StepFailed.

    `own` is the step's own policy and the number of this try, or None when
    the step has none: then a failure is the attempt's, for the task's
    policy. With one, a failure the policy retries is recorded as retriable
    and raised as _TryAgain; the last is recorded as not retriable and
    raised as it is, for the task's policy.
    """
    try:
        # The step's span and duration (a no-op unless the attempt is traced or metered).
        with ctx.step_scope(name, pos):
            ctx.emit(StepStarted(pos, name, ctx.attempt, describe_args(args, kwargs)))
            try:
                if ctx.call_step is None:
                    result = await fn(*args, **kwargs)
                else:
                    result = await ctx.call_step(pos, name, fn, args, kwargs)
            except (asyncio.CancelledError, Suspend):
                raise
            except Exception as exc:
                delay = own[0].next_delay(own[1], exc) if own is not None else None
                ctx.recorded_failure = exc
                retriable = own is None or delay is not None
                await ctx.emit(StepFailed(ctx.attempt, error_info(exc, retriable), pos, name))
                if delay is not None:
                    raise _TryAgain(delay) from exc
                raise
            output = codec.dump(result, f"output of step {pos} ({name})")
            # Durable first, then hand the result on: a step whose checkpoint
            # is not on the log has not completed, and may run again.
            await ctx.complete_step(StepCompleted(pos, name, ctx.attempt, output))
            return result
    finally:
        ctx.outbox.pop(pos, None)  # a failed try's records are dropped


async def _resume_tries(ctx: RunContext, retry: Retry, pos: int, name: str) -> int:
    """How many tries of this step already failed in this attempt (recorded
    before its worker died), after waiting what is left of the backoff; or
    StepRetriesExhausted when the last of them had given up."""
    failed = ctx.step_failures.get(pos, ())
    if not failed:
        return 0
    last = failed[-1]
    if not last.error.retriable or len(failed) >= retry.max_attempts:
        raise StepRetriesExhausted(ctx.run_id, pos, name, len(failed), last.error.type, last.error.message)
    # The recorded error is text, not the exception: rules by type cannot
    # match it, so the policy's own delay stands in, less the time gone by.
    delay = retry.next_delay(len(failed), _RecordedFailure(last.error.message)) or 0.0
    await _backoff(ctx, max(0.0, delay - (ctx.clock() - last.time) / 1000))
    return len(failed)


class _RecordedFailure(Exception):
    """A failure known only from its record (a resumed step's last try)."""


async def _backoff(ctx: RunContext, delay: float) -> bool:
    """Wait `delay` s between tries of a step; True when the worker began to
    drain meanwhile (the next owner makes the next try)."""
    if ctx.handover is None:
        await asyncio.sleep(delay)
        return False
    try:
        await asyncio.wait_for(ctx.handover.wait(), delay)
    except TimeoutError:
        return False
    return True


@overload
def step(fn: Callable[P, Awaitable[R]], /) -> Callable[P, Awaitable[R]]: ...


@overload
def step(
    *, name: str | None = None, retry: Retry | None = None,
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]: ...


def step(
    fn: Callable[P, Awaitable[R]] | None = None, /, *, name: str | None = None, retry: Retry | None = None,
) -> Callable[P, Awaitable[R]] | Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Make an async function a checkpointed step.

    Awaiting it inside a task records StepStarted, runs it, and records
    StepCompleted with its output; later attempts get the recorded output
    back without running it. Outside a task it is a plain call.

    `retry=Retry(...)`: the step's own policy. A failed try is recorded
    (StepFailed) and the step runs again in place, within the same attempt,
    after the policy's delay; only when the policy gives up does the error
    reach the task body (and, uncaught, the task's policy). The tries are
    counted on the log, so a worker that dies between them is followed by
    one that makes only the tries left (docs/concepts.md, "Retries").
    """

    def wrap(f: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        return _step_wrapper(f, name or f.__qualname__, retry)

    return wrap(fn) if fn is not None else wrap


async def sleep(duration: timedelta | float) -> None:
    """Durable sleep: the run is suspended and no worker slot is held.

    The wake time is fixed when the sleep is first reached and recorded, so
    re-running the task after a crash does not restart the clock.
    """
    ctx = require_run("stepline.sleep()")
    pos, rec = ctx.next_position(SLEEP)
    if rec is not None and rec.status in DONE_STEPS:
        return
    seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    now = ctx.clock()
    wake_at = rec.wake_at if rec is not None and rec.wake_at is not None else now + int(seconds * 1000)
    # Let steps already running in parallel branches finish and record their
    # checkpoints first, so suspending never throws away completed work.
    await ctx.quiesce()
    raise Suspend(Wait(pos, SLEEP, wake_at))
