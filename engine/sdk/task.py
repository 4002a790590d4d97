"""Declaring tasks: `@task`, `Queue`, and the registry workers run from."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import sys
import typing
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Generic, TypeVar, overload

from stepline.consumers.router import Subscription
from stepline.consumers.topic_subscription import KafkaTopic, check_topic_subscriptions
from stepline.core.payloads import Codec, annotations_of
from stepline.core.versions import task_version
from stepline.errors import TaskDefinitionError, UnknownPool, UnknownTask
from stepline.log.topics import DEFAULT_POOL, check_pool
from stepline.sdk.debounce import Debounce
from stepline.sdk.port import ClientPort, RunHandle, current_client
from stepline.sdk.retry import DEFAULT_RETRY, Retry
from stepline.sdk.schedule import Cron, Every
from stepline.sdk.waits import trigger_children
from stepline.security.sensitive import sensitive_spec

PayloadT = TypeVar("PayloadT")
ResultT = TypeVar("ResultT")

TaskFn = Callable[[PayloadT], Awaitable[ResultT]]


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `limit` runs of a queue start per `period` (all workers together)."""

    limit: int
    period: timedelta | float

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise TaskDefinitionError(f"RateLimit: limit must be >= 1, got {self.limit}")
        if self.period_ms <= 0:
            raise TaskDefinitionError(f"RateLimit: period must be positive, got {self.period!r}")

    @property
    def period_ms(self) -> int:
        seconds = self.period.total_seconds() if isinstance(self.period, timedelta) else float(self.period)
        return int(seconds * 1000)


@dataclass(frozen=True, slots=True)
class Queue:
    """A named queue, shared by every task that names it.

    `concurrency_limit` caps how many of its runs execute at once across all
    workers; `key_limit` caps each concurrency key (`trigger(...,
    concurrency_key="tenant-42")`) inside it; `rate_limit` caps starts per
    period. A queue with any of them admits runs through the queues topic;
    without, runs start as soon as a worker has room.
    """

    name: str
    concurrency_limit: int | None = None
    key_limit: int | None = None
    rate_limit: RateLimit | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise TaskDefinitionError("Queue needs a non-empty name")
        for what, value in (("concurrency_limit", self.concurrency_limit), ("key_limit", self.key_limit)):
            if value is not None and value < 1:
                raise TaskDefinitionError(f"Queue {self.name!r}: {what} must be >= 1, got {value}")

    @property
    def limited(self) -> bool:
        return self.concurrency_limit is not None or self.key_limit is not None or self.rate_limit is not None


# Where an attempt runs: in the worker's event loop, or in a fresh child process.
Isolation = typing.Literal["inline", "process"]
ISOLATIONS: tuple[str, ...] = typing.get_args(Isolation)


def _subscriptions(
    task_id: str, on: Subscription | KafkaTopic | Sequence[Subscription | KafkaTopic],
) -> tuple[tuple[Subscription, ...], tuple[KafkaTopic, ...]]:
    """`on=` split by kind; anything else is a definition error, not a silent no-op
    (a bare string would otherwise be read as one subscription per character)."""
    items: Iterable[Any] = (on,) if isinstance(on, (Subscription, KafkaTopic)) else on
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, Iterable):
        items = (items,)
    events: list[Subscription] = []
    topics: list[KafkaTopic] = []
    for item in items:
        if isinstance(item, Subscription):
            events.append(item)
        elif isinstance(item, KafkaTopic):
            topics.append(item)
        else:
            raise TaskDefinitionError(
                f"task {task_id!r}: on= takes sl.Subscription(...) and sl.KafkaTopic(...), or a list of "
                f"them; got {item!r}")
    check_topic_subscriptions(task_id, topics)
    return tuple(events), tuple(topics)


def _max_duration(task_id: str, value: timedelta | float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, timedelta)):
        raise TaskDefinitionError(
            f"task {task_id!r}: max_duration must be seconds or a timedelta, got {value!r}"
        )
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not 0 < seconds < float("inf"):  # also rejects NaN, which compares false
        raise TaskDefinitionError(f"task {task_id!r}: max_duration must be positive and finite, got {value!r}")
    return seconds


