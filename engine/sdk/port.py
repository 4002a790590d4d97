"""The client port: what code below the client layer asks of an open client.

A task handle (`task.trigger(...)`), a child run (`trigger_and_wait`,
`wait_for_any`), `stepline.publish` and the scheduler need a client, but the
client layer is built on this one (it needs `Task` to validate payloads).
So the dependency is turned around: this module says what such code asks of a
client (`ClientPort`), `stepline.Client` implements it and binds itself here
while it is open (`async with Client(...)`), and a worker binds its own client
around each attempt. Nothing here imports the client layer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

from stepline.core.payloads import Codec
from stepline.errors import NoClient, RunFailedError
from stepline.projections.runs import COMPLETED, EXPIRED, RunState

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class TaskRef(Protocol[R_co]):
    """What a handle or a wait needs of a task (`stepline.Task` is one): its id,
    its output's codec, and through `fn` the type of its result."""

    @property
    def id(self) -> str: ...

    @property
    def output_codec(self) -> Codec: ...

    @property
    def fn(self) -> Callable[..., Awaitable[R_co]]: ...


class ClientPort(Protocol):
    """The requests of `stepline.Client` that task code and handles make."""

    async def trigger(
        self,
        task: TaskRef[R] | str,
        payload: Any = None,
        *,
        idempotency_key: str | None = None,
        delay: timedelta | float | None = None,
        priority: int = 0,
        tags: Sequence[str] = (),
        concurrency_key: str | None = None,
        parent_run_id: str | None = None,
        parent_step: int | None = None,
        ttl: timedelta | float | None = None,
        idempotency_key_ttl: timedelta | float | None = None,
        validate: bool = True,
    ) -> RunHandle[R]: ...

    async def publish(self, name: str, data: Any = None, *, key: str | None = None, source: str = "api") -> str: ...

    async def wait(self, run_id: str, timeout: float | None = None, from_offset: int | None = None) -> RunState: ...

    async def get_run(self, run_id: str) -> RunState: ...


@dataclass(frozen=True)
class RunHandle(Generic[R]):
    """A triggered run: its id, and its result once it ends."""

    run_id: str
    task_id: str
    client: ClientPort
    output_codec: Codec
    offset: int | None = None

    async def result(self, timeout: float | timedelta | None = None) -> R:
        """Wait for the run to end; its output, or RunFailedError."""
        secs = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        state = await self.client.wait(self.run_id, timeout=secs, from_offset=self.offset)
        if state.status != COMPLETED or state.output is None:
            err = state.error
            if err is not None:
                raise RunFailedError(self.run_id, state.status, err.type, err.message)
            if state.status == EXPIRED:
                raise RunFailedError(self.run_id, state.status, "Expired", "it did not start within its ttl")
            raise RunFailedError(self.run_id, state.status, "Cancelled", "the run was cancelled")
        value: R = self.output_codec.load(state.output, f"output of run {self.run_id}")
        return value

    async def state(self) -> RunState:
        return await self.client.get_run(self.run_id)


# The client of this context: an open `Client`, or a worker's own around an
# attempt. A context variable, so concurrent attempts and tests never share one.
_bound: ContextVar[ClientPort | None] = ContextVar("stepline_client", default=None)


def bound_client() -> ClientPort | None:
    """The client bound in this context, if any."""
    return _bound.get()


def bind_client(client: ClientPort | None) -> Token[ClientPort | None]:
    """Make `client` this context's client (None: none, e.g. a replay that must not append)."""
    return _bound.set(client)


def unbind_client(token: Token[ClientPort | None], client: ClientPort | None) -> None:
    """Undo `bind_client`; from another context (a test fixture's teardown), only clear `client`."""
    try:
        _bound.reset(token)
    except ValueError:
        if _bound.get() is client:
            _bound.set(None)


def current_client() -> ClientPort:
    """The client bound here, or NoClient saying how to open one."""
    c = _bound.get()
    if c is None:
        raise NoClient(
            "no Stepline client is open here: use `async with stepline.Client(url):` "
            "around the trigger, or pass client=..."
        )
    return c


__all__ = ["ClientPort", "RunHandle", "TaskRef", "bind_client", "bound_client", "current_client", "unbind_client"]
