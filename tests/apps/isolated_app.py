"""Tasks with isolation="process", for tests/test_isolation.py.

A child process finds its task again by importing this file, so they live
in a module, not in the tests. Each takes the test's tmp dir in its payload
(`dir`) for the marker files that tell one attempt from the next and show
the test what ran where.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import stepline as sl

registry = sl.Registry()

QUICK = sl.Retry(max_attempts=2, min_timeout=0.05, max_timeout=0.05, randomize=False)


def note(payload: dict, line: str) -> None:
    """One line per call in `calls.log`, written by whichever process runs it."""
    with open(Path(payload["dir"]) / "calls.log", "a") as f:
        f.write(f"{line} {os.getpid()}\n")


def first_time(payload: dict, marker: str) -> bool:
    """True once per test: creates the marker file."""
    path = Path(payload["dir"]) / marker
    if path.exists():
        return False
    path.touch()
    return True


@sl.step
async def load(payload: dict) -> int:
    note(payload, "load")
    return payload["n"] * 10


@sl.step
async def flaky_add(payload: dict, value: int) -> int:
    note(payload, "add")
    if first_time(payload, "add-failed"):
        raise RuntimeError("the ledger is busy")
    return value + 1


@sl.task(id="iso-steps", registry=registry, isolation="process", retry=QUICK)
async def iso_steps(payload: dict) -> dict:
    value = await flaky_add(payload, await load(payload))
    return {"value": value, "pid": os.getpid()}


@sl.task(id="iso-spin", registry=registry, isolation="process", max_duration=3.0,
         retry=sl.Retry(max_attempts=1))
async def iso_spin(payload: dict) -> None:
    while True:  # never yields: only killing the process stops it
        pass


@sl.task(id="iso-spin-forever", registry=registry, isolation="process")
async def iso_spin_forever(payload: dict) -> None:
    (Path(payload["dir"]) / "pid").write_text(str(os.getpid()))
    while True:
        pass


@sl.task(id="iso-crash-once", registry=registry, isolation="process", retry=QUICK)
async def iso_crash_once(payload: dict) -> str:
    if first_time(payload, "crashed"):
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


@sl.task(id="iso-hog", registry=registry, isolation="process", memory_limit_mb=200, retry=QUICK)
async def iso_hog(payload: dict) -> int:
    hog = bytearray(1 << 30)  # 1 GiB, past the limit
    return len(hog)


@sl.task(id="inline-echo", registry=registry)
async def inline_echo(payload: dict) -> dict:
    return {"echo": payload.get("n"), "pid": os.getpid()}


@sl.task(id="iso-double", registry=registry, isolation="process")
async def iso_double(n: int) -> int:
    return n * 2


@sl.task(id="iso-fan-out", registry=registry, isolation="process")
async def iso_fan_out(payload: dict) -> dict:
    """Waits for an isolated child run and publishes, all through the worker."""
    doubled = await iso_double.trigger_and_wait(payload["n"])
    event_id = await sl.publish("isolated.done", {"n": doubled})
    return {"doubled": doubled, "published": bool(event_id)}


@sl.task(id="iso-await-event", registry=registry, isolation="process")
async def iso_await_event(payload: dict) -> dict:
    """Registers its wait with the router through the worker, then suspends."""
    data = await sl.wait_for_event("isolated.ping", match={"key": payload["key"]}, timeout=60)
    return {"got": data}


@sl.step(name="traced-inner")
async def traced_inner(n: int) -> int:
    from opentelemetry import trace

    # A span of the task's own, through the global API, inside the step's.
    with trace.get_tracer("isolated-app").start_as_current_span("inner work"):
        return n * 2


@sl.task(id="iso-traced", registry=registry, isolation="process")
async def iso_traced(n: int) -> int:
    return await traced_inner(n) + await traced_inner(n)