def _isolation(
    task_id: str, fn: Callable[..., Any], isolation: str, memory_limit_mb: int | None
) -> tuple[str, int | None]:
    if isolation not in ISOLATIONS:
        raise TaskDefinitionError(
            f"task {task_id!r}: isolation must be one of {', '.join(map(repr, ISOLATIONS))}, got {isolation!r}"
        )
    if memory_limit_mb is not None:
        if isolation != "process":
            raise TaskDefinitionError(
                f"task {task_id!r}: memory_limit_mb needs isolation='process' (a limit "
                f"applies to a whole process, and an inline task shares the worker's)"
            )
        if isinstance(memory_limit_mb, bool) or not isinstance(memory_limit_mb, int) or memory_limit_mb < 1:
            raise TaskDefinitionError(
                f"task {task_id!r}: memory_limit_mb must be a positive int, got {memory_limit_mb!r}"
            )
    if isolation == "process" and "<locals>" in fn.__qualname__:
        raise TaskDefinitionError(
            f"task {task_id!r}: a task with isolation='process' must be declared at module level, "
            f"since its child process finds it again by importing its module; "
            f"{fn.__qualname__} is local to a function"
        )
    return isolation, memory_limit_mb


class Task(Generic[PayloadT, ResultT]):
    """A durable task. Call `trigger` to run it on a worker."""

    def __init__(
        self,
        fn: TaskFn[PayloadT, ResultT],
        *,
        id: str,
        retry: Retry | None = None,
        queue: Queue | None = None,
        on: Subscription | KafkaTopic | Sequence[Subscription | KafkaTopic] = (),
        schedule: Cron | Every | None = None,
        max_duration: timedelta | float | None = None,
        isolation: Isolation = "inline",
        memory_limit_mb: int | None = None,
        debounce: Debounce | None = None,
        version: str | None = None,
        sensitive: Sequence[str] | None = None,
        subject: str | None = None,
        pool: str = DEFAULT_POOL,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TaskDefinitionError(f"task {id!r}: {fn.__qualname__} must be an `async def`")
        if len(inspect.signature(fn).parameters) > 1:
            raise TaskDefinitionError(
                f"task {id!r}: {fn.__qualname__} must take at most one argument (the payload)"
            )
        self.id = id
        self.fn = fn
        # The worker pool that runs it (`stepline worker --pool`); its runs
        # live on that pool's runs topic (engine/log/topics.py).
        try:
            self.pool = check_pool(pool)
        except UnknownPool as exc:
            raise TaskDefinitionError(f"task {id!r}: {exc}") from None
        self.retry = retry or DEFAULT_RETRY
        self.queue = queue or Queue(f"task/{id}")
        self.subscriptions, self.topic_subscriptions = _subscriptions(id, on)
        self.schedule = schedule
        # Seconds per attempt, enforced by the runner; None means unbounded.
        self.max_duration = _max_duration(id, max_duration)
        self.isolation, self.memory_limit_mb = _isolation(id, fn, isolation, memory_limit_mb)
        if debounce is not None and not isinstance(debounce, Debounce):
            raise TaskDefinitionError(f"task {id!r}: debounce must be a stepline.Debounce, got {debounce!r}")
        self.debounce = debounce
        # Recorded on every attempt's RunStarted (engine/core/versions.py).
        self.version = task_version(id, fn, version)
        payload_t, result_t = annotations_of(fn)
        self.payload_codec = Codec(payload_t)
        # Fields encrypted on the log under the subject's key (engine/security/sensitive.py).
        self.sensitive = sensitive_spec(id, payload_t, sensitive, subject)
        self.output_codec = Codec(result_t)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.id!r}>"

    async def __call__(self, payload: PayloadT) -> ResultT:
        """Run the function in-process, not durably: for tests and scripts."""
        return await self.fn(payload)

    async def trigger(
        self,
        payload: PayloadT | Any = None,
        *,
        idempotency_key: str | None = None,
        delay: timedelta | float | None = None,
        priority: int = 0,
        tags: Sequence[str] = (),
        concurrency_key: str | None = None,
        ttl: timedelta | float | None = None,
        idempotency_key_ttl: timedelta | float | None = None,
        client: ClientPort | None = None,
    ) -> RunHandle[ResultT]:
        """Start a run (see Client.trigger for ttl and idempotency_key_ttl)."""
        c = client or current_client()
        handle: RunHandle[ResultT] = await c.trigger(
            self,
            payload,
            idempotency_key=idempotency_key,
            delay=delay,
            priority=priority,
            tags=tags,
            concurrency_key=concurrency_key,
            ttl=ttl,
            idempotency_key_ttl=idempotency_key_ttl,
        )
        return handle

    async def batch_trigger(
        self,
        payloads: Sequence[PayloadT | Any],
        *,
        priority: int = 0,
        tags: Sequence[str] = (),
        client: ClientPort | None = None,
    ) -> list[RunHandle[ResultT]]:
        """Trigger one run per payload, without waiting for them.

        Every payload is validated before the first run is recorded, so a
        bad one fails the whole batch up front rather than half of it.
        """
        c = client or current_client()
        for i, p in enumerate(payloads):
            self.payload_codec.check_and_dump(p, f"payload {i} of the batch for task {self.id!r}")
        return list(await asyncio.gather(*(
            c.trigger(self, p, priority=priority, tags=tags) for p in payloads
        )))

    async def trigger_and_wait(
        self, payload: PayloadT | Any = None, *, priority: int = 0, tags: Sequence[str] = ()
    ) -> ResultT:
        """From inside a task: run this task as a child and return its output.

        The parent is suspended meanwhile and holds no worker slot; a child
        that fails raises ChildRunFailed here.
        """
        [result] = await trigger_children(self, [payload], priority=priority, tags=tags)
        return result

    async def batch_trigger_and_wait(
        self, payloads: Sequence[PayloadT | Any], *, priority: int = 0, tags: Sequence[str] = ()
    ) -> list[ResultT]:
        """From inside a task: one child per payload, in parallel; their outputs
        in order once all have ended. The parent waits suspended."""
        return await trigger_children(self, list(payloads), priority=priority, tags=tags)


