"""Autoscaling on pending work: the API's backlog gauges, driven up and down with real
runs, read as KEDA's Prometheus scaler would read them (deploy/kubernetes/keda-scaledobject.yaml).

A real `stepline serve` and a real `stepline worker`, real HTTP, on sqlite and
on the Kafka broker. Nothing here runs Prometheus or KEDA: the test scrapes
/metrics, evaluates the ScaledObject's query over that scrape, and computes
the replica count KEDA's HPA would ask for.
"""

from __future__ import annotations

import math
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

import stepline as sl

from .conftest import eventually
from .ops_http import APP, Scrape, free_port, read, scrape, stepline, until_status, value

SCALED_OBJECT = Path(__file__).parent.parent / "deploy" / "kubernetes" / "keda-scaledobject.yaml"
RUNS = 250  # more than one worker's threshold: the scaler asks for more than minReplicaCount
QUERY = re.compile(r'max\(sum by \(instance\) \((stepline_\w+)(?:\{pool="(\w+)"\})? '
                   r'\+ (stepline_\w+)(?:\{pool="(\w+)"\})?\)\)')


def scaler() -> dict[str, Any]:
    """The default pool's ScaledObject (the first document; one per worker pool follows)."""
    spec: dict[str, Any] = next(yaml.safe_load_all(SCALED_OBJECT.read_text()))["spec"]
    return spec


def query_value(query: str, scrapes: dict[str, Scrape]) -> float | None:
    """The PromQL of the ScaledObject over scrapes by instance; None for an empty result.

    Only the shape the manifest uses is understood (the match fails loudly
    otherwise): `max(sum by (instance) (A + B))`, where `A + B` matches
    series of the same labels, as Prometheus' vector matching does; `{pool="x"}`
    selects one worker pool's series.
    """
    m = QUERY.fullmatch(query.strip())
    assert m, f"the ScaledObject's query changed shape, teach this test to read it: {query}"
    a, pool_a, b, pool_b = m.groups()
    per_instance = []
    for samples in scrapes.values():
        left = {labels: v for (name, labels), v in samples.items()
                if name == a and (pool_a is None or ("pool", pool_a) in labels)}
        right = {labels: v for (name, labels), v in samples.items()
                 if name == b and (pool_b is None or ("pool", pool_b) in labels)}
        matched = [left[k] + right[k] for k in left.keys() & right.keys()]
        if matched:
            per_instance.append(sum(matched))
    return max(per_instance) if per_instance else None


def desired_replicas(metric: float, spec: dict[str, Any]) -> int:
    """What KEDA's HPA asks for: ceil(metric / threshold), within the bounds, 0 when inactive."""
    meta = spec["triggers"][0]["metadata"]
    low, high = spec.get("minReplicaCount", 0), spec["maxReplicaCount"]
    if metric <= float(meta.get("activationThreshold", 0)) and low == 0:
        return 0
    return min(high, max(low, 1, math.ceil(metric / float(meta["threshold"]))))


@pytest.fixture(params=["sqlite", "kafka"])
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/stepline.db"
    servers = request.getfixturevalue("kafka_bootstrap")
    return f"kafka://{servers}?namespace=keda-{uuid.uuid4().hex[:10]}&partitions=2"


