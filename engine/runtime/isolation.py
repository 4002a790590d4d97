"""Attempts in a child process: `@task(isolation="process")`.

An isolated attempt runs in a fresh interpreter (`python -m
stepline.runtime.isolation_child`, engine/runtime/isolation_child.py), so
code that never yields, leaks, or crashes the interpreter costs one
attempt, not the worker. The child imports the task's
module again and runs the ordinary attempt code (`runner.run_body`); it has
no connection to the log. Everything it records goes through its parent,
the worker, over a socket pair:

1. parent → child `Init` (engine/runtime/isolation_wire.py): where the
   task lives, the run (journal included), a seed, the clock offset and
   the memory limit. The child applies the
   limit, imports the app and finds the task.
2. child → parent `("ready",)`; the max_duration clock starts here, so the
   interpreter's start-up is not charged to the task (it gets its own
   max_duration to get this far). Or `("unavailable", why)`, a failed attempt.
3. child → parent `("call", id, name, args)` for each event it emits and
   each wait, request, trigger or publish it makes. The parent performs it
   with its own callbacks, in arrival order for emits (that order is the
   log's), and answers `("reply", id, ok, value)` when done: an emit's reply
   is its offset once durable, so a step still returns only after its
   checkpoint is on the log.
   `("spans", [span, ...])` as its spans end (engine/observability/isolated.py):
   the parent hands them to its own span processors, in the attempt's trace.
4. child → parent `("outcome", Outcome)`: its outcome events are already
   durable, and the parent returns it as is. `("raised", exc)`: recording
   failed (the log is down) and the parent raises it, as inline would.
5. parent → child `("handover",)`, at any time after `Init`, once the
   worker drains: the child's context stops the attempt before its next
   step (engine/sdk/context.py, `Handover`), and its outcome says so.

A child that disconnects without an outcome (a crash, a signal, the memory
limit) or overruns max_duration is killed and the parent records the attempt
as failed (ChildProcessDied, MaxDurationExceeded) under the retry policy.
If it had already recorded an outcome, that outcome stands.

Messages are pickles (engine/runtime/isolation_wire.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import inspect
import os
import random
import signal
import socket
import sys
from typing import Any

from stepline.client import Client
from stepline.consumers.waits import WaitEntry
from stepline.core.events import (
    Body,
    RetryScheduled,
    RunCompleted,
    RunDeadLettered,
    RunFailed,
    RunStarted,
    RunSuspended,
)
from stepline.errors import ChildProcessDied, IsolationError, MaxDurationExceeded
from stepline.observability import isolated
from stepline.projections.runs import RunState
from stepline.runtime import isolation_wire as wire
from stepline.runtime.runner import Outcome, record_failure
from stepline.sdk.context import RunContext, now_ms
from stepline.sdk.interceptors import Interceptors
from stepline.sdk.port import bound_client
from stepline.sdk.task import Registry, Task, default_registry

# Seconds a child that reported its end gets to exit by itself before it is
# terminated (it flushes its output and leaves at once; this is for a hang).
_EXIT_GRACE = 2.0
# Seconds between SIGTERM and SIGKILL for a child past its max_duration: the
# attempt is lost either way, this only lets a handler of the task's clean up.
_TERM_GRACE = 1.0

# The events that end an attempt, by the outcome they make.
_OUTCOME_KINDS: dict[type, str] = {
    RunCompleted: "completed",
    RunSuspended: "suspended",
    RetryScheduled: "retrying",
    RunFailed: "failed",
    RunDeadLettered: "failed",
}



# --- the parent ------------------------------------------------------------


async def execute_in_child(
    task: Task[Any, Any],
    state: RunState,
    ctx: RunContext,
    worker_id: str,
    rng: random.Random,
    hooks: Interceptors,
) -> Outcome:
    """One attempt of an isolated task: start a child, serve it, record its end.

    The child runs the body under the default interceptors (a worker's own
    list does not cross into another process); `hooks` record its failures here.
    """
    ctx.emit(RunStarted(state.attempt, worker_id, task.version))
    bound = bound_client()
    client = bound if isinstance(bound, Client) else None  # the worker's own, around this attempt
    try:
        child = await _Child.spawn(_init(task, state, ctx, rng, client), ctx, client, _app_registry(task))
    except OSError as exc:  # out of processes or memory: the retry policy decides
        err = IsolationError(f"could not start a child process for task {task.id!r}: {exc}")
        return await record_failure(task, state, ctx, err, rng, hooks)
    try:
        end = await child.serve(task.max_duration)
        # Gently unless it overran: one that ended or hung up is exiting by
        # itself, and its own exit code says more than our SIGTERM would.
        await child.stop(gently=end[0] != "expired")
    except BaseException:
        # Cancelled (run cancelled, partition revoked, shutdown), also while
        # a finished child was exiting: nobody will read what it does next,
        # so it goes now, without a grace.
        await child.kill()
        raise
    return await _settle(task, state, ctx, rng, child, end, hooks)


def _init(
    task: Task[Any, Any], state: RunState, ctx: RunContext, rng: random.Random, client: Client | None
) -> wire.Init:
    return wire.Init(
        target=_app_target(task),
        task_id=task.id,
        state=_portable(state),
        seed=rng.getrandbits(64),
        clock_offset_ms=ctx.clock() - now_ms(),
        memory_limit_mb=task.memory_limit_mb,
        sys_path=tuple(os.path.abspath(p) for p in sys.path),
        parent_pid=os.getpid(),
        can_register_waits=ctx.register_wait is not None and ctx.unregister_wait is not None,
        can_request=ctx.request is not None,
        has_client=client is not None,
        trace=isolated.parent_carrier(),
    )


def _app_target(task: Task[Any, Any]) -> str:
    """How the child finds the task's module: by name inside a package (a
    file path would break its relative imports), else by file, which is
    also how `load_app` named a module it loaded from a path."""
    name = task.fn.__module__
    module = sys.modules.get(name)
    if module is not None and module.__package__ and name != "__main__":
        return name
    return os.path.abspath(inspect.getfile(task.fn))


def _app_registry(task: Task[Any, Any]) -> Registry:
    """The registry of the task's app, as load_app returned it to the worker:
    a trigger from the child names its task by id and is resolved here."""
    reg = getattr(sys.modules.get(task.fn.__module__), "registry", None)
    return reg if isinstance(reg, Registry) else default_registry


def _portable(state: RunState) -> RunState:
    return dataclasses.replace(state, steps=dict(state.steps))


async def _settle(
    task: Task[Any, Any],
    state: RunState,
    ctx: RunContext,
    rng: random.Random,
    child: _Child,
    end: tuple[Any, ...],
    hooks: Interceptors,
) -> Outcome:
    kind = end[0]
    if kind == "outcome":
        outcome: Outcome = end[1]
        return outcome
    if kind == "raised":
        raise end[1]
    if child.recorded is not None:
        # It recorded how the attempt ended, then died or overran before
        # saying so: that is on the log already and must not be doubled.
        recorded_kind, offset = child.recorded
        return Outcome(recorded_kind, await offset)
    exc: Exception
    if kind == "expired":
        assert task.max_duration is not None
        exc = MaxDurationExceeded(task.id, task.max_duration, state.attempt)
    elif kind == "unavailable":
        exc = IsolationError(f"task {task.id!r} could not start in its child process: {end[1]}")
    else:
        exc = ChildProcessDied(task.id, state.attempt, child.proc.returncode)
    return await record_failure(task, state, ctx, exc, rng, hooks)


class _Calls:
    """What a child may ask of its worker besides emitting: the worker's own
    wait registration, requests and client, so the child needs no log."""

    NAMES = frozenset({"register_wait", "unregister_wait", "request", "trigger", "publish", "wait", "get_run"})

    def __init__(self, ctx: RunContext, client: Client | None, registry: Registry) -> None:
        self._ctx = ctx
        self._client = client
        self._registry = registry

    async def register_wait(self, entry: WaitEntry) -> None:
        assert self._ctx.register_wait is not None  # the child offers it only then
        await self._ctx.register_wait(entry)

    async def unregister_wait(self, run_id: str, step: int) -> None:
        assert self._ctx.unregister_wait is not None  # offered with register_wait
        await self._ctx.unregister_wait(run_id, step)

    async def request(self, run_id: str, task_id: str, body: Body, pool: str | None = None) -> int:
        assert self._ctx.request is not None
        return await self._ctx.request(run_id, task_id, body, pool)

    async def trigger(self, task_id: str, payload: Any, options: dict[str, Any]) -> tuple[str, int | None]:
        # The task object, not its id, so the trigger records its queue.
        task = self._registry.find(task_id)
        handle = await self._need_client().trigger(task if task is not None else task_id, payload, **options)
        return handle.run_id, handle.offset

    async def publish(self, name: str, data: Any, options: dict[str, Any]) -> str:
        return await self._need_client().publish(name, data, **options)

    async def wait(self, run_id: str, timeout: float | None, from_offset: int | None) -> RunState:
        return _portable(await self._need_client().wait(run_id, timeout, from_offset))

    async def get_run(self, run_id: str) -> RunState:
        return _portable(await self._need_client().get_run(run_id))

    def _need_client(self) -> Client:
        assert self._client is not None  # the child installs its stand-in only then
        return self._client


class _Child:
    """The parent's side of one child process."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ctx: RunContext,
        calls: _Calls,
    ) -> None:
        self.proc = proc
        self._reader = reader
        self._writer = writer
        self._ctx = ctx
        self._calls = calls
        self._tasks: set[asyncio.Future[Any]] = set()
        # The last outcome event the child emitted, if any (see _settle).
        self.recorded: tuple[str, asyncio.Future[int]] | None = None

    @classmethod
    async def spawn(cls, init: wire.Init, ctx: RunContext, client: Client | None, registry: Registry) -> _Child:
        ours, theirs = socket.socketpair()
        try:
            # A fresh interpreter, not a fork: the worker has threads and a
            # running loop that a forked copy would inherit half-alive. Its
            # own session, so a terminal's Ctrl-C reaches only the worker,
            # which then ends its children itself.
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "stepline.runtime.isolation_child", str(theirs.fileno()), str(init.parent_pid),
                pass_fds=(theirs.fileno(),), stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        child = cls(proc, reader, writer, ctx, _Calls(ctx, client, registry))
        writer.write(wire.frame(init))
        if ctx.handover is not None:
            child._relay(ctx.handover)
        return child

    def _relay(self, handover: asyncio.Event) -> None:
        """Tell the child when its worker starts draining."""

        async def relay() -> None:
            await handover.wait()
            self._send(("handover",))

        task = asyncio.ensure_future(relay())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve(self, limit: float | None) -> tuple[Any, ...]:
        """Answer the child until it reports its end. ("died",) if it
        disconnects first; ("expired",) if start-up or the attempt overruns."""
        first = await self._within(limit)
        if first[0] != "ready":
            return first
        return await self._within(limit)

    async def _within(self, limit: float | None) -> tuple[Any, ...]:
        if limit is None:
            return await self._pump()
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await self._pump()
        except TimeoutError:
            if deadline.expired():
                return ("expired",)
            raise

    async def _pump(self) -> tuple[Any, ...]:
        while True:
            try:
                msg: tuple[Any, ...] = await wire.recv(self._reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return ("died",)
            except Exception as exc:  # a message that does not unpickle here
                return ("unavailable", f"unreadable message from the child: {exc!r}")
            if msg[0] == "spans":
                isolated.replay(msg[1])
                continue
            if msg[0] != "call":
                return msg
            self._answer(msg[1], msg[2], msg[3])

    def _answer(self, call_id: int, name: str, args: tuple[Any, ...]) -> None:
        try:
            if name == "emit":
                # Synchronously and in arrival order: the order the child
                # emitted in is the order the events must have on the log.
                body: Body = args[0]
                fut: asyncio.Future[Any] = self._ctx.emit(body)
                kind = _OUTCOME_KINDS.get(type(body))
                if kind is not None:
                    self.recorded = (kind, fut)
            elif name in _Calls.NAMES:
                fut = asyncio.ensure_future(getattr(self._calls, name)(*args))
                self._tasks.add(fut)
                fut.add_done_callback(self._tasks.discard)
            else:
                raise IsolationError(f"the child asked for an unknown call {name!r}")
        except Exception as exc:
            self._send(("reply", call_id, False, wire.portable_error(exc)))
            return
        fut.add_done_callback(functools.partial(self._reply, call_id))

    def _reply(self, call_id: int, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            self._send(("reply", call_id, False, None))
        elif (exc := fut.exception()) is not None:
            self._send(("reply", call_id, False, wire.portable_error(exc)))
        else:
            self._send(("reply", call_id, True, fut.result()))

    def _send(self, msg: tuple[Any, ...]) -> None:
        if self._writer.is_closing():
            return  # the child is being stopped; nobody waits for this answer
        try:
            data = wire.frame(msg)
        except Exception as exc:  # a value that does not pickle
            data = wire.frame(("reply", msg[1], False, wire.portable_error(exc)))
        self._writer.write(data)

    async def stop(self, gently: bool) -> None:
        """Make sure the child is gone and reaped: gently, it gets time to
        exit by itself (with the socket still open, or it would leave in
        haste); then it is terminated, then killed."""
        if gently and await _exited(self.proc, _EXIT_GRACE):
            self._close()
            return
        self._close()
        _signal(self.proc, signal.SIGTERM)
        if await _exited(self.proc, _TERM_GRACE):
            return
        await self.kill()

    async def kill(self) -> None:
        self._close()
        _signal(self.proc, signal.SIGKILL)
        # Reaped by asyncio's child watcher even if this wait is cut short.
        await _exited(self.proc, _TERM_GRACE)

    def _close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        self._writer.close()


def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    """Signal the child's whole process group: whatever the task started goes too."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


async def _exited(proc: asyncio.subprocess.Process, within: float) -> bool:
    try:
        async with asyncio.timeout(within):
            await proc.wait()
    except TimeoutError:
        return False
    return True

