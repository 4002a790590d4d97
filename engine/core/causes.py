"""What made a trigger happen, as the trace should show it.

A run triggered by the event router or a schedule is not a child of
whatever code triggered it: a fan-out starts many runs, each a trace of its
own, hours after the event was published. Its trace links to the context of
its cause instead (an OpenTelemetry span link). The router (consumers/, below
the observability layer) and the scheduler name the cause here, around the
trigger call; the tracing interceptor reads it where it opens the trigger span.
A context variable, not a trigger argument, because the cause is about the
trace and the call's signature is about the run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["Cause", "current_cause", "under_cause"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Cause:
    """The W3C context a trigger links to, and what it was: a record of the
    log (its id and place), and attributes for the link."""

    traceparent: str
    tracestate: str | None = None
    message_id: str | None = None
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    attributes: Mapping[str, str | int] = field(default_factory=dict)


_cause: ContextVar[Cause | None] = ContextVar("stepline_trigger_cause", default=None)


def current_cause() -> Cause | None:
    return _cause.get()


async def under_cause(cause: Cause | None, call: Callable[[], Awaitable[T]]) -> T:
    """Await `call()` with `cause` as the cause of the triggers it makes.

    Set inside the coroutine, so it holds for this call alone even when
    several run together (asyncio.gather copies the context per task).
    """
    token = _cause.set(cause)
    try:
        return await call()
    finally:
        _cause.reset(token)
