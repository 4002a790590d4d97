"""The API's backlog gauges: pending work for an autoscaler, with or without workers.

A worker knows only the runs of the partitions it owns, and with no worker
running (KEDA scaled the Deployment to zero) nobody would know that runs are
waiting. The API process keeps a read model of the whole log (its query
projection, projections/query_store.py), so it is the one that counts:
`stepline_runs_ready`, `_running`, `_delayed`, `_waiting` and `_paused`, by
task, queue and worker pool, read from that model on each scrape (at most once per
`max_age` seconds, as scrapers of several replicas may come at once).

Every (task, queue) the API has seen, or knows from `--app`, is reported,
with 0 when it has nothing: a scaler's query then finds series to add up
instead of an empty result. The `pool` label is the task's pool as `--app`
declares it (each pool's workers scale on their own series); a task the API
does not know is counted under the default pool.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web

from stepline.log.topics import DEFAULT_POOL
from stepline.observability import metrics
from stepline.projections.query import QueryStore
from stepline.sdk.task import Registry

KINDS = ("ready", "running", "delayed", "waiting", "paused")


class Backlog:
    def __init__(self, store: QueryStore, registry: Registry | None, *, max_age: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.max_age = max_age
        self.clock = clock
        self._queues = {t.id: t.queue.name for t in registry} if registry is not None else {}
        self._pools = {t.id: t.pool for t in registry} if registry is not None else {}
        self._known: set[tuple[str, str]] = set(self._queues.items())
        self._cached: tuple[float, metrics.Reading] | None = None

    def _queue(self, task_id: str, queue: str | None) -> str:
        # A run triggered by task id alone (no --app) records no queue; its
        # worker puts it on the task's own queue, named so by default.
        return queue or self._queues.get(task_id) or f"task/{task_id}"

    async def reading(self) -> metrics.Reading:
        now = self.clock()
        cached = self._cached
        if cached is not None and now - cached[0] < self.max_age:
            return cached[1]
        counts: dict[tuple[str, str, str], float] = {}
        for task_id, queue, kind, n in await self.store.work_counts(int(now * 1000)):
            pair = (task_id, self._queue(task_id, queue))
            self._known.add(pair)
            counts[(*pair, kind)] = counts.get((*pair, kind), 0.0) + n
        reading: metrics.Reading = {
            f"stepline_runs_{kind}": {
                metrics.labels(task=task, queue=queue, pool=self._pools.get(task, DEFAULT_POOL)):
                    counts.get((task, queue, kind), 0.0)
                for task, queue in self._known
            }
            for kind in KINDS
        }
        self._cached = (now, reading)
        return reading

    def attach(self, app: web.Application) -> None:
        """Report this backlog on `/metrics` while `app` runs."""
        async def start(_: web.Application) -> None:
            metrics.add_source(self.reading)

        async def stop(_: web.Application) -> None:
            metrics.remove_source(self.reading)

        app.on_startup.append(start)
        app.on_cleanup.append(stop)


__all__ = ["KINDS", "Backlog"]
