"""The tasks the benchmark runs, in their own registry.

Every step is a no-op in spirit (an int in, an int out, no await inside),
so what is measured is the engine: checkpoint, log, fold, dispatch. The
outputs still depend on the payload, so a wrong or replayed-wrong result is
caught: `noop3(x) == x + 3`, `steps_n(x) == x + n`.
"""

from __future__ import annotations

import stepline as sl

registry = sl.Registry()

STEP_COUNTS = (0, 1, 10, 100)


@sl.step
async def step_a(x: int) -> int:
    return x + 1


@sl.step
async def step_b(x: int) -> int:
    return x + 1


@sl.step
async def step_c(x: int) -> int:
    return x + 1


@sl.task(id="noop3", registry=registry)
async def noop3(x: int) -> int:
    """Workload (a): three no-op steps awaited in sequence = 9 events per run."""
    x = await step_a(x)
    x = await step_b(x)
    x = await step_c(x)
    return x


@sl.step
async def inc(x: int) -> int:
    return x + 1


def _make_steps_task(n: int) -> sl.Task[int, int]:
    async def steps_n(x: int) -> int:
        for _ in range(n):
            x = await inc(x)
        return x

    steps_n.__name__ = steps_n.__qualname__ = f"steps_{n}"
    return sl.task(id=f"steps-{n}", registry=registry)(steps_n)


# Workload (b): a task of n no-op steps, for n in STEP_COUNTS.
STEPS_TASKS: dict[int, sl.Task[int, int]] = {n: _make_steps_task(n) for n in STEP_COUNTS}


def expected_noop3(x: int) -> int:
    return x + 3


def expected_steps(n: int, x: int) -> int:
    return x + n
