"""The sandbox a recorded run's task body runs in, for replay checks
(replay.py) and shadows (shadow.py).

The body runs with a run context whose journal is the run's folded steps,
so a position the history completed answers from the journal without
running. The context subclass decides where to stop (its `next_position`
raises `Stop`) and the caller judges how the body ended. Nothing leaves
the sandbox: `emit` appends nothing to the log and no client is current,
so a `trigger` or `publish` in the task body fails instead of appending.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, TypeVar

from stepline.core.events import Body
from stepline.projections.runs import RunState
from stepline.sdk.context import RunContext, Suspend, enter_run, exit_run
from stepline.sdk.port import bind_client, unbind_client
from stepline.sdk.task import Task

C = TypeVar("C", bound=RunContext)


class Stop(BaseException):
    """The body reached a position the sandbox must not execute (one the
    history has no completed record for, or holds under another name).
    A BaseException, like Suspend, so `except Exception` in the task does
    not swallow it."""


def sandbox_context(cls: type[C], state: RunState, emitted: list[Body] | None = None) -> C:
    """A `cls` context of the run's recorded journal, clock and patch answers;
    what the body emits goes to `emitted` when given, else nowhere."""

    def emit(body: Body) -> asyncio.Future[int]:
        if emitted is not None:
            emitted.append(body)  # into memory, never onto the log
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        done.set_result(-1)
        return done

    return cls(state.run_id, state.task_id, state.attempt, state.steps, emit,
               clock=lambda: state.updated_at, patches=state.patch_answers())


@dataclass(slots=True)
class Ending:
    """How a sandboxed body ended: it returned, raised, stopped or suspended."""

    returned: Any = None
    raised: Exception | None = None
    expired: bool = False  # the deadline passed (`raised` is what that ended in)
    suspended: Suspend | None = None  # a wait_for_token whose token position has no record


async def _body(task: Task[Any, Any], payload: Any, ctx: RunContext) -> Any:
    token = enter_run(ctx)
    # No client: a trigger or publish in the body must fail, not append.
    client_token = bind_client(None)
    try:
        return await task.fn(payload)
    finally:
        unbind_client(client_token, None)
        exit_run(token)


async def run_sandboxed(task: Task[Any, Any], payload: Any, ctx: RunContext,
                         timeout: float | None) -> Ending:
    """Run `task`'s body on `payload` in `ctx`, for at most `timeout` seconds.
    A `Stop` ends it with nothing returned; where it stopped is the context's."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            # A task of its own, so nothing the body sets in contextvars leaks out.
            return Ending(returned=await asyncio.create_task(_body(task, payload, ctx)))
    except Stop:
        return Ending()
    except Suspend as s:
        return Ending(suspended=s)
    except Exception as exc:
        return Ending(raised=exc, expired=deadline.expired())
