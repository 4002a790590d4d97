"""Tasks for `stepline debug` (tests/test_debug.py).

Every step body that runs notes itself in the file DEBUG_CALLS names, so a
test sees which bodies ran in the debug process. `record_break` is a
`PYTHONBREAKPOINT` hook that writes what the debugger would see (the
caller's locals) instead of stopping: a scripted debugger.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import stepline as sl

registry = sl.Registry()


def _note(name: str) -> None:
    path = os.environ.get("DEBUG_CALLS")
    if path:
        with open(path, "a") as f:
            f.write(f"{name}\n")


@sl.step
async def load(n: int) -> int:
    _note("load")
    return n * 2


@sl.step
async def divide(total: int, by: int) -> float:
    _note("divide")
    return total / by


@sl.step
async def save(value: float) -> str:
    _note("save")
    return f"saved {value}"


@sl.task(id="divide", registry=registry, retry=sl.Retry(max_attempts=1))
async def divide_task(p: dict[str, int]) -> str:
    total = await load(p["n"])
    quotient = await divide(total, p["by"])
    return await save(quotient)


@sl.task(id="check", registry=registry, retry=sl.Retry(max_attempts=1))
async def check(p: dict[str, int]) -> int:
    total = await load(p["n"])
    if total > 10:
        raise ValueError(f"{total} is too much")
    return total


def record_break() -> None:
    """Append the locals of the frame that called breakpoint() to DEBUG_BREAKS (JSON lines)."""
    frame = sys._getframe(1)
    seen: dict[str, Any] = {k: v for k, v in frame.f_locals.items()
                            if k in ("name", "position", "args", "kwargs", "error", "inputs", "recorded_output")}
    with open(os.environ["DEBUG_BREAKS"], "a") as f:
        f.write(json.dumps({**seen, "function": frame.f_code.co_name}, default=repr) + "\n")
