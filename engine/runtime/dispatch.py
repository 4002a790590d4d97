"""Which ready run starts next: priority first, then age, within queue limits.

This is the worker-local half of admission. Queue limits here hold for one
worker process, which on the embedded log is the whole deployment; the
cross-worker protocol (SlotRequested/SlotGranted) builds on this order.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict


class ReadyQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, str, str]] = []
        self._held: dict[str, list[tuple[int, int, int, str, str]]] = defaultdict(list)
        self._running: dict[str, int] = defaultdict(int)
        self._limits: dict[str, int | None] = {}
        self._order = itertools.count()
        self._queued: set[str] = set()

    def __len__(self) -> int:
        return len(self._heap) + sum(len(h) for h in self._held.values())

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._queued

    def push(self, run_id: str, queue: str, limit: int | None, priority: int, created_at: int) -> None:
        """Higher priority first; equal priority by trigger time, then arrival."""
        if run_id in self._queued:
            return
        self._limits[queue] = limit
        self._queued.add(run_id)
        heapq.heappush(self._heap, (-priority, created_at, next(self._order), run_id, queue))

    def pop(self) -> tuple[str, str] | None:
        """The next run whose queue has room, marking it running; None if none."""
        while self._heap:
            entry = heapq.heappop(self._heap)
            _, _, _, run_id, queue = entry
            if run_id not in self._queued:
                continue  # discarded while queued
            limit = self._limits.get(queue)
            if limit is not None and self._running[queue] >= limit:
                heapq.heappush(self._held[queue], entry)
                continue
            self._queued.discard(run_id)
            self._running[queue] += 1
            return run_id, queue
        return None

    def release(self, queue: str) -> None:
        """A run of `queue` stopped executing: let its best held run compete again."""
        self._running[queue] -= 1
        held = self._held.get(queue)
        if held:
            heapq.heappush(self._heap, heapq.heappop(held))

    def discard(self, run_id: str) -> None:
        """Forget a queued run; its entry is skipped lazily."""
        self._queued.discard(run_id)

    def depths(self) -> dict[str, int]:
        """Queued runs by queue (the `stepline.queue.depth` gauge).

        Read from copies: the metrics exporter may call this from its own thread.
        """
        queued = set(self._queued)
        entries = list(self._heap) + [e for held in list(self._held.values()) for e in list(held)]
        by_queue: dict[str, set[str]] = {}
        for *_, run_id, queue in entries:
            if run_id in queued:
                by_queue.setdefault(queue, set()).add(run_id)
        return {q: len(ids) for q, ids in by_queue.items()}
