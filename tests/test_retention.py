"""Retention: `stepline archive` and `stepline prune` (engine/runtime/retention.py,
engine/runtime/archive.py, engine/cli/retention.py), on the embedded log and
on a real Kafka broker.

The guarantee checked throughout: nothing a live run needs is removed, and a
fold of what is left gives every remaining run the state it had."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fastavro
import pytest

import stepline as sl
from stepline.core import codec
from stepline.errors import RetentionUnsupported, UnknownRun
from stepline.log.base import Log
from stepline.log.topics import Topics
from stepline.projections.query import QueryProjector
from stepline.projections.query_store import QueryStore, RunFilter
from stepline.projections.runs import PartitionRuns, RunState
from stepline.runtime.archive import ArchiveError, write_archive
from stepline.runtime.retention import plan, prune

from .conftest import Engine, eventually


def _app() -> sl.Registry:
    reg = sl.Registry()

    @sl.step
    async def double(n: int) -> int:
        return n * 2

    @sl.task(id="quick", registry=reg)
    async def quick(payload: Any) -> int:
        a = await double(payload["n"])
        return await double(a)

    @sl.task(id="waiter", registry=reg)
    async def waiter(payload: Any) -> str:
        await double(payload["n"])
        got = await sl.wait_for_event("go", match={"n": payload["n"]})
        return f"went {got}"

    return reg


async def _fold_all(log: Log, topics: Topics) -> dict[str, RunState]:
    """Every run, folded from the first record each partition still holds."""
    runs: dict[str, RunState] = {}
    for p in range(await log.partitions(topics.runs)):
        part = PartitionRuns(p)
        offset, end = await log.start_offset(topics.runs, p), await log.end_offset(topics.runs, p)
        while offset < end:
            recs = await log.read(topics.runs, p, offset, 1000)
            if not recs:
                break
            for r in recs:
                part.apply(codec.decode(r.value), r.offset)
            offset = recs[-1].offset + 1
        runs.update(part.runs)
    return runs


async def _finished(e: Engine, run_ids: list[str]) -> None:
    for rid in run_ids:
        await e.client.wait(rid, timeout=30)


async def _suspended(e: Engine, run_ids: list[str]) -> None:
    async def check() -> bool:
        states = [(await e.client.get_run(r)).status for r in run_ids]
        return states == ["suspended"] * len(run_ids)
    await eventually(check, timeout=30, what="the waiting runs to suspend")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def test_the_archive_is_a_plain_avro_file_of_the_ended_runs(engine_factory: Any, tmp_path: Path) -> None:
    e = await engine_factory(_app())
    done = [(await e.client.trigger("quick", {"n": i})).run_id for i in range(6)]
    await _finished(e, done)
    live = [(await e.client.trigger("waiter", {"n": i})).run_id for i in range(2)]
    await _suspended(e, live)
    cutoff = _now_ms() + 1

    found = await plan(e.client.log, e.topics, cutoff)
    assert found.runs == 6 and found.live == 2 and set(found.run_ids()) == set(done)
    (tmp_path / "out").mkdir()
    path = tmp_path / "out" / "runs.avro"
    report = await write_archive(e.client.log, e.topics, found, str(path))
    assert (report.runs, report.events, report.replaced) == (6, found.events, False)

    # Read back with plain fastavro: no Stepline involved.
    with open(path, "rb") as f:
        archived = fastavro.reader(f)
        records = list(archived)
        assert archived.writer_schema["name"] == "io.stepline.Event"
        assert archived.metadata["stepline.ended_before_ms"] == str(cutoff)
    assert len(records) == found.events
    assert {r["run_id"] for r in records} == set(done)
    for rid in done:  # each history whole, in order
        kinds = [r["type"] for r in records if r["run_id"] == rid]
        assert kinds[0] == "RunTriggered" and kinds[-1] == "RunCompleted" and kinds.count("StepCompleted") == 2

    again = await write_archive(e.client.log, e.topics, found, str(path))
    assert again.replaced and path.read_bytes()[:4] == b"Obj\x01"
    with open(path, "rb") as f:
        assert len(list(fastavro.reader(f))) == found.events
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["runs.avro"]  # no temporary file left

    with pytest.raises(ArchiveError, match="does not exist"):
        await write_archive(e.client.log, e.topics, found, str(tmp_path / "missing" / "x.avro"))


async def test_a_prune_under_load_loses_no_live_run_and_a_rebuild_agrees(
    engine_factory: Any, backend_url: str, tmp_path: Path,
) -> None:
    e = await engine_factory(_app())
    old = [(await e.client.trigger("quick", {"n": i})).run_id for i in range(30)]
    await _finished(e, old)
    cutoff = _now_ms() + 1
    await asyncio.sleep(0.01)
    live = [(await e.client.trigger("waiter", {"n": i})).run_id for i in range(4)]
    await _suspended(e, live)

    if backend_url.startswith("memory://"):
        found = await plan(e.client.log, e.topics, cutoff)
        with pytest.raises(RetentionUnsupported, match="prune works on sqlite:// and kafka://"):
            await prune(e.client.log, e.topics, found)
        return

    # Load: runs triggered and executed all through the prune.
    load: list[str] = []

    async def keep_triggering() -> None:
        for i in range(40):
            load.append((await e.client.trigger("quick", {"n": 1000 + i})).run_id)
            await asyncio.sleep(0.005)

    loader = asyncio.create_task(keep_triggering())
    found = await plan(e.client.log, e.topics, cutoff)
    report = await prune(e.client.log, e.topics, found)
    await loader
    await _finished(e, load)

    assert report.run_ids <= set(old) and report.runs == found.runs
    if backend_url.startswith("sqlite"):
        assert report.runs == len(old)  # every old run, from the middle of the partitions
    else:
        assert report.runs > 0  # the prefixes before the first live run
        for p, start in report.starts.items():  # DeleteRecords moved the log start
            assert await e.client.log.start_offset(e.topics.runs, p) == start > 0
    assert not (set(live) | set(load)) & report.run_ids

    # The worker's own state (folded before and during the prune) against a
    # fold of what the log holds now: the same for every run that stayed.
    before = e.worker.runs() if e.worker else {}
    rebuilt = await _fold_all(e.client.log, e.topics)
    assert not report.run_ids & set(rebuilt)
    for rid, state in rebuilt.items():
        assert before[rid] == state, rid
    assert set(before) - set(rebuilt) == report.run_ids

    # A restarted worker rebuilds from what is left and finishes the live runs.
    await e.restart_worker()
    for i in range(4):
        await e.client.publish("go", {"n": i})
    for rid in live:
        assert (await e.client.wait(rid, timeout=30)).status == "completed"
    for rid in report.run_ids:
        with pytest.raises(UnknownRun):
            await e.client.get_run(rid)
    for rid in set(old) - report.run_ids:
        assert (await e.client.get_run(rid)).status == "completed"


async def test_pruning_sqlite_keeps_offsets_and_prunes_the_read_model(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/stepline.db"
    e = Engine(url, _app())
    await e.start()
    try:
        old = [(await e.client.trigger("quick", {"n": i})).run_id for i in range(9)]
        await _finished(e, old)
        # A snapshot of every partition, as a worker writes on revoke.
        e.worker.snapshot_every = 1  # type: ignore[union-attr]
        await e.stop_worker()
        log, topics = e.client.log, e.topics
        cutoff = _now_ms() + 1
        ends = {p: await log.end_offset(topics.runs, p) for p in range(topics.partitions)}
        assert sum([await log.end_offset(topics.snapshots, p) for p in range(topics.partitions)]) > 0
        async with QueryStore(tmp_path / "query.db") as store:
            await QueryProjector(log, store, topics=topics).catch_up()
            found = await plan(log, topics, cutoff)
            # Snapshots hold every run as ended: all may go.
            assert found.runs == 9 and not found.held
            report = await prune(log, topics, found)
            assert report.runs == 9 and await store.delete_runs(report.run_ids) == 9
            assert (await store.list_runs(RunFilter())).items == []

        for p in range(topics.partitions):
            # The end never moves back, though the last records went.
            assert await log.end_offset(topics.runs, p) == ends[p]
            left = [codec.decode(r.value) for r in await log.read(topics.runs, p, 0, 100)]
            assert {ev.type for ev in left} <= {"PartitionClaimed"}  # only the owners' claims stay
            # The snapshots that held the pruned runs went too.
            assert await log.read(topics.snapshots, p, 0, 10) == []
        fresh = await e.client.trigger("quick", {"n": 99})
        p = e.client.partition_of(fresh.run_id)
        mine = [r.offset for r in await log.read(topics.runs, p, 0, 100) if r.key == fresh.run_id.encode()]
        assert mine == [ends[p]]  # appends go on after the old end, nothing is renumbered
        await e.start_worker()
        assert (await e.client.wait(fresh.run_id, timeout=30)).status == "completed"
    finally:
        await e.close()


# --- CLI ---------------------------------------------------------------------------


def _cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STEPLINE_LOG=url, COLUMNS="300")
    env.pop("STEPLINE_APP", None)
    return subprocess.run([sys.executable, "-m", "stepline.cli", *args], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


async def _ran(url: str, n: int) -> list[str]:
    e = Engine(url, _app())
    e.topics = Topics()  # the CLI's topics
    await e.start()
    try:
        ids = [(await e.client.trigger("quick", {"n": i})).run_id for i in range(n)]
        await _finished(e, ids)
        return ids
    finally:
        await e.close()


async def test_the_cli_archives_counts_asks_and_prunes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/stepline.db"
    ids = await _ran(url, 5)
    when = json.loads(_cli("archive", "--ended-before", "0s", "--to", str(tmp_path / "a.avro"), "--json",
                           url=url).stdout)
    assert (when["runs"], when["replaced"]) == (5, False)
    with open(tmp_path / "a.avro", "rb") as f:
        assert {r["run_id"] for r in fastavro.reader(f)} == set(ids)
    again = _cli("archive", "--ended-before", when["ended_before"], "--to", str(tmp_path / "a.avro"), url=url)
    assert again.returncode == 0 and "archived 5 run(s)" in again.stdout and "replaced" in again.stdout

    dry = _cli("prune", "--ended-before", when["ended_before"], "--dry-run", url=url)
    assert dry.returncode == 0 and "would prune 5 run(s)" in dry.stdout
    # Without --yes it asks; with nobody to answer it removes nothing.
    asked = _cli("prune", "--ended-before", when["ended_before"], url=url)
    assert asked.returncode == 1 and "would prune 5 run(s)" in asked.stderr
    assert json.loads(_cli("prune", "--ended-before", "0s", "--dry-run", "--json", url=url).stdout)["runs"] == 5
    done = _cli("prune", "--ended-before", when["ended_before"], "--yes", url=url)
    assert done.returncode == 0 and "pruned 5 run(s)" in done.stdout, done.stderr
    after = json.loads(_cli("prune", "--ended-before", "0s", "--dry-run", "--json", url=url).stdout)
    assert after["runs"] == 0


async def test_bad_retention_input_is_one_line_and_removes_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/stepline.db"
    await _ran(url, 2)
    size = os.path.getsize(tmp_path / "stepline.db")

    def one_line(proc: subprocess.CompletedProcess[str], text: str) -> None:
        assert proc.returncode == 1, proc.stdout
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], proc.stderr

    one_line(_cli("prune", "--ended-before", "30 days", "--yes", url=url), "--ended-before '30 days' is neither")
    one_line(_cli("archive", "--ended-before", "yesterday", "--to", str(tmp_path / "x.avro"), url=url),
             "is neither a duration")
    one_line(_cli("archive", "--ended-before", "0s", "--to", str(tmp_path / "no" / "x.avro"), url=url),
             "does not exist")
    one_line(_cli("archive", "--ended-before", "0s", "--to", str(tmp_path), url=url), "is a directory")
    missing = f"sqlite:///{tmp_path}/elsewhere.db"
    one_line(_cli("prune", "--ended-before", "0s", "--yes", url=missing), "there is no log at")
    assert not (tmp_path / "elsewhere.db").exists()
    one_line(_cli("prune", "--ended-before", "0s", "--yes", url="memory://x"), "cannot remove records")
    assert not list(tmp_path.glob("*.avro")) and not list(tmp_path.glob(".*.tmp"))
    assert json.loads(_cli("prune", "--ended-before", "0s", "--dry-run", "--json", url=url).stdout)["runs"] == 2
    assert os.path.getsize(tmp_path / "stepline.db") >= size
