"""A timer wheel for durable waits: one heap, one sleeping task.

Timers are hints, not truth: when one fires, the callback re-reads the
run's state and does nothing if the run moved on (cancelled, resumed by
someone else, its partition revoked). So stale entries need no removal,
and a restart rebuilds every timer from the projection.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Awaitable, Callable


class TimerWheel:
    def __init__(self, fire: Callable[[str, str], None], clock: Callable[[], int] | None = None) -> None:
        self._fire = fire
        self._clock = clock or (lambda: int(time.time() * 1000))
        # A clock whose time jumps (stepline.testing.VirtualClock) says how to
        # wait for it: `wait_until(due_ms, woken)` returns once `woken` is
        # set, and the clock sets it when its time reaches due_ms. A real
        # timeout computed from such a clock's readings would mean nothing.
        # Real clocks have no such method and keep the asyncio.timeout below.
        self._wait_until: Callable[[int, asyncio.Event], Awaitable[None]] | None = getattr(
            clock, "wait_until", None
        )
        # (due, run id, kind): a worker may hold a timer per sleeping run, so
        # no tie-breaking counter; due at the same millisecond, timers fire
        # in run id order.
        self._heap: list[tuple[int, str, str]] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="stepline-timers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def schedule(self, due_ms: int, run_id: str, kind: str) -> None:
        first = self._heap[0][0] if self._heap else None
        heapq.heappush(self._heap, (due_ms, run_id, kind))
        if first is None or due_ms < first:
            self._changed.set()

    async def _loop(self) -> None:
        while True:
            now = self._clock()
            while self._heap and self._heap[0][0] <= now:
                _, run_id, kind = heapq.heappop(self._heap)
                self._fire(run_id, kind)
            self._changed.clear()
            if self._heap and self._wait_until is not None:
                await self._wait_until(self._heap[0][0], self._changed)
                continue
            timeout = None if not self._heap else (self._heap[0][0] - now) / 1000
            try:
                # asyncio.timeout: wait_for may swallow a cancel on 3.11.
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
            except TimeoutError:
                pass
