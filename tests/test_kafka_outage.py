"""A Kafka broker restarted while runs are in flight: nothing is lost.

Runs on a broker of its own (its own state directory and ports), because
restarting the session's shared broker would disturb every other test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

import stepline as sl

from .conftest import IN_CI, Engine, eventually

ROOT = Path(__file__).resolve().parent.parent
KAFKA_SH = ROOT / "scripts" / "kafka.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    # Always a broker of its own, even when KAFKA_BOOTSTRAP_SERVERS names
    # another: that one is not ours to restart.
    env = dict(os.environ, KAFKA_STATE_DIR=str(tmp_path_factory.mktemp("kafka-outage")),
               KAFKA_PORT=str(_free_port()), KAFKA_CONTROLLER_PORT=str(_free_port()))
    # The jars are shared with the session broker's state, when it has them.
    shared = ROOT / ".kafka" / "lib"
    if shared.is_dir():
        os.symlink(shared, Path(env["KAFKA_STATE_DIR"]) / "lib")
    proc = subprocess.run([str(KAFKA_SH), "start"], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        message = f"could not start a broker of its own: {proc.stderr[-2000:]}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message + " (a failure under CI=true)")
    try:
        yield proc.stdout.strip().splitlines()[-1], env
    finally:
        subprocess.run([str(KAFKA_SH), "stop"], env=env, capture_output=True, timeout=120)


async def test_runs_in_flight_survive_a_broker_restart(own_broker):
    bootstrap, env = own_broker
    reg = sl.Registry()
    executions: dict[tuple[str, int], list[float]] = defaultdict(list)

    @sl.step
    async def work(run: str, n: int) -> int:
        executions[(run, n)].append(time.time() * 1000)
        await asyncio.sleep(0.05)
        return n

    @sl.task(id="two-steps", registry=reg, retry=sl.Retry(max_attempts=20, min_timeout=0.2, max_timeout=1))
    async def two_steps(p: dict) -> int:
        a = await work(p["id"], 1)
        b = await work(p["id"], 2)
        return a + b

    e = Engine(f"kafka://{bootstrap}?namespace=outage&partitions=3", reg)
    await e.start()
    try:
        handles = [await e.client.trigger("two-steps", {"id": f"r{i}"}) for i in range(40)]
        await eventually(lambda: len(executions) >= 20, timeout=60, what="runs to get going")
        restart = await asyncio.to_thread(
            subprocess.run, [str(KAFKA_SH), "restart"], env=dict(env, KAFKA_DOWN_SECONDS="2"),
            capture_output=True, text=True, timeout=300,
        )
        assert restart.returncode == 0, restart.stderr
        # Triggers keep working after the outage too.
        handles += [await e.client.trigger("two-steps", {"id": f"late{i}"}) for i in range(5)]
        results = [await h.result(timeout=180) for h in handles]
        assert results == [3] * 45
        runs = await e.client.list_runs()
        assert len(runs) == 45 and all(r.status == "completed" for r in runs)
        for r in runs:
            history = await e.client.history(r.run_id)
            rid = r.run_id
            payload_id = next(ev.body.payload.data for _, ev in history if ev.type == "RunTriggered")
            run_key = payload_id.decode().split('"')[3]
            checkpoints: dict[int, int] = {}
            for _, ev in history:
                if ev.type == "StepCompleted":
                    checkpoints.setdefault(ev.body.step + 1, ev.time)  # the accepted one
            assert sorted(checkpoints) == [1, 2], rid
            for n, at in checkpoints.items():
                # A completed step never started again after its checkpoint.
                assert all(t <= at for t in executions[(run_key, n)]), (rid, n)
    finally:
        await e.close()
