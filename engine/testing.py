"""Unit-test tasks in milliseconds: an in-process engine on a virtual clock.

    from stepline.testing import TestEngine

    async def test_the_order_ships_after_three_days() -> None:
        async with TestEngine() as engine:              # memory:// log, client, worker
            assert await engine.run(ship_order, {"id": "o-1"}) == "shipped"
            assert engine.clock.elapsed >= timedelta(days=3)

The worker and client are the real ones; only time is virtual. A
`VirtualClock` moves when told (`engine.advance(...)`), or, with
`auto_advance=True` (the default), jumps straight to the next durable timer
(a `sleep`, a retry back-off, a `delay=`, a wait's timeout, a TTL) whenever
the engine has nothing else to do. So `sl.sleep(timedelta(days=3))` takes
as long as the code around it. `engine.settle()` waits until nothing is
left to do; inside `with engine.manual():` the clock stands still, e.g. to
publish the event a run waits for before its timeout passes.

Only durable time is virtual. Code reading the wall clock (`datetime.now()`
in a step, `asyncio.sleep`, `max_duration`) runs in real time. Schedule
ticks (`sl.Every`, `sl.Cron`) fire when the clock passes them but do not
make auto-advance jump, so an hourly schedule does not keep time running;
`engine.advance(...)` moves through them. Queues with a `rate_limit` are
not supported: their admission waits in real time.

As a pytest plugin (`pytest_plugins = ["stepline.testing"]` in the root
conftest.py) it adds the fixtures `stepline_engine` (a started TestEngine on
`stepline_registry`, which is `sl.default_registry` unless overridden) and
the marker `@pytest.mark.stepline(auto_advance=False, ...)`, whose keywords
go to TestEngine. The fixtures need pytest-asyncio (`pip install
'stepline[testing]'`), and unmarked `async def` tests its
`asyncio_mode = "auto"`; without pytest this module still gives TestEngine
and VirtualClock.

For tests against a real Kafka broker the plugin also has `stepline_kafka_url`:
a `kafka://` URL with a namespace of its own per test, on one single-node
broker per session that testcontainers starts (`KafkaTestContainer`; the
optional `testcontainers` package and a Docker engine are needed). The image
is the setting `kafka_image` (STEPLINE_KAFKA_IMAGE, default `apache/kafka:<version>`);
any image that takes the official image's KAFKA_* variables works.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

from stepline.client import Client, RunHandle
from stepline.core.events import Event
from stepline.core.ids import TOKEN, wait_token
from stepline.log.memory import MemoryLog, MemoryStore
from stepline.log.topics import Topics
from stepline.projections.runs import PartitionRuns, RunState
from stepline.runtime.worker import Worker
from stepline.sdk.schedule import Scheduled, Scheduler, fire_ticks
from stepline.sdk.task import Registry, Task, default_registry
from stepline.settings import load_settings

R = TypeVar("R")

# Loop iterations with nothing appended, no attempt running and no timer
# set or moved before the engine counts as idle. Every reaction in the
# engine (a tail folding an append, a timer firing, the router matching an
# event) appends again within a handful of iterations on the memory log,
# which never waits on real time; 50 leaves a wide margin and costs well
# under a millisecond.
_QUIET_ITERATIONS = 50
# While an attempt runs (a step may wait on real I/O) idleness is polled at
# this real interval rather than by spinning the loop.
_BUSY_POLL_S = 0.001


def _ms(duration: timedelta | float) -> int:
    secs = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
    return int(secs * 1000)


@dataclass(eq=False, slots=True)
class _Deadline:
    due_ms: int
    woken: asyncio.Event
    auto: bool  # whether auto-advance may jump to it


class VirtualClock:
    """Epoch milliseconds that move only when told.

    Pass it wherever Stepline takes a `clock` (Worker, Client.clock): it is a
    callable returning ms. The engine's TimerWheel waits on it through
    `wait_until`, so timers fire when the clock passes them, not after real
    time. `advance` jumps at once and fires everything due on the way; a
    TestEngine's `advance` steps through the timers one by one instead,
    letting the engine react to each (a retry due at +60 s, then its next
    back-off, ...).
    """

    def __init__(self, start: datetime | None = None) -> None:
        begin = start if start is not None else datetime.now(UTC)
        self._start = self._now = int(begin.timestamp() * 1000)
        self._deadlines: dict[int, _Deadline] = {}
        self._ids = itertools.count()
        self._listeners: list[Callable[[], None]] = []
        # Bumped on every change (time moved, a deadline came or went): how
        # a TestEngine tells an idle engine from one still reacting.
        self.version = 0

    def __call__(self) -> int:
        return self._now

    def now_ms(self) -> int:
        return self._now

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._now / 1000, UTC)

    @property
    def elapsed(self) -> timedelta:
        """How far the clock moved since it was made."""
        return timedelta(milliseconds=self._now - self._start)

    def advance(self, by: timedelta | float) -> None:
        """Move forward by `by` (seconds or a timedelta) and wake what is due."""
        ms = _ms(by)
        if ms < 0:
            raise ValueError(f"a clock only moves forward; got {by!r}")
        self.advance_to(self._now + ms)

    def advance_to(self, ms: int) -> None:
        if ms < self._now:
            raise ValueError(f"a clock only moves forward: {ms} is before {self._now}")
        self._now = ms
        for d in self._deadlines.values():
            if d.due_ms <= ms:
                d.woken.set()
        self._changed()

    def next_deadline(self, *, auto_only: bool = False) -> int | None:
        """The earliest time something waits for, after now (None: nothing waits)."""
        dues = [d.due_ms for d in self._deadlines.values()
                if d.due_ms > self._now and (d.auto or not auto_only)]
        return min(dues, default=None)

    async def wait_until(self, due_ms: int, woken: asyncio.Event) -> None:
        """Return once `woken` is set; the clock sets it when it reaches `due_ms`.

        The hook TimerWheel uses (engine/runtime/timers.py): whoever else holds
        `woken` may set it earlier, e.g. for a nearer timer.
        """
        await self._wait(due_ms, woken, auto=True)

    async def sleep_until(self, due_ms: int, *, auto: bool = True) -> None:
        """Sleep until the clock reads `due_ms`. With `auto=False` an
        auto-advancing engine does not jump to this time by itself."""
        await self._wait(due_ms, asyncio.Event(), auto=auto)

    async def _wait(self, due_ms: int, woken: asyncio.Event, auto: bool) -> None:
        if due_ms <= self._now:
            woken.set()
            return
        key = next(self._ids)
        self._deadlines[key] = _Deadline(due_ms, woken, auto)
        self._changed()
        try:
            await woken.wait()
        finally:
            del self._deadlines[key]
            self._changed()

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` on every change; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _changed(self) -> None:
        self.version += 1
        for listener in list(self._listeners):
            listener()


class _VirtualScheduler(Scheduler):
    """Fires schedule ticks when the virtual clock passes them.

    The worker's own Scheduler reads the wall clock and sleeps in real time;
    the TestEngine puts this one in its place. Ticks do not drive
    auto-advance (an hourly schedule would otherwise keep the clock jumping
    for as long as anything is awaited): they fire when the clock passes
    them, e.g. under `engine.advance(timedelta(hours=3))`.
    """

    def __init__(self, registry: Registry, client: Client, clock: VirtualClock) -> None:
        super().__init__(registry, client)
        self._clock = clock

    async def _run(self, task: Scheduled) -> None:
        sched = task.schedule
        assert sched is not None
        await fire_ticks(sched, self._clock.now(), partial(self._fire, task, sched), self._sleep_until)

    async def _sleep_until(self, tick: datetime) -> None:
        await self._clock.sleep_until(int(tick.timestamp() * 1000), auto=False)


def _run_id(run: RunHandle[Any] | str) -> str:
    return run if isinstance(run, str) else run.run_id


class TestEngine:
    """A memory:// log, a Client and a Worker on a VirtualClock, in-process.

        async with TestEngine(registry) as engine:
            output = await engine.run(my_task, payload)

    `registry=None` uses `sl.default_registry`. Inside `async with`,
    `my_task.trigger(...)` finds `engine.client` like any open client.
    With `auto_advance=False` the clock moves only by `advance()`: a run
    that sleeps stays suspended until the test moves time past its wake-up,
    and `run()` of such a task times out (trigger, advance, then await the
    handle's result instead). `start` fixes the clock's starting time
    (default: now); `partitions` is the topics' partition count.
    """

    __test__ = False  # a helper named Test*, not a pytest test class

    def __init__(
        self,
        registry: Registry | None = None,
        *,
        auto_advance: bool = True,
        clock: VirtualClock | None = None,
        start: datetime | None = None,
        partitions: int = 1,
        concurrency: int = 64,
    ) -> None:
        self.registry = registry if registry is not None else default_registry
        self.clock = clock if clock is not None else VirtualClock(start)
        self.auto_advance = auto_advance
        self.topics = Topics(partitions=partitions)
        self.concurrency = concurrency
        # A store of its own: engines never see each other's records, and
        # nothing is left in the process-wide memory:// table afterwards.
        self._store = MemoryStore()
        self._client_log = MemoryLog("stepline-testing", store=self._store)
        self._worker_log = MemoryLog("stepline-testing", store=self._store)
        self.client = Client(log=self._client_log, registry=self.registry, topics=self.topics)
        self.client.clock = self.clock
        self._worker: Worker | None = None
        # The workers of the other pools the registry declares (the main
        # worker runs the default pool), each with a client of its pool.
        self._pools: list[tuple[Client, Worker]] = []
        self._advancer: asyncio.Task[None] | None = None
        self._news = asyncio.Event()
        self._holds = 0
        self._unsubscribe: Callable[[], None] | None = None

    @property
    def worker(self) -> Worker:
        if self._worker is None:
            raise RuntimeError("the TestEngine is not started; use `async with TestEngine(...)`")
        return self._worker

    # --- lifecycle ---------------------------------------------------------

    async def __aenter__(self) -> TestEngine:
        await self._client_log.start()
        await self._worker_log.start()
        await self.client.__aenter__()
        worker = Worker(
            self.registry, self._worker_log, topics=self.topics, concurrency=self.concurrency,
            worker_id="stepline-testing", clock=self.clock, client=self.client,
        )
        # The worker builds a wall-clock scheduler when the registry has
        # scheduled tasks; ticks must follow the virtual clock instead.
        if getattr(worker, "_scheduler", None) is not None:
            worker._scheduler = _VirtualScheduler(
                Registry(t for t in self.registry if t.pool == self.topics.pool), self.client, self.clock)
        try:
            await worker.start()
        except BaseException:
            # The start error is the one to see; closing a half-started
            # worker may fail on what it never set up.
            with contextlib.suppress(Exception):
                await worker.close()
            await self._close()
            raise
        self._worker = worker
        try:
            for pool in self.registry.pools():
                if pool != self.topics.pool:
                    await self._start_pool(pool)
        except BaseException:
            await self._close()
            raise
        self._unsubscribe = self.clock.subscribe(self._news.set)
        if self.auto_advance:
            self._advancer = asyncio.create_task(self._auto_advance(), name="stepline-testing-clock")
        return self

    async def _start_pool(self, pool: str) -> None:
        client = Client(log=self._client_log, registry=self.registry, topics=self.topics.of_pool(pool))
        client.clock = self.clock
        await client.start()
        worker = Worker(self.registry, self._worker_log, topics=client.topics, concurrency=self.concurrency,
                        worker_id=f"stepline-testing-{pool}", clock=self.clock, client=client)
        if getattr(worker, "_scheduler", None) is not None:
            worker._scheduler = _VirtualScheduler(
                Registry(t for t in self.registry if t.pool == pool), client, self.clock)
        self._pools.append((client, worker))
        await worker.start()

    @property
    def _active(self) -> int:
        return self.worker.active + sum(w.active for _, w in self._pools)

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        failure: BaseException | None = None
        if self._advancer is not None:
            if self._advancer.done() and not self._advancer.cancelled():
                failure = self._advancer.exception()
            self._advancer.cancel()
            await asyncio.gather(self._advancer, return_exceptions=True)
            self._advancer = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for client, worker in reversed(self._pools):
            with contextlib.suppress(Exception):
                await worker.close()
            await client.close()
        self._pools.clear()
        if self._worker is not None:
            await self._worker.close()
            self._worker = None
        await self.client.__aexit__(None, None, None)
        await self._worker_log.close()
        await self._client_log.close()
        if failure is not None:
            raise RuntimeError("the TestEngine's auto-advance failed") from failure

    # --- time --------------------------------------------------------------

    async def advance(self, by: timedelta | float) -> None:
        """Move the clock forward by `by`, letting the engine react at every
        timer on the way (each due sleep, retry, delay, timeout, schedule
        tick), and return once it is idle at the new time."""
        target = self.clock.now_ms() + _ms(by)
        with self.manual():
            await self.settle()
            while (due := self.clock.next_deadline()) is not None and due <= target:
                self.clock.advance_to(due)
                await self.settle()
            self.clock.advance_to(target)
            await self.settle()

    async def settle(self) -> None:
        """Return once the engine has nothing left to do: every append read
        back and reacted to, no attempt running, and under auto-advance
        (outside `manual()`) no timer left to jump to."""
        while True:
            await self._quiet()
            due = self._auto_due()
            if due is None:
                return
            self.clock.advance_to(due)

    async def _quiet(self) -> None:
        """Wait until nothing changes for a while at the current time."""
        quiet, last = 0, None
        while quiet < _QUIET_ITERATIONS:
            busy = self._active > 0
            seen = self._activity()
            if seen == last and not busy:
                quiet += 1
            else:
                quiet, last = 0, seen
            await asyncio.sleep(_BUSY_POLL_S if busy else 0)

    @contextlib.contextmanager
    def manual(self) -> Iterator[None]:
        """Inside, the clock moves only by `advance()`, as with
        auto_advance=False: e.g. to let a run reach a wait, then publish
        the event it waits for before its timeout can pass."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            self._news.set()

    def _activity(self) -> tuple[int, int, int]:
        with self._store.lock:
            records = sum(len(p.records) for t in self._store.topics.values() for p in t.partitions)
        return records, self._active, self.clock.version

    def _auto_due(self) -> int | None:
        """The timer auto-advance would jump to next (None: none, or held)."""
        if not self.auto_advance or self._holds:
            return None
        return self.clock.next_deadline(auto_only=True)

    async def _auto_advance(self) -> None:
        while True:
            self._news.clear()
            if self._auto_due() is None:
                await self._news.wait()
                continue
            await self.settle()

    # --- runs --------------------------------------------------------------

    async def trigger(self, task: Task[Any, R] | str, payload: Any = None, **options: Any) -> RunHandle[R]:
        """Start a run (options as for Client.trigger: delay=, idempotency_key=, ...)."""
        return await self.client.trigger(task, payload, **options)

    async def run(
        self, task: Task[Any, R] | str, payload: Any = None, *, timeout: float = 30.0, **options: Any
    ) -> R:
        """Trigger a run and return its output; RunFailedError if it fails.

        `timeout` is real seconds, a guard against a test that hangs (under
        auto_advance=False a sleeping run waits for `advance()`).
        """
        handle = await self.trigger(task, payload, **options)
        return await handle.result(timeout)

    async def get_run(self, run: RunHandle[Any] | str) -> RunState:
        return await self.client.get_run(_run_id(run))

    async def history(self, run: RunHandle[Any] | str) -> list[Event]:
        """Every event of the run, in log order."""
        return [ev for _, ev in await self.client.history(_run_id(run))]

    async def runs(self, task: Task[Any, Any] | str | None = None) -> list[RunState]:
        """Every run (of `task`, if given), oldest first; same-time runs in log order."""
        parts: dict[tuple[str, int], PartitionRuns] = {}
        first: dict[str, tuple[int, int]] = {}
        async for pool, p, offset, ev in self.client.pool_events():
            part = parts.get((pool, p))
            if part is None:
                part = parts[(pool, p)] = PartitionRuns(p)
            part.apply(ev, offset)
            if ev.run_id:
                first.setdefault(ev.run_id, (p, offset))
        task_id = task if isinstance(task, str) or task is None else task.id
        out = [r for part in parts.values() for r in part.runs.values()
               if task_id is None or r.task_id == task_id]
        out.sort(key=lambda r: (r.created_at, *first.get(r.run_id, (0, 0))))
        return out

    async def publish(self, name: str, data: Any = None, *, key: str | None = None) -> str:
        """Publish a domain event (subscriptions, `wait_for_event`); its event id."""
        return await self.client.publish(name, data, key=key, source="test")

    async def complete_token(self, token: object, data: Any = None) -> RunState:
        """Resume the run waiting on `token` (a WaitToken or its id) with `data`."""
        return await self.client.complete_token(str(token), data)

    async def open_tokens(self, run: RunHandle[Any] | str) -> list[str]:
        """The tokens the run is waiting on now (`wait_for_token`), by journal position."""
        state = await self.get_run(run)
        return [wait_token(state.run_id, s.step) for s in sorted(state.steps.values(), key=lambda s: s.step)
                if s.name == TOKEN and s.status == "waiting"]


# --- a Kafka broker in a container -------------------------------------------------


class KafkaContainerError(RuntimeError):
    """No broker container: testcontainers or the engine is missing, the image is absent, or it never came up."""


class KafkaTestContainer:
    """A single-node KRaft broker in a container, started with testcontainers.

        with KafkaTestContainer() as kafka:
            url = kafka.log_url()           # kafka://127.0.0.1:PORT?namespace=test-...

    The broker is published on 127.0.0.1 only. `env` adds or overrides
    KAFKA_* settings, `labels` go on the container; `pull=False` never
    contacts a registry (a missing image is then an error naming it).
    """

    def __init__(self, image: str | None = None, *, env: dict[str, str] | None = None,
                 labels: dict[str, str] | None = None, pull: bool = True, start_timeout: float = 120.0) -> None:
        self.image = image or load_settings().kafka_image
        self.env = dict(env or {})
        self.labels = dict(labels or {})
        self.pull = pull
        self.start_timeout = start_timeout
        self.container: Any = None
        self.bootstrap_servers = ""

    def start(self) -> str:
        """Start the broker; its bootstrap servers ("127.0.0.1:PORT")."""
        try:
            from testcontainers.core.container import DockerContainer
            from testcontainers.core.docker_client import DockerClient
            from testcontainers.core.wait_strategies import LogMessageWaitStrategy
        except ImportError as exc:
            raise KafkaContainerError(
                f"a Kafka container needs the testcontainers package (pip install testcontainers): {exc}") from None
        try:
            client = DockerClient()
            client.client.ping()
        except Exception as exc:
            raise KafkaContainerError(f"no Docker engine answers (DOCKER_HOST or /var/run/docker.sock): {exc}") from None
        if not self.pull and not client.client.images.list(name=self.image):
            raise KafkaContainerError(f"the image {self.image} is not on this Docker engine and pulling is off "
                                      "(in Stepline's repository: scripts/images.sh build kafka)")
        with socket.socket() as probe:  # a free port, so the broker can advertise it before it starts
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        container = DockerContainer(self.image, labels=self.labels)
        # EXTERNAL: clients on the host; BROKER: the broker reaching itself (transaction markers).
        for key, value in {
            "CLUSTER_ID": "c3RlcGxpbmUtdGVzdC1rYQ", "KAFKA_NODE_ID": "1",
            "KAFKA_PROCESS_ROLES": "broker,controller",
            "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
            "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
            "KAFKA_LISTENERS": "EXTERNAL://:9092,CONTROLLER://:9093,BROKER://:9094",
            "KAFKA_ADVERTISED_LISTENERS": f"EXTERNAL://127.0.0.1:{port},BROKER://localhost:9094",
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "EXTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT,BROKER:PLAINTEXT",
            "KAFKA_INTER_BROKER_LISTENER_NAME": "BROKER",
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1", "KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS": "1",
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1", "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
            "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR": "1",
            "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR": "1",
            "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
            **self.env,
        }.items():
            container.with_env(key, value)
        ports: dict[str, Any] = container.ports  # docker-py takes (host ip, port): loopback only
        ports["9092/tcp"] = ("127.0.0.1", port)
        wait = LogMessageWaitStrategy("Kafka Server started")
        container.waiting_for(wait.with_startup_timeout(int(self.start_timeout)))
        self.container = container
        try:
            container.start()
        except Exception as exc:
            logs = self.logs()[-3000:]
            self.stop()
            raise KafkaContainerError(f"the Kafka container ({self.image}) did not come up: {exc}\n{logs}") from None
        self.bootstrap_servers = f"127.0.0.1:{port}"
        return self.bootstrap_servers

    def log_url(self, namespace: str | None = None) -> str:
        """A `kafka://` URL on this broker; a fresh namespace unless one is given."""
        if not self.bootstrap_servers:
            raise KafkaContainerError("the Kafka container is not started")
        return f"kafka://{self.bootstrap_servers}?namespace={namespace or 'test-' + uuid.uuid4().hex[:12]}"

    def logs(self) -> str:
        """What the broker printed so far (stdout and stderr)."""
        try:
            out, err = self.container.get_logs()
            return str(out.decode(errors="replace") + err.decode(errors="replace"))
        except Exception:  # not created, or already gone
            return ""

    def stop(self) -> None:
        container, self.container = self.container, None
        self.bootstrap_servers = ""
        if container is not None:
            with contextlib.suppress(Exception):  # already removed
                container.stop()

    def __enter__(self) -> KafkaTestContainer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the pytest plugin ----------------------------------------------------------

try:
    import pytest
    import pytest_asyncio
except ImportError:  # the kit works without them; only the fixtures need both
    pass
else:

    def pytest_configure(config: pytest.Config) -> None:
        config.addinivalue_line(
            "markers",
            "stepline(**options): TestEngine options for the stepline_engine fixture, "
            "e.g. auto_advance=False",
        )

    @pytest.fixture
    def stepline_registry() -> Registry:
        """The registry `stepline_engine` runs; override it to use your own."""
        return default_registry

    @pytest_asyncio.fixture
    async def stepline_engine(
        request: pytest.FixtureRequest, stepline_registry: Registry
    ) -> AsyncIterator[TestEngine]:
        """A started TestEngine on `stepline_registry`; options from @pytest.mark.stepline(...)."""
        marker = request.node.get_closest_marker("stepline")
        options = dict(marker.kwargs) if marker is not None else {}
        async with TestEngine(stepline_registry, **options) as engine:
            yield engine

    @pytest.fixture(scope="session")
    def stepline_kafka_container() -> Iterator[KafkaTestContainer]:
        """One broker container for the session (see KafkaTestContainer)."""
        with KafkaTestContainer() as kafka:
            yield kafka

    @pytest.fixture
    def stepline_kafka_url(stepline_kafka_container: KafkaTestContainer) -> str:
        """A `kafka://` URL with a namespace of its own, on the session's broker container."""
        return stepline_kafka_container.log_url()


__all__ = ["KafkaContainerError", "KafkaTestContainer", "TestEngine", "VirtualClock"]