async def test_the_backlog_drives_keda_up_from_no_worker_and_back_down(
    log_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]],
) -> None:
    spec = scaler()
    query = spec["triggers"][0]["metadata"]["query"]
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    errors = tmp_path / "api.err"
    procs.append(stepline("serve", "--app", APP, "--log", log_url, "--port", str(api_port), "--no-auth",
                          "--query-db", str(tmp_path / "query.db"), state=tmp_path, log=errors))
    try:
        await until_status(f"{api}/readyz", 200, procs[0])
    except AssertionError:
        raise AssertionError(read(errors)) from None

    async def reading() -> tuple[float | None, Scrape]:
        samples = await scrape(f"{api}/metrics")
        return query_value(query, {api: samples}), samples

    # Nothing to do: every task the API knows (--app) is reported, at 0.
    metric, samples = await reading()
    assert metric == 0, metric
    assert desired_replicas(0, spec) == spec["minReplicaCount"]
    assert value(samples, "stepline_runs_ready", task="gated", queue="task/gated", pool="default") == 0

    # No worker runs: the runs are pending all the same, and the scaler sees them.
    (tmp_path / "gate").touch()
    async with aiohttp.ClientSession() as http:
        for i in range(5):  # through the API: its trigger counter moves too
            async with http.post(f"{api}/v1/tasks/gated/trigger", json={"payload": {"n": i}}) as r:
                assert r.status == 202, await r.text()
    async with sl.Client(log_url) as client:
        for i in range(5, RUNS):
            await client.trigger("gated", {"n": i})
        await client.trigger("gated", {"n": -1}, delay=3600)  # due in an hour: not pending work

        async def everything_ready() -> bool:
            return (await reading())[0] == RUNS

        await eventually(everything_ready, timeout=60, what=f"the API to count {RUNS} ready runs")
        metric, samples = await reading()
        assert value(samples, "stepline_runs_ready", task="gated", queue="task/gated", pool="default") == RUNS
        assert value(samples, "stepline_runs_running", task="gated", queue="task/gated", pool="default") == 0
        assert value(samples, "stepline_runs_delayed", task="gated", queue="task/gated", pool="default") == 1
        assert value(samples, "stepline_runs_triggered_total", task="gated") == 5
        threshold = float(spec["triggers"][0]["metadata"]["threshold"])
        assert desired_replicas(RUNS, spec) == max(spec["minReplicaCount"], math.ceil(RUNS / threshold))
        assert desired_replicas(RUNS, spec) > spec["minReplicaCount"], "the test's load would not scale"

        # A worker (two runs at a time) takes some: they move from ready to running, the total stays.
        procs.append(stepline("worker", APP, "--log", log_url, "--concurrency", "2", state=tmp_path))

        async def two_running() -> bool:
            samples = (await reading())[1]
            return value(samples, "stepline_runs_running", task="gated", queue="task/gated", pool="default") == 2

        await eventually(two_running, timeout=60, what="two runs to be running")
        metric, samples = await reading()
        assert value(samples, "stepline_runs_ready", task="gated", queue="task/gated", pool="default") == RUNS - 2
        assert metric == RUNS

        # The gate opens, the work drains: the scaler goes back to the floor.
        (tmp_path / "gate").unlink()

        async def drained() -> bool:
            return (await reading())[0] == 0

        await eventually(drained, timeout=120, what="the backlog to drain")
        metric, samples = await reading()
        assert desired_replicas(0, spec) == spec["minReplicaCount"]
        assert value(samples, "stepline_runs_delayed", task="gated", queue="task/gated", pool="default") == 1


async def test_paused_work_is_not_pending(tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    url = f"sqlite:///{tmp_path}/stepline.db"
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    procs.append(stepline("serve", "--app", APP, "--log", url, "--port", str(api_port), "--no-auth",
                          "--query-db", str(tmp_path / "query.db"), state=tmp_path))
    await until_status(f"{api}/readyz", 200, procs[0])
    async with sl.Client(url) as client:
        await client.pause(task="ok", reason="maintenance")
        for i in range(3):
            await client.trigger("ok", {"n": i})

        async def held() -> bool:
            samples = await scrape(f"{api}/metrics")
            return value(samples, "stepline_runs_paused", task="ok", queue="task/ok", pool="default") == 3

        await eventually(held, timeout=30, what="three paused runs")
        samples = await scrape(f"{api}/metrics")
        assert value(samples, "stepline_runs_ready", task="ok", queue="task/ok", pool="default") == 0
        assert query_value(scaler()["triggers"][0]["metadata"]["query"], {api: samples}) == 0
