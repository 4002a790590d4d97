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

import pytest

import stepline as sl

from .test_kafka_workers import Fleet, fleet, fleet_url, replaced_while_stopped  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


async def test_a_resumed_zombie_does_not_begin_a_step_its_successor_completed(fleet: Fleet) -> None:  # noqa: F811
    async with sl.Client(fleet.url) as client:
        zombie, handles, results = await replaced_while_stopped(fleet, client)
        assert all(r["two_by"] != zombie.pid for r in results)
        await asyncio.sleep(8)  # past its rejoin: whatever it would begin, it has begun

        lines = (fleet.state / "calls.log").read_text().splitlines()
        begun_by_zombie = [line for line in lines if line.split()[1] == "three" and line.split()[2] == str(zombie.pid)]
        assert not begun_by_zombie, (
            "the resumed zombie began step three, which the new owner had completed and the log had accepted:\n"
            + "\n".join(begun_by_zombie))
        assert zombie.poll() is None, "the zombie should come back as a worker, not exit"
