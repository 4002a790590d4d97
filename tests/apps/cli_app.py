"""Tasks for the CLI tests."""

from __future__ import annotations

from pydantic import BaseModel

import stepline as sl


class Numbers(BaseModel):
    n: int


@sl.step
async def load() -> int:
    return 10


@sl.step
async def check(n: int) -> int:
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return n * 10


@sl.task(id="times-ten", retry=sl.Retry(max_attempts=2, min_timeout=0.05, randomize=False))
async def times_ten(p: Numbers) -> int:
    factor = await load()
    return await check(p.n) * factor // 10


@sl.task(id="nap")
async def nap(p: Numbers) -> str:
    await sl.sleep(p.n)
    return "rested"
