"""Shared fixtures: one engine suite, every backend.

`backend_url` is parametrised over the log backends; an engine test that
takes it runs once per backend. The Kafka backend joins the list when it
exists, and every engine test then runs against a real broker too.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import stepline as sl
from stepline.log.topics import Topics

from .ops_http import stop

# "kafka" joins this list with the Kafka issue: the engine suite passes on
# a local broker, but is not yet stable enough there to gate CI on.
BACKENDS = ["memory", "sqlite", "kafka"]

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Bootstrap servers of a real broker: KAFKA_BOOTSTRAP_SERVERS, or started."""
    from tests.kafka_broker import BrokerUnavailable, ensure_broker

    try:
        return ensure_broker()
    except BrokerUnavailable as exc:
        if IN_CI:
            pytest.fail(f"CI=true and no Kafka broker could be had: {exc}")
        pytest.skip(f"no Kafka broker (a failure under CI=true, a skip otherwise): {exc}")


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty log of each backend; Kafka gets a new namespace per test."""
    kind = request.param
    if kind == "memory":
        return f"memory://test-{uuid.uuid4().hex}"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/stepline.db"
    servers = request.getfixturevalue("kafka_bootstrap")
    return f"kafka://{servers}?namespace=test-{uuid.uuid4().hex[:12]}"


async def eventually(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float = 10.0,
    what: str = "condition",
) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


class Engine:
    """A client and a worker on one log, restartable like a process."""

    def __init__(self, url: str, registry: sl.Registry, concurrency: int = 64, **worker_options: Any) -> None:
        self.url = url
        self.registry = registry
        self.concurrency = concurrency
        self.worker_options = worker_options
        self.topics = Topics(partitions=3)
        self.client = sl.Client(url, registry=registry, topics=self.topics)
        self.worker: sl.Worker | None = None
        self._worker_log: Any = None

    async def start(self) -> Engine:
        await self.client.__aenter__()
        await self.start_worker()
        return self

    async def start_worker(self) -> sl.Worker:
        # A worker gets its own connection to the log, as a separate process would.
        self._worker_log = sl.open_log(self.url)
        await self._worker_log.start()
        self.worker = sl.Worker(
            self.registry, self._worker_log, topics=self.topics,
            concurrency=self.concurrency, client=self.client, **self.worker_options,
        )
        await self.worker.start()
        return self.worker

    async def stop_worker(self) -> None:
        if self.worker is not None:
            await self.worker.close()
            await self._worker_log.close()
            self.worker = None

    async def restart_worker(self) -> sl.Worker:
        await self.stop_worker()
        return await self.start_worker()

    async def close(self) -> None:
        await self.stop_worker()
        await self.client.__aexit__(None, None, None)


@pytest.fixture
async def engine_factory(backend_url: str) -> AsyncIterator[Callable[..., Awaitable[Engine]]]:
    engines: list[Engine] = []

    async def make(registry: sl.Registry, concurrency: int = 64, **worker_options: Any) -> Engine:
        e = Engine(backend_url, registry, concurrency, **worker_options)
        engines.append(e)
        return await e.start()

    yield make
    for e in engines:
        await e.close()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts (tests/ops_http.py's `stepline`); stopped when it ends, whatever happened."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        stop(p)
