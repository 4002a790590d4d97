"""The client's connection: its log, topics and registry, appends, and sealing of payloads.

`Client` is built in layers, one concern a module, each a base of the next:
`ClientBase` (here) -> `Reading` (_reading.py: runs, events, waiting for results)
-> `Steering` (_steering.py: cancel, retry, pause, fork, tokens) -> `Client` (_client.py: trigger, publish).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from stepline.core import codec
from stepline.core.events import (
    REQUEST_TYPES,
    Event,
    Payload,
)
from stepline.errors import (
    KeyStoreError,
    PayloadTooLarge,
    PayloadValidationError,
)
from stepline.log import open_log
from stepline.log.appender import Appender
from stepline.log.base import Log, partition_for
from stepline.log.topics import DEFAULT_POOL, Topics
from stepline.sdk.context import now_ms
from stepline.sdk.interceptors import (
    Destination,
    Interceptor,
    Interceptors,
    default_interceptors,
    messaging_system,
)
from stepline.sdk.port import ClientPort, TaskRef
from stepline.sdk.task import Registry, Task
from stepline.security.keystore import KeyStore, default_keystore
from stepline.security.sensitive import refuse_envelopes, seal
from stepline.settings import load_settings

# How far along a long read is: (done, total).
Progress = Callable[[int, int], None]

_TERMINAL_TYPES = frozenset({b"RunCompleted", b"RunFailed", b"RunCancelled", b"RunExpired"})


class _Watcher:
    """Tails one partition for terminal events of awaited runs."""

    RECENT = 50_000

    def __init__(self, client: ClientBase, pool: str, partition: int, start: int) -> None:
        self.client = client
        self.pool = pool
        self.partition = partition
        self.start = start
        self.waiters: dict[str, list[asyncio.Future[Event]]] = {}
        self.recent: OrderedDict[str, Event] = OrderedDict()
        # The newest owner epoch seen since `start` (claims before it are not
        # read, so fencing here covers what this watcher saw).
        self.epoch = 0
        self.task = asyncio.create_task(self._loop(), name=f"stepline-watch-{pool}-{partition}")

    async def _loop(self) -> None:
        try:
            await self._tail()
        except Exception as exc:
            # The log failed under us: waiters get the error now rather than
            # a timeout later, and the next wait starts a new watcher.
            self.client._watchers.pop((self.pool, self.partition), None)
            for futures in self.waiters.values():
                for f in futures:
                    if not f.done():
                        f.set_exception(exc)
            self.waiters.clear()

    async def _tail(self) -> None:
        offset = self.start
        log_, topic = self.client.log, self.client.runs_topic(self.pool)
        while True:
            recs = await log_.read(topic, self.partition, offset, 5000, timeout=1.0)
            for r in recs:
                offset = r.offset + 1
                kind = codec.peek_type(r.value)
                if kind == b"PartitionClaimed":
                    self.epoch = max(self.epoch, codec.decode(r.value).epoch)
                    continue
                if kind not in _TERMINAL_TYPES:
                    continue
                ev = codec.decode(r.value)
                if ev.type not in REQUEST_TYPES and ev.epoch < self.epoch:
                    continue  # a replaced owner's late outcome: the fold drops it too
                self.recent[ev.run_id] = ev
                if len(self.recent) > self.RECENT:
                    self.recent.popitem(last=False)
                for f in self.waiters.pop(ev.run_id, ()):
                    if not f.done():
                        f.set_result(ev)


class ClientBase:
    """The state every client operation shares, and appending to the runs topic."""

    def __init__(
        self,
        url: str | None = None,
        *,
        log: Log | None = None,
        registry: Registry | None = None,
        topics: Topics | None = None,
        max_payload_bytes: int | None = None,
        keys: KeyStore | None = None,
        interceptors: Sequence[Interceptor] | None = None,
    ) -> None:
        if (url is None) == (log is None):
            raise ValueError("Client needs exactly one of url= or log=")
        self._owns_log = log is None
        self._keys = keys
        self.log: Log = log if log is not None else open_log(url or "")
        self._system = messaging_system(self.log.url)  # what trace spans say the log is
        self.registry = registry
        self.topics = topics or Topics()
        # Per worker pool (engine/log/topics.py): its runs topic's appender
        # and partition count, for the pools this client has touched.
        self._appenders: dict[str, Appender] = {}
        self._pool_parts: dict[str, int] = {}
        # Which pool each run lives in, as far as this client has seen (a run
        # never moves); bounded, and looked up again on the log when evicted.
        self._homes: OrderedDict[str, str] = OrderedDict()
        self._event_partitions = 0
        self._watchers: dict[tuple[str, int], _Watcher] = {}
        self._token: contextvars.Token[ClientPort | None] | None = None
        self.clock = now_ms
        # Hooks around each trigger (tracing: the run's trace starts here).
        self.interceptors = Interceptors(default_interceptors() if interceptors is None else interceptors)
        # Payloads and event data larger than this are refused before anything
        # is appended (a log record is not a blob store; Kafka's default
        # message limit is 1 MiB for the whole batch).
        self.max_payload_bytes = (max_payload_bytes if max_payload_bytes is not None
                                  else load_settings().max_payload_bytes)

    @property
    def keys(self) -> KeyStore | None:
        """Subject keys of sensitive payload fields: as given, else STEPLINE_KEYS,
        else beside an embedded log (engine/security/keystore.py); None when unconfigured."""
        if self._keys is None:
            self._keys = default_keystore(self.log.url)
        return self._keys

    async def forget(self, subject: str) -> list[str]:
        """Erase a subject: delete its keys, so its sensitive fields are unreadable
        everywhere (they show as "[erased]"; its runs still fold and replay, and
        an attempt that needs them fails with SubjectErased). Returns the key ids
        deleted, empty when the subject had none. See docs/sensitive-data.md."""
        keys = self.keys
        if keys is None:
            raise KeyStoreError("no key store is configured (STEPLINE_KEYS or Client(keys=...)): "
                                "there are no subject keys to delete")
        return await keys.forget(subject)

    async def start(self) -> None:
        if self._owns_log:
            await self.log.start()
        await self.log.ensure_topics(self.topics.specs())
        await self.open_pool(self.topics.pool)
        self._event_partitions = await self.log.partitions(self.topics.events)

    async def close(self) -> None:
        for w in self._watchers.values():
            w.task.cancel()
        await asyncio.gather(*(w.task for w in self._watchers.values()), return_exceptions=True)
        self._watchers.clear()
        for appender in self._appenders.values():
            await appender.drain()
        if self._owns_log:
            await self.log.close()

    def _check_size(self, payload: Payload, where: str) -> None:
        if len(payload.data) > self.max_payload_bytes:
            raise PayloadTooLarge(
                f"{where} is {len(payload.data):,} bytes, over the {self.max_payload_bytes:,}-byte limit "
                f"(STEPLINE_MAX_PAYLOAD_BYTES): store large data elsewhere and pass a reference"
            )

    async def _seal(self, t: Task[Any, Any] | None, data: Payload, where: str, strict: bool = True) -> Payload:
        """Encrypt the task's sensitive fields (engine/security/sensitive.py) before anything is appended.

        Not strict (the event router): a payload that cannot be sealed, e.g.
        without its subject, is recorded as given, and its run fails on its own."""
        spec = t.sensitive if t is not None else None
        if spec is None:
            if strict:
                refuse_envelopes(data, where)
            return data
        try:
            return await seal(spec, data, self.keys, where)
        except PayloadValidationError:
            if strict:
                raise
            return data

    # --- worker pools: where each run lives ---------------------------------

    HOMES = 100_000

    @property
    def _nparts(self) -> int:
        """Partitions of this client's own pool's runs topic."""
        return self._pool_parts[self.topics.pool]

    def runs_topic(self, pool: str) -> str:
        return self.topics.of_pool(pool).runs

    async def open_pool(self, pool: str) -> int:
        """Make sure `pool`'s topics exist (a trigger may come before its first
        worker); its runs topic's partition count."""
        count = self._pool_parts.get(pool)
        if count is None:
            topics = self.topics.of_pool(pool)
            if pool != self.topics.pool:
                await self.log.ensure_topics(topics.pool_specs())
            count = self._pool_parts[pool] = await self.log.partitions(topics.runs)
            self._appenders[pool] = Appender(self.log, topics.runs)
        return count

    async def pools(self) -> list[str]:
        """Every pool with a runs topic on the log, and those the registry declares."""
        found = {p for name in await self.log.topic_names(self.topics.runs_prefix)
                 if (p := self.topics.pool_of(name)) is not None}
        declared = self.registry.pools() if self.registry is not None else []
        return sorted({self.topics.pool, *declared, *found})

    def task_pool(self, task_id: str, t: Task[Any, Any] | None = None) -> str:
        """The pool a task's runs go to: the task's own, else the registry's
        word for it, else the default pool (a client that knows neither)."""
        if t is not None:
            return t.pool
        pool = self.registry.pool_of(task_id) if self.registry is not None else None
        return pool if pool is not None else DEFAULT_POOL

    def _remember(self, run_id: str, pool: str) -> None:
        self._homes[run_id] = pool
        self._homes.move_to_end(run_id)
        if len(self._homes) > self.HOMES:
            self._homes.popitem(last=False)

    async def home(self, run_id: str) -> str:
        """The pool whose runs topic holds `run_id`: remembered, else found by
        looking for the run's key in each pool's partition for it (the
        default pool when no pool has it yet)."""
        pool = self._homes.get(run_id)
        if pool is not None:
            return pool
        pools = await self.pools()
        if len(pools) > 1:
            key = run_id.encode()
            for candidate in pools:
                if await self._holds(candidate, key):
                    self._remember(run_id, candidate)
                    return candidate
        return self.topics.pool if len(pools) == 1 else DEFAULT_POOL

    async def _holds(self, pool: str, key: bytes) -> bool:
        nparts = await self.open_pool(pool)
        topic, p = self.runs_topic(pool), partition_for(key, nparts)
        offset, end = 0, await self.log.end_offset(topic, p)
        while offset < end:
            recs = await self.log.read(topic, p, offset, 5000)
            if not recs:
                break
            if any(r.key == key for r in recs):
                return True
            offset = recs[-1].offset + 1
        return False

    def partition_of(self, run_id: str, pool: str | None = None) -> int:
        """The runs partition of `run_id` in `pool` (this client's own by default)."""
        return partition_for(run_id.encode(), self._pool_parts[pool or self.topics.pool])

    def _task(self, task: TaskRef[Any] | str) -> tuple[str, Task[Any, Any] | None]:
        if isinstance(task, Task):
            return task.id, task
        task_id = task if isinstance(task, str) else task.id
        if self.registry is not None:
            return task_id, self.registry.get(task_id)  # raises UnknownTask
        return task_id, None

    async def _append(self, ev: Event, pool: str | None = None) -> int:
        """Append to the run's pool's runs topic (a request: to where the run lives)."""
        assert self._pool_parts, "client not started"
        pool = pool if pool is not None else await self.home(ev.run_id)
        nparts = await self.open_pool(pool)
        return await self._appenders[pool].submit(ev, ev.run_id.encode(), partition_for(ev.run_id.encode(), nparts))

    async def _append_trigger(self, ev: Event, pool: str | None = None) -> int:
        """Append a RunTriggered, to its task's pool, in a `stepline.trigger`
        span whose W3C context it carries."""
        pool = pool if pool is not None else self.task_pool(ev.task_id)
        self._remember(ev.run_id, pool)

        nparts = await self.open_pool(pool)
        topics = self.topics.of_pool(pool)
        where = Destination(self._system, topics.runs, partition_for(ev.run_id.encode(), nparts))

        async def append(e: Event) -> int:
            return await self._append(e, pool)
        return await self.interceptors.trigger(ev, append, where)
