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
from stepline.log.topics import Topics
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

    def __init__(self, client: ClientBase, partition: int, start: int) -> None:
        self.client = client
        self.partition = partition
        self.start = start
        self.waiters: dict[str, list[asyncio.Future[Event]]] = {}
        self.recent: OrderedDict[str, Event] = OrderedDict()
        # The newest owner epoch seen since `start` (claims before it are not
        # read, so fencing here covers what this watcher saw).
        self.epoch = 0
        self.task = asyncio.create_task(self._loop(), name=f"stepline-watch-{partition}")

    async def _loop(self) -> None:
        try:
            await self._tail()
        except Exception as exc:
            # The log failed under us: waiters get the error now rather than
            # a timeout later, and the next wait starts a new watcher.
            self.client._watchers.pop(self.partition, None)
            for futures in self.waiters.values():
                for f in futures:
                    if not f.done():
                        f.set_exception(exc)
            self.waiters.clear()

    async def _tail(self) -> None:
        offset = self.start
        log_, topic = self.client.log, self.client.topics.runs
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
        self._appender: Appender | None = None
        self._nparts = 0
        self._event_partitions = 0
        self._watchers: dict[int, _Watcher] = {}
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
        self._nparts = await self.log.partitions(self.topics.runs)
        self._event_partitions = await self.log.partitions(self.topics.events)
        self._appender = Appender(self.log, self.topics.runs)

    async def close(self) -> None:
        for w in self._watchers.values():
            w.task.cancel()
        await asyncio.gather(*(w.task for w in self._watchers.values()), return_exceptions=True)
        self._watchers.clear()
        if self._appender is not None:
            await self._appender.drain()
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

    def partition_of(self, run_id: str) -> int:
        return partition_for(run_id.encode(), self._nparts)

    def _task(self, task: TaskRef[Any] | str) -> tuple[str, Task[Any, Any] | None]:
        if isinstance(task, Task):
            return task.id, task
        task_id = task if isinstance(task, str) else task.id
        if self.registry is not None:
            return task_id, self.registry.get(task_id)  # raises UnknownTask
        return task_id, None

    async def _append(self, ev: Event) -> int:
        assert self._appender is not None, "client not started"
        return await self._appender.submit(ev, ev.run_id.encode(), self.partition_of(ev.run_id))

    async def _append_trigger(self, ev: Event) -> int:
        """Append a RunTriggered in a `stepline.trigger` span whose W3C context it carries."""
        where = Destination(self._system, self.topics.runs, self.partition_of(ev.run_id))
        return await self.interceptors.trigger(ev, self._append, where)
