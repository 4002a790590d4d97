"""Kafka transactions for `Log.append_atomic`: one transactional producer
per partition this process owns.

The producer's transactional.id names the partition, not the process, so
the broker fences by ownership: when a new owner starts its producer
(`fence`, InitProducerId), the coordinator bumps the id's producer epoch,
aborts any transaction the previous owner left open, and refuses every
later commit from the previous owner's producer (ProducerFenced). The
worker fences before it appends its PartitionClaimed, so a replaced owner's
transaction either committed before the claim (and its checkpoint is
accepted, being older than the claim) or never commits at all.

One transaction per `append`, on a per-partition lock: the Appender
already sends one batch per partition at a time, and a batch that carries
emitted records goes out as one transaction with all its events.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import structlog
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from ..errors import LogError, LogWriteFailed
from .base import Headers, Outgoing
from .kafka_clients import KafkaClients

log = structlog.get_logger("stepline.log.kafka")

BeforeCommit = Callable[[str, int], Awaitable[None]]


def transactional_id(topic: str, partition: int) -> str:
    """The transactional.id of a partition's writer.

    Never change this format: an owner running the old format and one
    running the new would not fence each other.
    """
    return f"stepline:{topic}:{partition}"


class WriterFenced(LogWriteFailed):
    """A newer owner of the partition started its transactional producer:
    this process may not commit to it any more."""

    retriable = False


@dataclass(eq=False, slots=True)
class _Writer:
    producer: AIOKafkaProducer
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    broken: BaseException | None = None


class TransactionalWriters:
    # Test seam: awaited inside each transaction after its records are
    # acknowledged and before it commits (fault tests stop a worker here).
    before_commit: ClassVar[BeforeCommit | None] = None

    def __init__(self, log_: KafkaClients) -> None:
        self._log = log_
        self._writers: dict[tuple[str, int], _Writer] = {}

    def _kwargs(self, tp: TopicPartition) -> dict[str, Any]:
        kwargs = self._log.producer_kwargs()
        kwargs.pop("enable_idempotence", None)  # implied, and aiokafka insists on it
        kwargs.update(
            transactional_id=transactional_id(tp.topic, tp.partition),
            transaction_timeout_ms=self._log.transaction_timeout_ms,
        )
        return kwargs

    async def fence(self, tp: TopicPartition) -> None:
        """Start this partition's writer, fencing every earlier one."""
        await self.unfence(tp)
        producer = AIOKafkaProducer(**self._kwargs(tp))
        # start() waits for InitProducerId, which waits for the previous
        # holder's transaction to finish committing or to be aborted. Its
        # first call on a cluster also creates __transaction_state.
        limit = max(self._log.connect_timeout,
                    self._log.producer_kwargs().get("request_timeout_ms", 30000) / 1000)
        try:
            await asyncio.wait_for(producer.start(), limit)
        except BaseException as exc:
            await asyncio.gather(producer.stop(), return_exceptions=True)
            if not isinstance(exc, (KafkaError, TimeoutError, OSError)):
                raise
            raise LogError(
                f"cannot start the transactional producer of {tp.topic}[{tp.partition}] "
                f"(transactional.id {transactional_id(tp.topic, tp.partition)}) on Kafka at "
                f"{','.join(self._log.bootstrap_servers)}: {type(exc).__name__}: {exc}. The "
                "broker must support transactions; add transactions=false to the log URL to "
                "run without them (stepline.emit is then unavailable)"
            ) from exc
        self._writers[(tp.topic, tp.partition)] = _Writer(producer)

    async def unfence(self, tp: TopicPartition) -> None:
        writer = self._writers.pop((tp.topic, tp.partition), None)
        if writer is None:
            return
        async with writer.lock:  # a transaction under way finishes first
            await asyncio.gather(writer.producer.stop(), return_exceptions=True)

    async def close(self) -> None:
        for topic, partition in list(self._writers):
            await self.unfence(TopicPartition(topic, partition))

    async def append(
        self, tp: TopicPartition, records: Sequence[tuple[bytes, bytes]],
        outgoing: Sequence[Outgoing], headers: Sequence[Headers] | None = None,
    ) -> list[int]:
        writer = self._writers.get((tp.topic, tp.partition))
        if writer is None:
            raise LogError(
                f"no transactional writer for {tp.topic}[{tp.partition}] in this process: "
                "only the partition's owner appends atomically, after fence()"
            )
        async with writer.lock:
            if writer.broken is not None:
                raise self._failed(tp, writer.broken)
            # Shielded: a commit cut off half-way would leave the producer
            # in an unknown state; the transaction ends either way first.
            task = asyncio.ensure_future(self._transact(writer, tp, records, outgoing, headers))
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                await asyncio.gather(task, return_exceptions=True)
                raise
            except (KafkaError, OSError) as exc:
                raise self._failed(tp, exc) from exc

    async def _transact(
        self, writer: _Writer, tp: TopicPartition,
        records: Sequence[tuple[bytes, bytes]], outgoing: Sequence[Outgoing],
        headers: Sequence[Headers] | None,
    ) -> list[int]:
        """1. begin; 2. send the user's records, then the engine's, in order;
        3. wait until every in-sync replica has them; 4. commit. Any failure
        before the commit returns aborts: readers never see a part of it."""
        producer = writer.producer
        await producer.begin_transaction()
        try:
            sent = [
                await producer.send(o.topic, o.value, key=o.key, headers=list(o.headers))
                for o in outgoing
            ]
            own = [await producer.send(tp.topic, v or None, key=k, partition=tp.partition,
                                       headers=list(headers[i]) if headers else None)
                   for i, (k, v) in enumerate(records)]
            metas = await asyncio.gather(*own)
            await asyncio.gather(*sent)
            hook = TransactionalWriters.before_commit
            if hook is not None:
                await hook(tp.topic, tp.partition)
            await producer.commit_transaction()
        except BaseException as exc:
            if isinstance(exc, ProducerFenced) or producer._txn_manager.is_fatal_error():
                writer.broken = exc  # fenced for good: only a new fence() helps
            else:
                try:
                    await producer.abort_transaction()
                except Exception as abort_exc:  # noqa: BLE001 - the first error is the story
                    writer.broken = abort_exc
                    log.warning("could not abort a transaction", topic=tp.topic,
                                partition=tp.partition, error=str(abort_exc))
            raise
        return [int(m.offset) for m in metas]

    def _failed(self, tp: TopicPartition, exc: BaseException) -> LogWriteFailed:
        if isinstance(exc, ProducerFenced):
            err: LogWriteFailed = WriterFenced(
                f"atomic append to {tp.topic}[{tp.partition}] refused: a newer owner of the "
                f"partition fenced this process's transactional producer ({exc})"
            )
        else:
            err = LogWriteFailed(
                f"atomic append to {tp.topic}[{tp.partition}] on Kafka at "
                f"{','.join(self._log.bootstrap_servers)} failed and was aborted: "
                f"{type(exc).__name__}: {exc}"
            )
        err.__cause__ = exc
        return err
