"""Several worker processes on one real Kafka broker: ownership, crashes, zombies.

Each test starts real `stepline worker` processes on a fresh namespace with
six partitions and checks the guarantees from the log itself:

* every triggered run completes, exactly once, with the right output;
* no completed step is executed again: in each run's accepted history
  (fenced by epoch, as every projection folds it) no step starts again
  after its checkpoint;
* a worker paused past its session (SIGSTOP) gets nothing accepted when it
  comes back: its late checkpoints carry the old epoch and are dropped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import stepline as sl
from stepline.core.events import PartitionClaimed, StepCompleted, StepStarted
from stepline.projections.runs import PartitionRuns

from .conftest import eventually

pytestmark = pytest.mark.slow

APP = Path(__file__).parent / "apps" / "fleet.py"
PARTITIONS = 6


@pytest.fixture
def fleet_url(kafka_bootstrap: str) -> str:
    return (
        f"kafka://{kafka_bootstrap}?namespace=fleet-{uuid.uuid4().hex[:10]}&partitions={PARTITIONS}"
        "&session_timeout_ms=6000&heartbeat_interval_ms=500&rebalance_timeout_ms=20000"
    )


class Fleet:
    def __init__(self, url: str, state: Path) -> None:
        self.url = url
        self.state = state
        self.procs: list[subprocess.Popen[bytes]] = []
        self.step_seconds = 0.02
        self.concurrency = 256

    def start(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ, FLEET_DIR=str(self.state), FLEET_STEP_SECONDS=str(self.step_seconds))
        log = open(self.state / f"worker-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "stepline.cli", "worker", str(APP), "--log", self.url,
             "--concurrency", str(self.concurrency)],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
        for p in self.procs:
            p.wait(15)

    def executions(self) -> Counter[tuple[str, str]]:
        path = self.state / "calls.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return Counter((line.split()[0], line.split()[1]) for line in lines)


@pytest.fixture
def fleet(fleet_url: str, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(fleet_url, tmp_path)
    yield f
    f.stop_all()


async def accepted_histories(client: sl.Client) -> tuple[dict[str, list], int]:
    """Each run's events as the projection accepts them, and how many were fenced."""
    per_run: dict[str, list] = {}
    parts: dict[int, PartitionRuns] = {}
    async for p, offset, ev in client.events():
        part = parts.setdefault(p, PartitionRuns(p))
        before = part.fenced
        part.apply(ev, offset)
        if part.fenced == before and ev.run_id:
            per_run.setdefault(ev.run_id, []).append(ev)
    return per_run, sum(part.fenced for part in parts.values())


async def owners(client: sl.Client) -> dict[int, str]:
    """The worker that last claimed each partition of the runs topic."""
    return {p: ev.body.worker_id async for p, _, ev in client.events()
            if isinstance(ev.body, PartitionClaimed)}


async def settled(client: sl.Client, workers: int) -> bool:
    """Every partition claimed, by `workers` distinct live owners."""
    current = await owners(client)
    return len(current) == PARTITIONS and len(set(current.values())) == workers


def assert_no_step_ran_after_its_checkpoint(history: list) -> None:
    done: set[int] = set()
    for ev in history:
        if isinstance(ev.body, StepStarted):
            assert ev.body.step not in done, f"{ev.run_id}: step {ev.body.step} started after it completed"
        if isinstance(ev.body, StepCompleted):
            done.add(ev.body.step)


async def test_three_workers_kill_one_add_one_and_every_run_completes_once(fleet: Fleet) -> None:
    # Slow steps and few slots per worker keep runs in flight when the kill comes.
    fleet.step_seconds = 0.5
    fleet.concurrency = 10
    for _ in range(3):
        fleet.start()
    async with sl.Client(fleet.url) as client:
        await eventually(lambda: settled(client, 3), timeout=90, what="three workers to share the partitions")
        handles = [await client.trigger("fleet", {"n": i}) for i in range(200)]
        results: dict[str, dict] = {}

        async def collect(h: sl.RunHandle) -> None:
            results[h.run_id] = await h.result(timeout=180)

        waiting = [asyncio.create_task(collect(h)) for h in handles]
        await eventually(lambda: len(results) >= 40, timeout=120, what="40 runs to complete")
        fleet.procs[0].send_signal(signal.SIGKILL)  # mid-run: others are in flight
        assert len(results) < 150
        fleet.start()
        await asyncio.wait_for(asyncio.gather(*waiting), 240)
        assert (fleet.state / "worker-3.log").read_bytes().count(b"partition claimed") > 0

        assert sorted(r["n"] for r in results.values()) == list(range(200))
        for h in handles:
            r = results[h.run_id]
            assert r["result"] == (r["n"] * 2 + 1) * 10

        histories, _ = await accepted_histories(client)
        assert set(histories) == {h.run_id for h in handles}  # none lost, none invented
        for run_id, history in histories.items():
            assert_no_step_ran_after_its_checkpoint(history)
            completed = [e for e in history if type(e.body).__name__ == "RunCompleted"]
            assert len(completed) == 1, run_id
        # Every step ran at least once; the kill caught some runs inside step
        # two (re-run by the new owner), and step one, checkpointed before
        # the kill or re-run only if it was itself in flight, never twice
        # after its checkpoint (checked on the log above).
        runs = fleet.executions()
        assert all(runs[(h.run_id, s)] >= 1 for h in handles for s in ("one", "two", "three"))
        assert sum(runs[(h.run_id, "two")] for h in handles) > 200, "the kill hit no run in flight"


async def replaced_while_stopped(
    fleet: Fleet, client: sl.Client,
) -> tuple[subprocess.Popen[bytes], list[sl.RunHandle[Any]], list[Any]]:
    """A worker owning every partition is SIGSTOPped with 6 runs held in step
    two; a second worker takes over and completes them; then the first (the
    zombie) is resumed, and wakes mid-step to finish step two late."""
    (fleet.state / "hold").touch()
    zombie = fleet.start()
    await eventually(lambda: (fleet.state / "worker-0.log").read_bytes().count(b"partition claimed")
                     >= PARTITIONS, timeout=60, what="the first worker to own every partition")
    handles = [await client.trigger("fleet", {"n": i}) for i in range(6)]
    await eventually(lambda: all((fleet.state / f"held-{h.run_id}").exists() for h in handles),
                     timeout=60, what="every run to be held in step two")
    zombie.send_signal(signal.SIGSTOP)
    fleet.start()  # takes over once the zombie's session expires
    (fleet.state / "hold").unlink()
    results = [await h.result(timeout=120) for h in handles]
    zombie.send_signal(signal.SIGCONT)
    return zombie, handles, results


async def test_a_paused_worker_gets_nothing_accepted_after_its_partitions_moved(
    fleet: Fleet,
) -> None:
    async with sl.Client(fleet.url) as client:
        zombie, handles, results = await replaced_while_stopped(fleet, client)
        await asyncio.sleep(3)

        assert all(r["two_by"] != zombie.pid for r in results)
        histories, fenced = await accepted_histories(client)
        assert fenced > 0, "the zombie's late events should have reached the log and been fenced"
        for h in handles:
            history = histories[h.run_id]
            assert_no_step_ran_after_its_checkpoint(history)
            twos = [e for e in history if isinstance(e.body, StepCompleted) and e.body.step == 1]
            assert len(twos) == 1
