"""Appends of a `KafkaLog`: one flusher per partition packs every call
queued meanwhile into one record batch (see the module docstring of
engine/log/kafka.py). Records go out with the headers their call gave
(engine events: engine/log/headers.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from ..errors import LogWriteFailed
from .base import Headers
from .kafka_clients import DEFAULT_MAX_BATCH_SIZE, KafkaClients, _fail
from .kafka_tail import Tails

# Upper bound on what one record adds to a v2 batch beyond key and value
# (length, attributes, timestamp and offset deltas, key/value lengths,
# header count, as varints), and the batch header.
_RECORD_OVERHEAD = 40
_BATCH_OVERHEAD = 61
# And per header, beyond its name and value: their two length varints.
_HEADER_OVERHEAD = 10


@dataclass(slots=True)
class _Call:
    records: Sequence[tuple[bytes, bytes]]
    size: int
    future: asyncio.Future[list[int]]
    headers: Sequence[Headers] | None = None  # one per record


@dataclass(slots=True)
class _Partial:
    """A call whose records span several batches (only when it is bigger than one)."""

    call: _Call
    offsets: list[int] = field(default_factory=list)
    parts_left: int = 0


def _size(records: Sequence[tuple[bytes, bytes]], headers: Sequence[Headers] | None = None) -> int:
    if len(records) == 1:
        k, v = records[0]
        size = len(k) + len(v) + _RECORD_OVERHEAD
    else:
        size = sum(len(k) + len(v) + _RECORD_OVERHEAD for k, v in records)
    if headers:
        size += sum(_headers_size(h) for h in headers)
    return size


def _headers_size(headers: Headers) -> int:
    return sum(len(name.encode()) + len(value) + _HEADER_OVERHEAD for name, value in headers)


def _check_headers(records: Sequence[tuple[bytes, bytes]], headers: Sequence[Headers]) -> None:
    if len(headers) != len(records):
        raise ValueError(f"{len(headers)} headers for {len(records)} records: give one per record")


class KafkaAppends:
    """The partitions' append queues and flushers, on the log's producer."""

    def __init__(self, clients: KafkaClients, tails: Tails) -> None:
        self._clients = clients
        self._tails = tails
        self.producer: AIOKafkaProducer | None = None
        self._pending: dict[tuple[str, int], list[_Call]] = {}
        self._flushers: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._inflight: set[asyncio.Future[Any]] = set()

    def _producer(self) -> AIOKafkaProducer:
        if self.producer is None:
            raise RuntimeError(f"{self._clients.url} is not started; use `async with` or start()")
        return self.producer

    def submit(self, name: str, partition: int, records: Sequence[tuple[bytes, bytes]],
               headers: Sequence[Headers] | None = None) -> asyncio.Future[list[int]]:
        """Queue a call's records (and their headers) for the partition's
        flusher; its offsets come in the future."""
        if headers is not None:
            _check_headers(records, headers)
        key = (name, partition)
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        queue = self._pending.get(key)
        if queue is None:
            queue = self._pending[key] = []
        queue.append(_Call(records, _size(records, headers), future, headers))
        if key not in self._flushers:
            self._flushers[key] = asyncio.create_task(
                self._flush(key), name=f"stepline-kafka-flush:{name}:{partition}"
            )
        return future

    async def _flush(self, key: tuple[str, int]) -> None:
        """Send everything queued for one partition, one batch per round."""
        producer = self._producer()
        topic, partition = key
        limit = self._batch_limit()
        taken: list[_Call] = []
        try:
            while True:
                queue = self._pending.get(key)
                if not queue:
                    self._pending.pop(key, None)
                    return
                # Take whole calls while they fit; a call bigger than a batch
                # goes alone, split over as many batches as it needs.
                n, size = 0, _BATCH_OVERHEAD
                while n < len(queue) and (n == 0 or size + queue[n].size <= limit):
                    size += queue[n].size
                    n += 1
                    if size > limit:
                        break
                taken = queue[:n]
                del queue[:n]
                if len(taken) == 1 and taken[0].size + _BATCH_OVERHEAD > limit:
                    await self._send_split(producer, topic, partition, taken[0], limit)
                    taken = []
                    continue
                batch = producer.create_batch()
                stamps: list[int] = []
                overflow = False
                for call in taken:
                    for i, (k, v) in enumerate(call.records):
                        # aiokafka's C batch builder takes a list only.
                        meta = batch.append(key=k, value=v or None, timestamp=None,
                                            headers=list(call.headers[i]) if call.headers else None)
                        if meta is None:
                            overflow = True
                            break
                        stamps.append(meta.timestamp)
                if overflow:  # cannot happen while _RECORD_OVERHEAD is an upper bound
                    for call in taken:
                        _fail(call.future, LogWriteFailed(
                            f"append to {topic}[{partition}]: records overflowed a batch"))
                    continue
                batch.close()
                await self._send(producer, topic, partition, batch, taken, stamps)
                taken = []
        except BaseException as exc:
            # Nothing may wait forever: fail what this flusher still held.
            for call in [*taken, *self._pending.pop(key, [])]:
                _fail(call.future, exc)
            raise
        finally:
            self._flushers.pop(key, None)

    def _batch_limit(self) -> int:
        return int(self._clients.producer_kwargs().get("max_batch_size", DEFAULT_MAX_BATCH_SIZE))

    async def _send(self, producer: AIOKafkaProducer, topic: str, partition: int,
                    batch: Any, calls: list[_Call], stamps: list[int] | None = None) -> None:
        """Send one closed batch; `stamps` (its records' create times) let
        the tails serve the records to this process's readers at once."""
        try:
            # Returns once the batch is queued (after the previous batch of
            # this partition was taken by the sender); the future resolves
            # with the base offset once every in-sync replica has it.
            delivered = await producer.send_batch(batch, topic, partition=partition)
        except KafkaError as exc:
            for call in calls:
                _fail(call.future, self._write_failed(topic, partition, exc))
            return

        def done(fut: asyncio.Future[Any]) -> None:
            self._inflight.discard(fut)
            if fut.cancelled():
                exc: BaseException = self._write_failed(topic, partition, asyncio.CancelledError())
            elif fut.exception() is not None:
                exc = self._write_failed(topic, partition, fut.exception())  # type: ignore[arg-type]
            else:
                meta = fut.result()
                base = meta.offset
                for call in calls:
                    n = len(call.records)
                    if not call.future.done():
                        call.future.set_result(list(range(base, base + n)))
                    base += n
                if stamps is not None:
                    # After the writers' futures, so that (callbacks run in
                    # order) a writer learns its offsets before this
                    # process's readers see the records: the engine skips
                    # decoding its own events by offset.
                    # -1: the records keep their create times; else the topic
                    # stamps them all with the broker's append time.
                    times = stamps if meta.timestamp == -1 else [meta.timestamp] * len(stamps)
                    self._tails.appended(meta.topic_partition, meta.offset,
                                         [r for call in calls for r in call.records], times)
                return
            for call in calls:
                _fail(call.future, exc)

        self._inflight.add(delivered)
        delivered.add_done_callback(done)

    async def _send_split(self, producer: AIOKafkaProducer, topic: str, partition: int,
                          call: _Call, limit: int) -> None:
        """A call too big for one batch: consecutive batches, in order.

        Within this process nothing else writes the partition in between;
        another producer could, so such a call is contiguous only per batch.
        """
        chunks: list[list[tuple[bytes, bytes]]] = [[]]
        chunk_headers: list[list[Headers]] = [[]]
        size = _BATCH_OVERHEAD
        for i, (k, v) in enumerate(call.records):
            hdrs: Headers = call.headers[i] if call.headers else ()
            rec = len(k) + len(v) + _RECORD_OVERHEAD + _headers_size(hdrs)
            if chunks[-1] and size + rec > limit:
                chunks.append([])
                chunk_headers.append([])
                size = _BATCH_OVERHEAD
            chunks[-1].append((k, v))
            chunk_headers[-1].append(hdrs)
            size += rec
        partial = _Partial(call, parts_left=len(chunks))
        results: list[list[int] | None] = [None] * len(chunks)
        loop = asyncio.get_running_loop()
        for i, (chunk, hdrs_of) in enumerate(zip(chunks, chunk_headers)):
            sub: asyncio.Future[list[int]] = loop.create_future()

            def collect(fut: asyncio.Future[list[int]], i: int = i) -> None:
                if call.future.done():
                    return
                if fut.exception() is not None:
                    call.future.set_exception(fut.exception())  # type: ignore[arg-type]
                    return
                results[i] = fut.result()
                partial.parts_left -= 1
                if partial.parts_left == 0:
                    call.future.set_result([o for r in results for o in (r or [])])

            sub.add_done_callback(collect)
            batch = producer.create_batch()
            for (k, v), hdrs in zip(chunk, hdrs_of):
                batch.append(key=k, value=v or None, timestamp=None, headers=list(hdrs))
            batch.close()
            await self._send(producer, topic, partition, batch, [_Call(chunk, 0, sub)])

    def _write_failed(self, topic: str, partition: int, exc: BaseException) -> LogWriteFailed:
        err = LogWriteFailed(
            f"append to {topic}[{partition}] on Kafka at {','.join(self._clients.bootstrap_servers)} "
            f"failed: {type(exc).__name__}: {exc}"
        )
        err.__cause__ = exc
        return err

    async def close(self) -> None:
        """Appends already queued still go out and get their answer."""
        flushers = list(self._flushers.values())
        if flushers:
            await asyncio.gather(*flushers, return_exceptions=True)
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
