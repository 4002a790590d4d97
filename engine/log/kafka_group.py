"""Consumer groups of a `KafkaLog`: its members (one consumer in the group
each), and committing offsets for groups it has no member of."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, ConsumerStoppedError, KafkaError

from ..errors import LogError, LogWriteFailed
from .base import AssignCallback, Assignment, Membership, RevokeCallback
from .kafka_clients import KafkaClients, _quietly

log = structlog.get_logger("stepline.log.kafka")


def _group_generation(consumer: AIOKafkaConsumer) -> int:
    """The generation of the group the member has just joined.

    aiokafka has no public API for it. Its group coordinator keeps the
    generation from the JoinGroup response in `consumer._coordinator.generation`,
    and it is current by the time `on_partitions_assigned` runs (aiokafka 0.11
    to 0.14). This function is the only place that reaches for it.
    """
    generation = getattr(getattr(consumer, "_coordinator", None), "generation", None)
    if not isinstance(generation, int) or generation < 0:
        raise LogError(
            "cannot read the consumer group generation from aiokafka "
            f"(got {generation!r}); this aiokafka version is not supported"
        )
    return generation


class KafkaGroups:
    """The log's group members, and one committer per group it commits
    for without being a member."""

    def __init__(self, clients: KafkaClients) -> None:
        self._clients = clients
        self.members: list[_KafkaMembership] = []
        self._committers: dict[str, AIOKafkaConsumer] = {}
        self._committer_locks: dict[str, asyncio.Lock] = {}

    async def join(self, group: str, name: str, on_assign: AssignCallback,
                   on_revoke: RevokeCallback, instance_id: str | None = None) -> Membership:
        """Join `group` on the broker topic `name`; returns once assigned."""
        member = _KafkaMembership(self._clients, self.members, group, name, on_assign, on_revoke, instance_id)
        self.members.append(member)
        try:
            await member._join()
        except BaseException:
            await asyncio.shield(member._shutdown())
            raise
        return member

    async def commit(self, group: str, tps: dict[TopicPartition, int]) -> None:
        name = self._clients.group_name(group)
        # The group's own member commits with its generation; anyone else
        # commits as a "simple" consumer, which the broker allows only while
        # the group has no live members.
        for member in self.members:
            consumer = member._consumer
            if member._group == name and consumer is not None and not member._closing:
                if set(tps) <= consumer.assignment():
                    try:
                        await consumer.commit(tps)
                        return
                    except KafkaError as exc:
                        raise self._commit_failed(group, exc) from exc
        lock = self._committer_locks.setdefault(name, asyncio.Lock())
        async with lock:
            committer = self._committers.get(name)
            if committer is None:
                committer = AIOKafkaConsumer(**self._clients.consumer_kwargs(group_id=name))
                try:
                    await self._clients._bounded(committer.start())
                except BaseException:
                    await _quietly(committer.stop())
                    raise
                self._committers[name] = committer
            committer.assign(list(tps))
            committer.pause(*tps)  # it never fetches; it only commits
            try:
                await committer.commit(tps)
            except KafkaError as exc:
                raise self._commit_failed(group, exc) from exc

    def _commit_failed(self, group: str, exc: KafkaError) -> LogError:
        if isinstance(exc, CommitFailedError):
            return LogError(
                f"cannot commit offsets for group {group!r}: the group has live members "
                f"elsewhere (only a partition's owner can commit while it runs); {exc}"
            )
        return LogWriteFailed(f"cannot commit offsets for group {group!r}: {exc}")

    async def leave_all(self) -> None:
        """Leave every group without telling the engine (the log closes)."""
        for member in list(self.members):
            await member._shutdown()

    async def close(self) -> None:
        committers = list(self._committers.values())
        self._committers.clear()
        await _quietly(*(c.stop() for c in committers))


class _Listener(ConsumerRebalanceListener):
    def __init__(self, member: _KafkaMembership) -> None:
        self._member = member

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._member._revoked()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._member._assigned(assigned)


class _KafkaMembership(Membership):
    """One member of a Kafka consumer group, subscribed to one topic.

    The engine's callbacks run one at a time, in order (`_serially`):

    * revoke: awaited inside aiokafka's rebalance, before this member
      rejoins, so a partition is given up before anyone else gets it (all
      members' revokes precede all assigns). Heartbeats continue meanwhile,
      up to the rebalance timeout (max_poll_interval_ms by default).
    * assign: aiokafka calls the listener after SyncGroup but before it
      restarts heartbeats, so a long on_assign there (the engine rebuilds
      partitions) would let the session expire. It runs in a task instead,
      right after; a following revoke waits for it.

    The member never consumes through this consumer (the engine reads with
    `Log.read`): its partitions are paused, and a background task keeps
    calling getmany so aiokafka does not leave the group for not polling
    within max_poll_interval_ms.
    """

    def __init__(self, clients: KafkaClients, members: list[_KafkaMembership], group: str,
                 topic: str, on_assign: AssignCallback, on_revoke: RevokeCallback,
                 instance_id: str | None = None) -> None:
        self._clients = clients
        self._instance_id = instance_id
        self._members = members  # the log's, which this member leaves on shutdown
        self._group = clients.group_name(group)
        self._topic = topic
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._consumer: AIOKafkaConsumer | None = None
        self._assignment = Assignment(frozenset(), 0)
        self._held = False  # the engine was told about self._assignment
        self._left = False
        self._closing = False
        self._joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._last_op: asyncio.Task[None] | None = None
        self._poller: asyncio.Task[None] | None = None

    @property
    def assignment(self) -> Assignment:
        return self._assignment

    async def _join(self) -> None:
        kwargs = self._clients.consumer_kwargs(group_id=self._group)
        if self._instance_id is not None:
            # Static membership: a static member never sends LeaveGroup (aiokafka
            # skips it), so its partitions move only when its session expires,
            # or at once when a member with the same instance id joins.
            kwargs["group_instance_id"] = self._instance_id
        consumer = AIOKafkaConsumer(**kwargs)
        self._consumer = consumer
        await self._clients._bounded(consumer.start())
        consumer.subscribe([self._topic], listener=_Listener(self))
        self._poller = asyncio.create_task(self._keep_polling(),
                                           name=f"stepline-kafka-member:{self._group}")
        await self._joined

    async def _keep_polling(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not self._closing:
            try:
                # Everything assigned is paused: this returns nothing, but it
                # is the poll that keeps the member in the group.
                await consumer.getmany(timeout_ms=1000)
            except asyncio.CancelledError:
                raise
            except ConsumerStoppedError:
                return
            except Exception as exc:  # noqa: BLE001 - report and keep the seat
                if not self._joined.done():
                    self._joined.set_exception(
                        LogError(f"joining group {self._group!r} failed: {exc}")
                    )
                    return
                log.warning("kafka group member poll failed", group=self._group,
                            error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)

    def _serially(self, op: Callable[[], Any]) -> asyncio.Task[None]:
        prev = self._last_op

        async def run() -> None:
            if prev is not None:
                await asyncio.gather(prev, return_exceptions=True)
            await op()

        self._last_op = task = asyncio.get_running_loop().create_task(run())
        return task

    def _assigned(self, assigned: set[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is None or self._closing:
            return
        consumer.pause(*assigned)
        try:
            generation = _group_generation(consumer)
        except LogError as exc:
            if not self._joined.done():
                self._joined.set_exception(exc)
            raise
        assignment = Assignment(
            frozenset(tp.partition for tp in assigned if tp.topic == self._topic), generation
        )

        async def deliver() -> None:
            if self._left or self._closing:
                return
            self._assignment = assignment
            self._held = True
            try:
                await self._on_assign(assignment)
            except Exception as exc:  # noqa: BLE001
                if not self._joined.done():
                    self._joined.set_exception(exc)
                    return
                log.error("on_assign failed", group=self._group, topic=self._topic,
                          partitions=sorted(assignment.partitions),
                          generation=assignment.generation,
                          error=f"{type(exc).__name__}: {exc}")
            if not self._joined.done():
                self._joined.set_result(None)

        self._serially(deliver)

    async def _revoked(self) -> None:
        async def revoke() -> None:
            if self._left or self._closing or not self._held:
                return
            self._held = False
            try:
                await self._on_revoke(self._assignment.partitions)
            except Exception as exc:  # noqa: BLE001 - a rebalance must go on
                log.error("on_revoke failed", group=self._group, topic=self._topic,
                          error=f"{type(exc).__name__}: {exc}")

        await self._serially(revoke)

    async def leave(self) -> None:
        if self._left:
            return

        async def leave() -> None:
            if self._left:
                return
            self._left = True
            if self._held:
                self._held = False
                await self._on_revoke(self._assignment.partitions)

        try:
            await self._serially(leave)
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        """Leave the group without telling the engine (close, failed join)."""
        if self._closing:
            return
        self._closing = True
        if not self._joined.done():
            self._joined.cancel()
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if self._consumer is not None:
            await _quietly(self._consumer.stop())  # sends LeaveGroup
        if self in self._members:
            self._members.remove(self)