class Registry:
    """Tasks by id. A default one backs the decorators; tests make their own."""

    def __init__(self, tasks: Iterable[Task[Any, Any]] = ()) -> None:
        self._tasks: dict[str, Task[Any, Any]] = {}
        for t in tasks:
            self.add(t)

    def add(self, t: Task[Any, Any]) -> None:
        existing = self._tasks.get(t.id)
        if existing is not None and _origin(existing.fn) != _origin(t.fn):
            raise TaskDefinitionError(
                f"task id {t.id!r} is declared twice: by {_origin(existing.fn)} and {_origin(t.fn)}"
            )
        self._tasks[t.id] = t

    def get(self, task_id: str) -> Task[Any, Any]:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise UnknownTask(task_id, list(self._tasks)) from None

    def find(self, task_id: str) -> Task[Any, Any] | None:
        return self._tasks.get(task_id)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def __iter__(self) -> typing.Iterator[Task[Any, Any]]:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def ids(self) -> list[str]:
        return sorted(self._tasks)

    def pools(self) -> list[str]:
        """The worker pools the tasks declare (the default pool always among them)."""
        return sorted({DEFAULT_POOL, *(t.pool for t in self._tasks.values())})

    def pool_of(self, task_id: str) -> str | None:
        """The pool of a known task, else None."""
        t = self._tasks.get(task_id)
        return t.pool if t is not None else None


