"""A billing team's own projection: cost per tenant, built from the engine's events.

    .venv/bin/python examples/tenant_costs.py

The engine records every run as events on its log; `stepline.events.consume`
reads them with the engine's decoder and fencing rule, so another team can
fold them into whatever it needs without touching the engine. Here: per
tenant, runs started, runs completed and failed, pages billed (only for
completed runs) and the time its steps took.

It triggers 30 renders for three tenants (a page count divisible by 7 fails for good),
builds the projection from offset 0 and commits its position under the
group `billing`; then 9 more renders run, and the projection picks up from
its commit instead of starting over. The last line checks the incremental
result against a fresh rebuild from offset 0: they must be equal. The log is
`.stepline/stepline.db` unless STEPLINE_LOG says otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel

import stepline as sl
from stepline.consume import Start
from stepline.events import (
    Event,
    RunCompleted,
    RunFailed,
    RunTriggered,
    StepCompleted,
    StepStarted,
    consume,
)
from stepline.log.base import Log

TENANTS = ("acme", "globex", "initech")


class Render(BaseModel):
    tenant: str
    pages: int


@sl.step
async def fetch_rows(pages: int) -> int:
    return pages * 10


@sl.step
async def render(pages: int, rows: int) -> dict[str, int]:
    await asyncio.sleep(pages / 10_000)  # the renderer's time: what step_ms bills
    if pages % 7 == 0:
        raise sl.FatalError(f"template for {pages} pages is broken")
    return {"pages": pages, "rows": rows}


@sl.task(id="render-report", retry=sl.Retry(max_attempts=1))
async def render_report(payload: Render) -> dict[str, int]:
    rows = await fetch_rows(payload.pages)
    return await render(payload.pages, rows)


@dataclass
class TenantCost:
    runs: int = 0
    completed: int = 0
    failed: int = 0
    pages_billed: int = 0
    step_ms: int = 0


@dataclass
class CostProjection:
    """Folds run events into costs; knows nothing of the task's code."""

    tenants: dict[str, TenantCost] = field(default_factory=dict)
    # run -> (tenant, pages); step starts waiting for their completion
    _runs: dict[str, tuple[str, int]] = field(default_factory=dict)
    _started: dict[tuple[str, int], int] = field(default_factory=dict)

    def apply(self, ev: Event) -> None:
        body = ev.body
        if isinstance(body, RunTriggered) and ev.task_id == "render-report":
            data = json.loads(body.payload.data)
            self._runs[ev.run_id] = (data["tenant"], data["pages"])
            self.tenants.setdefault(data["tenant"], TenantCost()).runs += 1
            return
        owner = self._runs.get(ev.run_id)
        if owner is None:
            return
        cost = self.tenants[owner[0]]
        if isinstance(body, StepStarted):
            self._started[(ev.run_id, body.step)] = ev.time
        elif isinstance(body, StepCompleted):
            began = self._started.pop((ev.run_id, body.step), ev.time)
            cost.step_ms += ev.time - began
        elif isinstance(body, RunCompleted):
            cost.completed += 1
            cost.pages_billed += owner[1]
        elif isinstance(body, RunFailed):
            cost.failed += 1

    def counts(self) -> dict[str, dict[str, int]]:
        """What is compared between rebuilds (step time varies run to run, not between folds)."""
        return {t: {k: v for k, v in asdict(c).items()} for t, c in sorted(self.tenants.items())}


async def fold(source: Log | str, projection: CostProjection, start: Start = "earliest",
               group: str | None = None) -> int:
    events = 0
    async with consume(source, ["runs"], start=start, group=group) as stream:
        async for delivery in stream:
            projection.apply(delivery.event)
            events += 1
        if group is not None:
            await stream.commit()
    return events


async def run_batch(client: sl.Client, renders: list[Render]) -> None:
    handles = await render_report.batch_trigger(renders)
    async with sl.Worker(sl.default_registry, client.log, client=client):
        for h in handles:
            try:
                await h.result(timeout=60)
            except sl.RunFailedError:
                pass  # the broken templates: counted as failed by the projection


def print_table(projection: CostProjection) -> None:
    print(f"{'tenant':<10}{'runs':>6}{'done':>6}{'failed':>8}{'pages':>7}{'step ms':>9}")
    for tenant, c in sorted(projection.tenants.items()):
        print(f"{tenant:<10}{c.runs:>6}{c.completed:>6}{c.failed:>8}{c.pages_billed:>7}{c.step_ms:>9}")


async def main() -> int:
    sl.configure_logging(json_logs=False, level=logging.WARNING)
    url = os.environ.get("STEPLINE_LOG", sl.DEFAULT_LOG_URL)
    group = "billing"
    first = [Render(tenant=TENANTS[n % 3], pages=n + 1) for n in range(30)]
    more = [Render(tenant=TENANTS[n % 3], pages=100 + n) for n in range(9)]
    async with sl.Client(url) as client:
        await run_batch(client, first)
        live = CostProjection()
        # The client's open log: the embedded file has one owner per process.
        n = await fold(client.log, live, start="earliest", group=group)
        print(f"from offset 0: {n} events")
        print_table(live)

        await run_batch(client, more)
        n = await fold(client.log, live, start="committed", group=group)
        print(f"from the commit of '{group}': {n} more events")
        print_table(live)

    rebuilt = CostProjection()
    await fold(url, rebuilt)
    print(f"incremental == rebuild from offset 0: {live.counts() == rebuilt.counts()}")
    print(f"billing: {json.dumps(live.counts(), sort_keys=True)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
