"""The Restate service the peer benchmark invokes (bench/peers/restate_bench.py
serves it with hypercorn, in a process of its own, as Restate deploys it):

    steps(ctx, {"x": x, "n": n})   n `ctx.run` steps (x -> x + 1), one after the other
    probe3(ctx, x)                 three steps after a first line that notes
                                   CLOCK_MONOTONIC in $BENCH_STARTS_FILE
    kill3(ctx, x)                  kill9.py's three steps

Every `ctx.run` result is journaled by restate-server before the handler
goes on, so each is a durable step.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import kill9  # noqa: E402
import restate  # noqa: E402

bench = restate.Service("bench")
KILL_STATE = os.environ.get("BENCH_KILL9_STATE", "")
_starts_fd = (os.open(os.environ["BENCH_STARTS_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
              if os.environ.get("BENCH_STARTS_FILE") else None)


def inc(x: int) -> int:
    return x + 1


async def _steps(ctx: restate.Context, x: int, n: int) -> int:
    for i in range(n):
        x = await ctx.run_typed(f"s{i}", inc, restate.RunOptions(), x)
    return x


@bench.handler()
async def steps(ctx: restate.Context, req: dict[str, Any]) -> int:
    return await _steps(ctx, int(req["x"]), int(req["n"]))


@bench.handler()
async def probe3(ctx: restate.Context, x: int) -> int:
    # First line: the trigger-to-start clock stops here. One short line per
    # call, appended in one write (atomic under PIPE_BUF); the driver keeps
    # the first line per x.
    if _starts_fd is not None:
        os.write(_starts_fd, f"{x} {time.monotonic()!r}\n".encode())
    return await _steps(ctx, x, 3)


def k_one(x: int) -> int:
    kill9.record(KILL_STATE, "one")
    return x + 1


def k_two(x: int) -> int:
    kill9.hold_in_two(KILL_STATE)
    return x + 1


def k_three(x: int) -> int:
    kill9.record(KILL_STATE, "three")
    return x + 1


@bench.handler()
async def kill3(ctx: restate.Context, x: int) -> int:
    x = await ctx.run_typed("one", k_one, restate.RunOptions(), x)
    x = await ctx.run_typed("two", k_two, restate.RunOptions(), x)
    return await ctx.run_typed("three", k_three, restate.RunOptions(), x)


app = restate.app([bench])
