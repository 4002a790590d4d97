"""A consumer-group rebalance in the middle of a step, on a real Kafka broker.

A worker owns every partition and has runs parked inside step two when a
second worker process joins. aiokafka rebalances eagerly: the first worker's
revoke forgets the partitions, then cancels their attempts, and only then may
anyone claim them (docs/architecture.md, "The Kafka log"). What must hold:

* every run completes, exactly once, with the right output;
* step one, checkpointed before the rebalance, never runs again;
* the step interrupted by the rebalance runs again on the partition's next
  owner, and the result accepted for it is the one its owner at that time
  wrote: a worker's result from after it lost the partition is never
  accepted, even from step code that ignores the cancellation and returns
  (the worker writes nothing for a partition it no longer owns);
* no step starts again after its accepted checkpoint, and the fenced
  projection (what any rebuild from offset 0 gives) agrees with the runs'
  results.
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

import pytest

import stepline as sl
from stepline.core.events import (
    REQUEST_TYPES,
    Event,
    PartitionClaimed,
    RunCompleted,
    StepCompleted,
    StepStarted,
)
from stepline.projections.runs import PartitionRuns

from .conftest import eventually

pytestmark = pytest.mark.slow

APP = Path(__file__).parent / "apps" / "rebalance_app.py"
PARTITIONS = 6
RUNS = 12


class Workers:
    def __init__(self, url: str, state: Path, stubborn: bool) -> None:
        self.url = url
        self.state = state
        self.stubborn = stubborn
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, stubborn: bool = False) -> subprocess.Popen[bytes]:
        env = dict(os.environ, REBALANCE_DIR=str(self.state), REBALANCE_STUBBORN="1" if stubborn else "0")
        with open(self.state / f"worker-{len(self.procs)}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "stepline.cli", "worker", str(APP), "--log", self.url],
                env=env, stdout=subprocess.DEVNULL, stderr=log,
            )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait(15)

    def calls(self) -> list[tuple[str, str, int]]:
        path = self.state / "calls.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [(run, step, int(pid)) for run, step, pid in (line.split() for line in lines)]


@pytest.fixture(params=["cooperative", "stubborn"])
def workers(request: pytest.FixtureRequest, kafka_bootstrap: str, tmp_path: Path) -> Iterator[Workers]:
    url = (f"kafka://{kafka_bootstrap}?namespace=rebal-{uuid.uuid4().hex[:10]}&partitions={PARTITIONS}"
           "&session_timeout_ms=6000&heartbeat_interval_ms=500&rebalance_timeout_ms=20000")
    w = Workers(url, tmp_path, stubborn=request.param == "stubborn")
    yield w
    w.stop_all()


async def claims(client: sl.Client) -> dict[int, PartitionClaimed]:
    """The latest claim of each partition of the runs topic."""
    return {p: ev.body async for p, _, ev in client.events() if isinstance(ev.body, PartitionClaimed)}


def pid_of(claim: PartitionClaimed) -> int:
    return int(claim.worker_id.split("-")[-2])  # host-pid-random


async def accepted(client: sl.Client) -> tuple[dict[str, list[tuple[Event, PartitionClaimed]]], int]:
    """Each run's events as the fenced projection accepts them, each with the
    claim in force when it was written; and how many events were fenced."""
    per_run: dict[str, list[tuple[Event, PartitionClaimed]]] = {}
    parts: dict[int, PartitionRuns] = {}
    current: dict[int, PartitionClaimed] = {}
    async for p, offset, ev in client.events():
        part = parts.setdefault(p, PartitionRuns(p))
        before = part.fenced
        part.apply(ev, offset)
        if isinstance(ev.body, PartitionClaimed) and ev.epoch >= part.epoch:
            current[p] = ev.body
        elif part.fenced == before and ev.run_id:
            per_run.setdefault(ev.run_id, []).append((ev, current[p]))
    return per_run, sum(part.fenced for part in parts.values())


async def test_a_rebalance_mid_step_completes_every_run_once_and_accepts_only_the_owners_results(
    workers: Workers,
) -> None:
    state = workers.state
    (state / "hold").touch()
    first = workers.start(stubborn=workers.stubborn)
    async with sl.Client(workers.url) as client:
        async def first_owns_all() -> bool:
            owned = await claims(client)
            return len(owned) == PARTITIONS and {pid_of(c) for c in owned.values()} == {first.pid}

        await eventually(first_owns_all, timeout=90, what="the first worker to own every partition")
        handles = [await client.trigger("rebalance", {"n": i}) for i in range(RUNS)]
        ids = {h.run_id for h in handles}
        await eventually(lambda: {r for r, s, _ in workers.calls() if s == "two"} == ids,
                         timeout=60, what="every run to be parked in step two")

        second = workers.start()

        async def shared() -> bool:
            owned = await claims(client)
            return len(owned) == PARTITIONS and {pid_of(c) for c in owned.values()} == {first.pid, second.pid}

        async def parked_on_owners() -> bool:
            # Every run's latest step-two execution is on its current owner.
            owned = await claims(client)
            last: dict[str, int] = {}
            for run, step, pid in workers.calls():
                if step == "two":
                    last[run] = pid
            return all(last.get(r) == pid_of(owned[client.partition_of(r)]) for r in ids)

        if workers.stubborn:
            # The first worker's revoke cancelled its attempts, and step two
            # went on regardless; the revoke waits for it. Let it return now:
            # its result comes after the partitions were given up.
            await eventually(lambda: len(list(state.glob(f"cancelled-*-{first.pid}"))) == RUNS,
                             timeout=60, what="every parked step to be cancelled")
            (state / "hold").unlink()
            await eventually(shared, timeout=120, what="the two workers to share the partitions")
            results = {h.run_id: await h.result(timeout=120) for h in handles}
        else:
            await eventually(shared, timeout=120, what="the two workers to share the partitions")
            await eventually(parked_on_owners, timeout=60, what="every run's step two to restart on its owner")
            (state / "hold").unlink()
            results = {h.run_id: await h.result(timeout=120) for h in handles}
        await asyncio.sleep(2)  # room for any late event of the first worker to land

        assert sorted(r["n"] for r in results.values()) == list(range(RUNS))
        assert all(r["result"] == (r["n"] * 2 + 1) * 10 for r in results.values())
        assert {r["two_by"] for r in results.values()} == {first.pid, second.pid}

        calls = workers.calls()
        per_step = Counter((run, step) for run, step, _ in calls)
        for run in ids:
            # Checkpointed before the rebalance: never again.
            assert per_step[(run, "one")] == 1
            # Interrupted by it: at least once more, on the next owner.
            assert per_step[(run, "two")] >= 2

        histories, fenced = await accepted(client)
        assert set(histories) == ids  # none lost, none invented
        for run, history in histories.items():
            done: set[int] = set()
            for ev, _claim in history:
                if isinstance(ev.body, StepStarted):
                    assert ev.body.step not in done, f"{run}: step {ev.body.step} started after its checkpoint"
                if isinstance(ev.body, StepCompleted):
                    done.add(ev.body.step)
            checkpoints = [(ev, claim) for ev, claim in history
                           if isinstance(ev.body, StepCompleted) and ev.body.step == 1]
            assert len(checkpoints) == 1
            # The accepted result of step two was written by the partition's
            # owner at the time, and is the one the run returned.
            ev, claim = checkpoints[0]
            assert ev.epoch > 0 and results[run]["two_by"] == pid_of(claim)
            assert len([e for e, _ in history if isinstance(e.body, RunCompleted)]) == 1
        if workers.stubborn:
            # The first worker's steps did return, after it had given their
            # partitions up; none of those results was accepted (checked
            # above), and none was even written.
            assert len(list(state.glob(f"returned-late-*-{first.pid}"))) == RUNS
        assert fenced == 0
        async for _, _, ev in client.events():
            assert ev.epoch > 0 or ev.type in REQUEST_TYPES, f"an owner event without an owner: {ev}"

        runs = await client.list_runs()  # a rebuild from offset 0
        assert {r.run_id for r in runs} == ids and all(r.status == "completed" for r in runs)
        for h in handles:
            st = await client.get_run(h.run_id)  # the fenced single-run read agrees
            assert st.status == "completed"
    for p in workers.procs:
        p.send_signal(signal.SIGTERM)
