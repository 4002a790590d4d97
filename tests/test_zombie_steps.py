"""A worker that lost its partition while away never starts a step its successor completed.

Found by tests/test_cluster_faults.py: a worker cut off from the brokers
past its session finished the step it was in, and its checkpoint (held by
the producer during the cut) reached the log after the heal, after the new
owner's claim, with the old epoch: fenced, as it should be. But the worker
took the acknowledgement as "recorded" and began the next step, which the
new owner had completed seconds before. The step is recorded once, yet its
body ran again after its checkpoint was accepted: "a completed step never
runs again" did not hold for the replaced worker.

Here the same thing on one broker, with SIGSTOP instead of a network cut:
the zombie is stopped inside step two, a second worker takes the partitions
and completes every run, and the zombie is resumed. It must not begin step
three of any run (tests/apps/fleet.py records each step body it begins,
with its pid).
"""

from __future__ import annotations

import asyncio
import signal

import pytest

import stepline as sl

from .conftest import eventually
from .test_kafka_workers import PARTITIONS, Fleet, fleet, fleet_url  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


async def test_a_resumed_zombie_does_not_begin_a_step_its_successor_completed(fleet: Fleet) -> None:  # noqa: F811
    (fleet.state / "hold").touch()
    zombie = fleet.start()
    async with sl.Client(fleet.url) as client:
        await eventually(lambda: (fleet.state / "worker-0.log").read_bytes().count(b"partition claimed")
                         >= PARTITIONS, timeout=60, what="the first worker to own every partition")
        handles = [await client.trigger("fleet", {"n": i}) for i in range(6)]
        await eventually(lambda: all((fleet.state / f"held-{h.run_id}").exists() for h in handles),
                         timeout=60, what="every run to be held in step two")
        zombie.send_signal(signal.SIGSTOP)
        fleet.start()  # takes over once the zombie's session expires
        (fleet.state / "hold").unlink()
        results = [await h.result(timeout=120) for h in handles]
        assert all(r["two_by"] != zombie.pid for r in results)
        zombie.send_signal(signal.SIGCONT)  # it wakes inside step two, finishes it late
        await asyncio.sleep(8)  # past its rejoin: whatever it would begin, it has begun

        lines = (fleet.state / "calls.log").read_text().splitlines()
        begun_by_zombie = [line for line in lines if line.split()[1] == "three" and line.split()[2] == str(zombie.pid)]
        assert not begun_by_zombie, (
            "the resumed zombie began step three, which the new owner had completed and the log had accepted:\n"
            + "\n".join(begun_by_zombie))
        assert zombie.poll() is None, "the zombie should come back as a worker, not exit"