def _origin(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


default_registry = Registry()


@overload
def task(fn: TaskFn[PayloadT, ResultT], /) -> Task[PayloadT, ResultT]: ...


@overload
def task(
    *,
    id: str | None = None,
    retry: Retry | None = None,
    queue: Queue | None = None,
    on: Subscription | KafkaTopic | Sequence[Subscription | KafkaTopic] = (),
    schedule: Cron | Every | None = None,
    registry: Registry | None = None,
    max_duration: timedelta | float | None = None,
    isolation: Isolation = "inline",
    memory_limit_mb: int | None = None,
    debounce: Debounce | None = None,
    version: str | None = None,
    sensitive: Sequence[str] | None = None,
    subject: str | None = None,
    pool: str = DEFAULT_POOL,
) -> Callable[[TaskFn[PayloadT, ResultT]], Task[PayloadT, ResultT]]: ...


def task(
    fn: TaskFn[PayloadT, ResultT] | None = None,
    /,
    *,
    id: str | None = None,
    retry: Retry | None = None,
    queue: Queue | None = None,
    on: Subscription | KafkaTopic | Sequence[Subscription | KafkaTopic] = (),
    schedule: Cron | Every | None = None,
    registry: Registry | None = None,
    max_duration: timedelta | float | None = None,
    isolation: Isolation = "inline",
    memory_limit_mb: int | None = None,
    debounce: Debounce | None = None,
    version: str | None = None,
    sensitive: Sequence[str] | None = None,
    subject: str | None = None,
    pool: str = DEFAULT_POOL,
) -> Task[PayloadT, ResultT] | Callable[[TaskFn[PayloadT, ResultT]], Task[PayloadT, ResultT]]:
    """Declare a durable task: `@task(id="process-order", retry=Retry(...))`.

    `on=Subscription("user.created", where=...)` also starts it for every
    matching domain event, `on=KafkaTopic("orders", where=...)` for every
    matching record of a Kafka topic; `schedule=Cron("0 3 * * *")` on every tick.
    `max_duration=30` fails an attempt that runs longer (the retry policy
    decides what next); `isolation="process"` runs each attempt in a child
    process, optionally capped at `memory_limit_mb` of address space.
    `debounce=Debounce(30, key=...)` runs only the last of a key's triggers
    that come less than 30 s apart. `version="2"` names the code's version
    (recorded on each attempt; by default a hash of the function's source).
    `subject="user_id"` with fields marked `Annotated[str, Sensitive]` (or
    `sensitive=["email"]`) encrypts them on the log under that subject's key,
    erasable by forgetting the subject (docs/sensitive-data.md).
    `pool="gpu"` runs it only on workers started with `--pool gpu`
    (docs/operations.md, "Worker pools").
    """

    def wrap(f: TaskFn[PayloadT, ResultT]) -> Task[PayloadT, ResultT]:
        t = Task(f, id=id or f.__name__.replace("_", "-"), retry=retry, queue=queue, on=on,
                 schedule=schedule, max_duration=max_duration, isolation=isolation,
                 memory_limit_mb=memory_limit_mb, debounce=debounce, version=version,
                 sensitive=sensitive, subject=subject, pool=pool)
        (registry if registry is not None else default_registry).add(t)
        return t

    return wrap(fn) if fn is not None else wrap


def _syntax_error(exc: SyntaxError) -> TaskDefinitionError:
    """An app that does not parse, as one line naming the place: the traceback
    would only show the importer's frames."""
    where = f"{exc.filename}:{exc.lineno}" if exc.lineno is not None else str(exc.filename)
    return TaskDefinitionError(f"syntax error in {where}: {exc.msg}")


def load_app(target: str) -> Registry:
    """Import a module by file path or dotted name; return the tasks it declared.

    A module may define its own `registry`; otherwise the decorators' default
    registry is used.
    """
    path = Path(target)
    if target.endswith(".py") or path.exists():
        if not path.exists():
            raise TaskDefinitionError(f"no such module file: {target}")
        name = path.stem
        if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path.resolve()):
            module = sys.modules[name]
        else:
            spec = importlib.util.spec_from_file_location(name, path.resolve())
            if spec is None or spec.loader is None:
                raise TaskDefinitionError(f"cannot import {target}")
            sys.path.insert(0, str(path.resolve().parent))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except SyntaxError as exc:
                del sys.modules[name]  # half a module: a later load must try again
                raise _syntax_error(exc) from exc
    else:
        try:
            module = importlib.import_module(target)
        except SyntaxError as exc:
            raise _syntax_error(exc) from exc
        except ImportError as exc:
            raise TaskDefinitionError(f"cannot import app module {target!r}: {exc}") from exc
    reg = getattr(module, "registry", None)
    return reg if isinstance(reg, Registry) else default_registry
