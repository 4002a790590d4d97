"""Unprofiled cost model of one 3-step run's CPU work on the event loop.

    python bench/costs.py

A sampling/tracing profiler inflates call-heavy code; this times the pieces
directly (best of 5) to calibrate PROFILE.md: encode and decode of each of
the 9 events, folding them, `dataclasses.replace` of a RunState, event ids,
payload codecs, and the client's terminal-state fold.
"""

from __future__ import annotations

import asyncio
import sys
import time
import timeit
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sl_tasks  # noqa: E402
from physical import run_events  # noqa: E402

from stepline.core import codec  # noqa: E402
from stepline.core.events import JSON, Payload  # noqa: E402
from stepline.core.ids import new_event_id  # noqa: E402
from stepline.projections.runs import PartitionRuns, fold_run  # noqa: E402


def best(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6  # µs per call


def main() -> None:
    evs = run_events()
    datas = [codec.encode(e) for e in evs]
    n = 2000
    rows: list[tuple[str, float]] = []
    rows.append(("encode 9 events", best(lambda: [codec.encode(e) for e in evs], n)))
    rows.append(("decode 9 events", best(lambda: [codec.decode(d) for d in datas], n)))

    def fold9() -> None:
        part = PartitionRuns(0, epoch=1)
        for off, e in enumerate(evs):
            part.apply(e, off)

    rows.append(("fold 9 events (PartitionRuns.apply)", best(fold9, n)))
    st = fold_run(None, evs[0])
    assert st is not None
    rows.append(("one dataclasses.replace(RunState, 2 fields)",
                 best(lambda: replace(st, updated_at=1, seq=2), 20000)))
    rows.append(("9 x new_event_id (os.urandom)", best(lambda: [new_event_id() for _ in range(9)], n)))
    pc = sl_tasks.noop3.payload_codec
    rows.append(("payload/output codec: 4 dumps + 1 validate + 1 load (pydantic)",
                 best(lambda: (pc.validate(7, "x"), [pc.dump(7, "x") for _ in range(4)],
                               pc.load(Payload(JSON, b"7"), "x")), n)))

    async def loop_costs() -> tuple[float, float]:
        loop = asyncio.get_running_loop()

        async def noop() -> None:
            return None

        t0 = time.perf_counter()
        for _ in range(n):
            await asyncio.create_task(noop())
        task_us = (time.perf_counter() - t0) / n * 1e6
        t0 = time.perf_counter()
        for _ in range(n):
            f = loop.create_future()
            loop.call_soon(f.set_result, None)
            await f
        fut_us = (time.perf_counter() - t0) / n * 1e6
        return task_us, fut_us

    task_us, fut_us = asyncio.run(loop_costs())
    rows.append(("asyncio: create_task + run + await (one)", task_us))
    rows.append(("asyncio: future + call_soon + await (one)", fut_us))
    print(f"{'piece':64} µs")
    for name, us in rows:
        print(f"{name:64} {us:8.1f}")


if __name__ == "__main__":
    main()
