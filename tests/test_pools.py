"""Worker pools: a task declares its pool, a worker runs one pool's runs only,
and child runs, subscriptions, event waits and reads work across pools."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import stepline as sl
from stepline.core.events import RunStarted
from stepline.log.topics import Topics
from stepline.projections.query import QueryProjector, QueryStore, RunFilter
from stepline.testing import TestEngine
from tests.apps.pools_app import registry

from .conftest import eventually
from .ops_http import stepline

APP = str(Path(__file__).parent / "apps" / "pools_app.py")


@pytest.fixture(params=["sqlite", "kafka"])
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/stepline.db"
    servers = request.getfixturevalue("kafka_bootstrap")
    return f"kafka://{servers}?namespace=pools-{uuid.uuid4().hex[:10]}&partitions=2"


async def started_by(client: sl.Client, run_id: str) -> set[str]:
    """The worker ids that started attempts of a run, from its events."""
    return {ev.body.worker_id for _, ev in await client.history(run_id) if isinstance(ev.body, RunStarted)}


class Pools:
    """A default-pool and a gpu-pool worker on one log, each with its own
    connection and a client of its pool, as two processes would have."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = sl.Client(url, registry=registry)
        self.workers: dict[str, sl.Worker] = {}
        self._clients: list[sl.Client] = []

    async def start(self) -> None:
        await self.client.__aenter__()
        for pool in ("default", "gpu"):
            c = sl.Client(self.url, registry=registry, topics=Topics(pool=pool))
            await c.__aenter__()
            self._clients.append(c)
            w = sl.Worker(registry, c.log, topics=c.topics, client=c, worker_id=f"worker-{pool}")
            await w.start()
            self.workers[pool] = w

    async def close(self) -> None:
        for w in self.workers.values():
            await w.close()
        for c in [*self._clients, self.client]:
            await c.__aexit__(None, None, None)


@pytest.fixture
async def pools(log_url: str) -> AsyncIterator[Pools]:
    p = Pools(log_url)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


async def test_each_pool_runs_only_its_tasks_and_a_child_across_pools_answers_its_parent(pools: Pools) -> None:
    c = pools.client
    parent = await c.trigger("handle", 20)
    assert await asyncio.wait_for(parent.result(), 60) == 41
    [child] = [r for r in await c.list_runs() if r.task_id == "render"]
    assert child.parent_run_id == parent.run_id
    assert await started_by(c, parent.run_id) == {"worker-default"}
    assert await started_by(c, child.run_id) == {"worker-gpu"}
    # Where they live: the default pool keeps the topic name of a log without pools.
    assert await c.home(parent.run_id) == "default" and await c.home(child.run_id) == "gpu"
    assert pools.workers["gpu"].topics.runs.endswith(".runs.gpu")
    assert pools.workers["default"].topics.runs.endswith(".runs")


async def test_a_gpu_parent_gets_its_default_child_and_an_event_wait_resolves(pools: Pools) -> None:
    c = pools.client
    run = await c.trigger("batch", 7)

    async def waiting() -> bool:
        state = await c.get_run(run.run_id)
        return state.status == "suspended" and any(s.name != "child" and s.status == "waiting"
                                                   for s in state.steps.values())
    await eventually(waiting, 60, "the gpu run waiting for its event")
    await c.publish("batch.approved", {"by": "ana"})
    assert await asyncio.wait_for(run.result(), 60) == "#7 ana"
    [child] = [r for r in await c.list_runs() if r.task_id == "label"]
    assert (child.parent_run_id, child.parent_pool) == (run.run_id, "gpu")
    assert await started_by(c, run.run_id) == {"worker-gpu"}
    assert await started_by(c, child.run_id) == {"worker-default"}


async def test_an_event_from_one_pool_starts_a_subscribed_task_of_another(pools: Pools) -> None:
    c = pools.client
    up = await c.trigger("upload", 512)
    await asyncio.wait_for(up.result(), 60)

    async def subscribed() -> list[sl.RunState]:
        return [r for r in await c.list_runs() if r.task_id == "on-upload" and r.status == "completed"]
    [run] = await eventually(subscribed, 60, "the gpu task started by the event")
    assert await started_by(c, run.run_id) == {"worker-gpu"}
    assert await started_by(c, up.run_id) == {"worker-default"}


