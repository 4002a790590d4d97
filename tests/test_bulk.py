"""Bulk cancel, retry and replay by filter (engine/client/bulk.py), on every backend,
through the Python API, the HTTP API and the CLI.

The runs acted on are read from the query projection with the run list's
own filter; these tests bring a projection up to the log (`catch_up`) and
check what the log then says about each run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

import stepline as sl
from stepline.client.bulk import InvalidBulkRequest, bulk_action, replay_key
from stepline.core.ids import idempotent_run_id
from stepline.projections.query import QueryProjector
from stepline.projections.query_store import QueryStore, RunFilter
from stepline.server import ServeConfig, create_app

from .conftest import Engine, eventually

APP = str(Path(__file__).parent / "apps" / "bulk_app.py")


def _app() -> sl.Registry:
    reg = sl.Registry()

    @sl.task(id="sync", registry=reg, retry=sl.Retry(max_attempts=1))
    async def sync(payload: Any) -> str:
        kind = payload.get("fail")
        if kind == "timeout":
            raise TimeoutError(f"upstream timed out for {payload['n']}")
        if kind == "value":
            raise ValueError(f"bad row {payload['n']}")
        return f"synced {payload['n']}"

    @sl.task(id="held", registry=reg)
    async def held(payload: Any) -> str:
        return f"held {payload['n']}"

    return reg


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[QueryStore]:
    async with QueryStore(tmp_path / "query.db") as s:
        yield s


async def _caught_up(e: Engine, store: QueryStore) -> QueryStore:
    await QueryProjector(e.client.log, store, topics=e.client.topics).catch_up()
    return store


async def _finished(e: Engine, handles: list[Any]) -> None:
    for h in handles:
        await e.client.wait(h.run_id, timeout=20)


async def test_a_dry_run_counts_and_the_cancel_then_acts_on_exactly_those(
    engine_factory: Any, store: QueryStore,
) -> None:
    e = await engine_factory(_app())
    done = [await e.client.trigger("sync", {"n": i}) for i in range(2)]
    await _finished(e, done)
    await e.client.pause(task="held")  # keeps these pending, whatever the timing
    pending = [await e.client.trigger("held", {"n": i}) for i in range(5)]
    await _caught_up(e, store)

    everything = RunFilter(task=None)
    dry = await bulk_action(e.client, store, "cancel", everything, dry_run=True, page_size=2)
    assert (dry.matched, dry.acted, dict(dry.skipped)) == (7, 5, {"already completed": 2})
    assert set(dry.sample) == {h.run_id for h in pending}
    # A dry run acts on nothing.
    assert [(await e.client.get_run(h.run_id)).status for h in pending] == ["pending"] * 5

    report = await bulk_action(e.client, store, "cancel", everything, request_id="ops-1", page_size=2)
    assert (report.matched, report.acted) == (7, 5)
    for h in pending:
        assert (await e.client.wait(h.run_id, timeout=20)).status == "cancelled"
    for h in done:
        assert (await e.client.get_run(h.run_id)).status == "completed"


async def test_retry_by_error_type_and_time_window_and_a_repeat_acts_on_nothing_twice(
    engine_factory: Any, store: QueryStore,
) -> None:
    e = await engine_factory(_app())
    early = [await e.client.trigger("sync", {"n": f"early{i}", "fail": "timeout"}) for i in range(2)]
    await _finished(e, early)
    boundary = e.client.clock() + 1
    while e.client.clock() <= boundary:  # the next runs are created strictly after it
        pass
    timeouts = [await e.client.trigger("sync", {"n": f"t{i}", "fail": "timeout"}) for i in range(3)]
    values = [await e.client.trigger("sync", {"n": f"v{i}", "fail": "value"}) for i in range(2)]
    await _finished(e, timeouts + values)
    await _caught_up(e, store)

    where = RunFilter(task="sync", statuses=("failed",), error_type="TimeoutError", created_from=boundary)
    report = await bulk_action(e.client, store, "retry", where, request_id="retry-1")
    assert (report.matched, report.acted) == (3, 3)
    for h in timeouts:  # retried, and failed again
        await eventually(lambda h=h: _attempts(e, h.run_id), timeout=20, what="the retry to fail again")
    for h in early + values:
        assert (await e.client.get_run(h.run_id)).attempt == 1
    await _caught_up(e, store)

    # The same request again: the projection lists them failed again, the
    # requests are appended again, and the fold recognises every one.
    again = await bulk_action(e.client, store, "retry", where, request_id="retry-1")
    assert again.acted == 3
    await _settle(e)
    for h in timeouts:
        state = await e.client.get_run(h.run_id)
        assert (state.status, state.attempt) == ("failed", 2)
    # A new request is a new retry.
    await bulk_action(e.client, store, "retry", where, request_id="retry-2")
    for h in timeouts:
        await eventually(lambda h=h: _attempts(e, h.run_id, 3), timeout=20, what="the second retry")


async def _attempts(e: Engine, run_id: str, n: int = 2) -> bool:
    state = await e.client.get_run(run_id)
    return state.status == "failed" and state.attempt == n


async def _settle(e: Engine) -> None:
    """The worker has read everything appended so far: a run triggered now in
    every partition has ended."""
    nparts = await e.client.log.partitions(e.client.topics.runs)
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < nparts:
        key = f"settle-{e.client.clock()}-{i}"
        keys.setdefault(e.client.partition_of(idempotent_run_id("held", key)), key)
        i += 1
    for key in keys.values():
        await (await e.client.trigger("held", {"n": key}, idempotency_key=key)).result(timeout=20)


async def test_replay_starts_each_ended_run_again_from_scratch_once_per_request(
    engine_factory: Any, store: QueryStore,
) -> None:
    e = await engine_factory(_app())
    ok = [await e.client.trigger("sync", {"n": i}, tags=["batch-7"]) for i in range(3)]
    other = await e.client.trigger("sync", {"n": 99})
    await _finished(e, [*ok, other])
    await _caught_up(e, store)

    where = RunFilter(tags=("batch-7",))
    report = await bulk_action(e.client, store, "replay", where, request_id="rp")
    assert (report.matched, report.acted) == (3, 3)
    new_ids = {idempotent_run_id("sync", replay_key("rp", h.run_id)): h.run_id for h in ok}
    assert set(report.sample) == set(new_ids)
    for new_id, original in new_ids.items():
        await e.client.wait(new_id, timeout=20)
        state = await e.client.get_run(new_id)
        first = await e.client.get_run(original)
        assert state.status == "completed" and state.forked_from == original and state.forked_at_step == 0
        assert state.payload == first.payload and state.tags == ("batch-7",) and state.output == first.output
    await _caught_up(e, store)
    runs_before = len((await store.list_runs(RunFilter(task="sync"), 500)).items)

    # Repeated (a new window, which now holds the replays too), the request
    # maps to the same new runs, and does not replay its own replays.
    again = await bulk_action(e.client, store, "replay", where, request_id="rp")
    assert (again.matched, again.acted, dict(again.skipped)) == (6, 3, {"made by this request": 3})
    assert set(again.sample) == set(new_ids)
    await _settle(e)
    await _caught_up(e, store)
    assert len((await store.list_runs(RunFilter(task="sync"), 500)).items) == runs_before


async def test_bad_bulk_requests_are_refused_with_the_reason(engine_factory: Any, store: QueryStore) -> None:
    e = await engine_factory(_app())
    with pytest.raises(InvalidBulkRequest, match="unknown bulk action 'delete'"):
        await bulk_action(e.client, store, "delete", RunFilter())
    with pytest.raises(InvalidBulkRequest, match="request_id"):
        await bulk_action(e.client, store, "cancel", RunFilter(), request_id=" ")


# --- HTTP --------------------------------------------------------------------------


async def test_the_http_api_pauses_and_acts_in_bulk_with_a_dry_run_first(
    engine_factory: Any, store: QueryStore,
) -> None:
    e = await engine_factory(_app())
    app = create_app(e.client, ServeConfig("tok", {}), e.registry, query=store)
    auth = {"Authorization": "Bearer tok"}
    async with TestClient(TestServer(app)) as http:
        r = await http.post("/v1/tasks/held/pause", json={"reason": "deploy"}, headers=auth)
        assert r.status == 200 and (await r.json())["paused"] is True
        assert (await http.post("/v1/tasks/nope/pause", headers=auth)).status == 404
        assert (await http.post("/v1/queues/nope/pause", headers=auth)).status == 404
        handles = [await e.client.trigger("held", {"n": i}) for i in range(3)]
        await _caught_up(e, store)
        pauses = await (await http.get("/v1/pauses", headers=auth)).json()
        assert [(p["scope"], p["name"], p["reason"]) for p in pauses["pauses"]] == [("task", "held", "deploy")]
        listed = await (await http.get("/v1/runs?task=held", headers=auth)).json()
        assert [r["paused"] for r in listed["runs"]] == [True] * 3

        body = {"filter": {"task": "held", "status": ["pending"], "since": "1h"}, "dry_run": True}
        dry = await (await http.post("/v1/runs/bulk/cancel", json=body, headers=auth)).json()
        assert (dry["matched"], dry["acted"], dry["dry_run"]) == (3, 3, True)
        assert dry["filter"]["to"] > dry["filter"]["from"]
        confirm = {"filter": dry["filter"], "request_id": dry["request_id"]}
        done = await (await http.post("/v1/runs/bulk/cancel", json=confirm, headers=auth)).json()
        assert (done["acted"], done["request_id"]) == (3, dry["request_id"])
        for h in handles:
            assert (await e.client.wait(h.run_id, timeout=20)).status == "cancelled"

        bad = await http.post("/v1/runs/bulk/cancel", json={"filter": {"stauts": "failed"}}, headers=auth)
        assert bad.status == 400 and "unknown filter field(s) stauts" in (await bad.json())["error"]
        bad = await http.post("/v1/runs/bulk/retry", json={"filter": {"status": "borked"}}, headers=auth)
        assert bad.status == 400 and "unknown status 'borked'" in (await bad.json())["error"]
        bad = await http.post("/v1/runs/bulk/retry", json={"filter": {"since": "yesterday"}}, headers=auth)
        assert bad.status == 400 and "since" in (await bad.json())["error"]
        assert (await http.post("/v1/runs/bulk/replay", json={}, headers={})).status == 401
        assert (await http.post("/v1/tasks/held/resume", headers=auth)).status == 200
    no_store = create_app(e.client, ServeConfig("tok", {}), e.registry)
    async with TestClient(TestServer(no_store)) as http:
        r = await http.post("/v1/runs/bulk/cancel", json={"dry_run": True}, headers=auth)
        assert r.status == 503 and "query projection" in (await r.json())["error"]


# --- CLI ---------------------------------------------------------------------------


def _cli(*args: str, url: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STEPLINE_LOG=url, COLUMNS="200")
    env.pop("STEPLINE_APP", None)
    proc = subprocess.run([sys.executable, "-m", "stepline.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"stepline {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


async def test_the_cli_pauses_counts_and_cancels_by_filter(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/stepline.db"
    _cli("pause", "task", "held", "--reason", "migration", "--app", APP, url=url)
    listed = json.loads(_cli("pause", "ls", "--json", url=url).stdout)
    assert listed == [{"scope": "task", "name": "held", "reason": "migration"}]
    async with sl.Client(url, registry=_app()) as client:
        handles = [await client.trigger("held", {"n": i}, tags=["t1"]) for i in range(3)]
        other = await client.trigger("held", {"n": 9}, tags=["t2"])

    dry = json.loads(_cli("runs", "cancel", "--tag", "t1", "--since", "1h", "--dry-run", "--json", url=url).stdout)
    assert (dry["matched"], dry["acted"], dry["dry_run"]) == (3, 3, True)
    # Without --yes it asks; with no answer (stdin closed) it acts on nothing.
    refused = _cli("runs", "cancel", "--tag", "t1", url=url, check=False)
    assert refused.returncode != 0 and "3 run(s) match; would cancel 3" in refused.stderr
    done = json.loads(_cli("runs", "cancel", "--tag", "t1", "--status", "pending", "--yes", "--json",
                           "--request-id", "cli-1", url=url).stdout)
    assert (done["acted"], done["request_id"]) == (3, "cli-1")
    async with sl.Client(url) as client:
        assert [(await client.get_run(h.run_id)).status for h in handles] == ["cancelled"] * 3
        assert (await client.get_run(other.run_id)).status == "pending"
    bad = _cli("runs", "retry", "--status", "borked", "--yes", url=url, check=False)
    assert bad.returncode == 1 and "unknown status 'borked'" in bad.stderr
    assert "would retry 3" in _cli("runs", "retry", "--tag", "t1", "--dry-run", url=url).stdout
