"""A step with its own retry policy that always fails, for the kill -9 test of
tests/test_step_retry.py; every try is appended to `tries.log` (fsynced)."""

from __future__ import annotations

import os
from pathlib import Path

import stepline as sl

STATE = Path(os.environ.get("STEP_RETRY_DIR", "."))


@sl.step(retry=sl.Retry.fixed_delay(2, max_attempts=3))
async def charge() -> str:
    with open(STATE / "tries.log", "a") as f:
        f.write("try\n")
        f.flush()
        os.fsync(f.fileno())
    n = len((STATE / "tries.log").read_text().splitlines())
    raise RuntimeError(f"gateway busy ({n})")


@sl.task(id="always-busy", retry=sl.Retry.never())
async def always_busy(payload: dict) -> str:
    return await charge()
