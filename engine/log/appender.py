"""Batched, ordered appends: the group commit above the log port.

Callers submit events one at a time and get a future that resolves once the
event is durable. Per partition at most one `Log.append` is in flight; what
arrives meanwhile waits and goes out as the next batch. That keeps every
partition's events in submission order on any backend, and turns many
concurrent small appends into few large ones: the busier the worker, the
bigger the batches.

An event submitted with `outgoing` records (a step's checkpoint and what
the step emitted with `stepline.emit`) makes its whole batch go out as one
transaction (`Log.append_atomic`): the batch keeps its queue order, later
submissions wait behind it as behind any batch, and only batches that
carry emitted records pay for the transaction.

On a log that keeps record headers (Kafka) each event also gets its
headers (engine/log/headers.py); elsewhere none are built.

`timed`, when given, is told how long each successful `Log.append` took
(seconds, records): the worker's append-latency histogram.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from stepline.core import codec
from stepline.core.events import Event
from stepline.log.base import Headers, Log, Outgoing
from stepline.log.headers import event_headers

AppendedCallback = Callable[[int, list[int], list[Event]], None]
# Called with an event's future as soon as it is settled, in the same turn of
# the loop (a done-callback would run one turn later).
Then = Callable[["asyncio.Future[int]"], None]
TimedCallback = Callable[[float, int], None]


@dataclass(slots=True)
class _Pending:
    keys: list[bytes] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    futures: list[asyncio.Future[int]] = field(default_factory=list)
    outgoing: list[Outgoing] = field(default_factory=list)
    headers: list[Headers] | None = None
    thens: list[tuple[asyncio.Future[int], Then]] = field(default_factory=list)


class Appender:
    def __init__(self, log: Log, topic: str, on_appended: AppendedCallback | None = None,
                 timed: TimedCallback | None = None) -> None:
        self._log = log
        self._topic = topic
        self._on_appended = on_appended
        self._timed = timed
        self._pending: dict[int, _Pending] = {}
        self._flushing: dict[int, asyncio.Task[None]] = {}
        self._headers = log.record_headers

    def submit(
        self, event: Event, key: bytes, partition: int, outgoing: Sequence[Outgoing] = (),
        then: Then | None = None,
    ) -> asyncio.Future[int]:
        """Queue one event (with records for other topics, written in the
        same transaction); the future gives its offset once durable, and
        `then`, if given, is called with it as soon as it is settled.

        Encoding errors raise here, at the caller.
        """
        value = codec.encode(event)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        pend = self._pending.get(partition)
        if pend is None:
            pend = self._pending[partition] = _Pending(headers=[] if self._headers else None)
        if pend.headers is not None:
            pend.headers.append(event_headers(event))
        pend.keys.append(key)
        pend.values.append(value)
        pend.events.append(event)
        pend.futures.append(fut)
        pend.outgoing.extend(outgoing)
        if then is not None:
            pend.thens.append((fut, then))
        if partition not in self._flushing:
            self._flushing[partition] = asyncio.create_task(self._flush(partition))
        return fut

    async def _flush(self, partition: int) -> None:
        try:
            while True:
                pend = self._pending.pop(partition, None)
                if pend is None:
                    return
                records = list(zip(pend.keys, pend.values))
                began = time.perf_counter()
                try:
                    if pend.outgoing:
                        offsets = await self._log.append_atomic(
                            self._topic, partition, records, pend.outgoing, pend.headers)
                    elif pend.headers is not None:
                        offsets = await self._log.append(
                            self._topic, partition, records, pend.headers)
                    else:
                        offsets = await self._log.append(self._topic, partition, records)
                except BaseException as exc:
                    for f in pend.futures:
                        if f.done():
                            continue
                        if isinstance(exc, Exception):
                            f.set_exception(exc)
                        else:
                            f.cancel()
                    _call_thens(pend)
                    if not isinstance(exc, Exception):
                        raise
                    continue
                if self._timed is not None:
                    self._timed(time.perf_counter() - began, len(records))
                if self._on_appended is not None:
                    self._on_appended(partition, offsets, pend.events)
                for f, off in zip(pend.futures, offsets):
                    if not f.done():
                        f.set_result(off)
                _call_thens(pend)
        finally:
            self._flushing.pop(partition, None)

    async def drain(self) -> None:
        """Wait until everything submitted so far is durable (or failed)."""
        while self._flushing:
            await asyncio.gather(*list(self._flushing.values()), return_exceptions=True)


def _call_thens(pend: _Pending) -> None:
    for fut, then in pend.thens:
        then(fut)