async def test_a_client_that_knows_nothing_of_the_app_finds_runs_of_every_pool(pools: Pools, log_url: str) -> None:
    handle = await pools.client.trigger("render", 4)
    assert await asyncio.wait_for(handle.result(), 60) == 8
    async with sl.Client(log_url) as bare:  # no registry: pools come from the log's topics
        assert await bare.pools() == ["default", "gpu"]
        state = await bare.get_run(handle.run_id)
        assert (state.task_id, state.status) == ("render", "completed")
        assert (await bare.wait(handle.run_id, timeout=30)).status == "completed"
        assert handle.run_id in {r.run_id for r in await bare.list_runs()}


async def test_the_read_model_indexes_every_pools_runs(pools: Pools, tmp_path: Path) -> None:
    a = await pools.client.trigger("render", 1)
    b = await pools.client.trigger("label", 2)
    await asyncio.wait_for(asyncio.gather(a.result(), b.result()), 60)
    async with QueryStore(str(tmp_path / "query.db")) as store:
        projector = QueryProjector(pools.client.log, store)
        await projector.catch_up()
        page = await store.list_runs(RunFilter(), 50, None)
        assert {a.run_id, b.run_id} <= {row["run_id"] for row in page.items}


async def test_a_pooled_task_triggered_without_knowing_its_pool_is_not_run_by_another_pool(pools: Pools) -> None:
    async with sl.Client(pools.url) as bare:  # no registry: "render" goes to the default pool
        handle = await bare.trigger("render", 3)
        state = await bare.wait(handle.run_id, timeout=60)
    assert state.status == "failed"
    assert "runs in pool 'gpu'" in (state.error.message if state.error else "")
    assert await started_by(pools.client, handle.run_id) == set()  # refused before any attempt
    assert await pools.client.home(handle.run_id) == "default"
    assert not [r for r in await pools.client.list_runs() if r.task_id == "render" and r.status == "completed"]


def test_an_unknown_pool_is_refused_with_one_line(tmp_path: Path) -> None:
    for pool, says in (("nope", "no task of the app declares pool='nope'; its pools: default, gpu"),
                       ("Bad.Pool", "pool name 'Bad.Pool' is not valid")):
        done = subprocess.run([sys.executable, "-m", "stepline.cli", "worker", APP, "--pool", pool,
                               "--log", f"sqlite:///{tmp_path}/stepline.db"],
                              capture_output=True, text=True, timeout=60, env={"COLUMNS": "300", "PATH": ""})
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0], done.stderr
    assert not (tmp_path / "stepline.db").exists()  # refused before the log was opened


async def test_pool_workers_as_processes_each_run_their_pools_runs(
    log_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]],
) -> None:
    for pool in ("gpu", "default"):
        procs.append(stepline("worker", APP, "--log", log_url, "--pool", pool, "--console-logs",
                              state=tmp_path, log=tmp_path / f"{pool}.err"))
    async with sl.Client(log_url, registry=registry) as c:
        parent = await c.trigger("handle", 5)
        assert await asyncio.wait_for(parent.result(), 120) == 11
        [child] = [r for r in await c.list_runs() if r.task_id == "render"]
        gpu_pid, default_pid = (str(p.pid) for p in procs)
        [parent_worker] = await started_by(c, parent.run_id)
        [child_worker] = await started_by(c, child.run_id)
        # Worker ids are host-pid-random: which process ran which run.
        assert parent_worker.split("-")[-2] == default_pid, parent_worker
        assert child_worker.split("-")[-2] == gpu_pid, child_worker


async def test_the_test_engine_runs_every_pool() -> None:
    async with TestEngine(registry) as engine:
        assert await engine.run("handle", 3) == 7
        [child] = await engine.runs("render")
        assert [ev.body.worker_id for ev in await engine.history(child.run_id)
                if isinstance(ev.body, RunStarted)] == ["stepline-testing-gpu"]
