"""A nightly report at 03:00 Berlin time, and a way to watch its ticks now.

    .venv/bin/python examples/nightly_report.py                          # waits for 03:00
    REPORT_EVERY_SECONDS=1 .venv/bin/python examples/nightly_report.py   # a tick a second

`nightly-report` is scheduled with `sl.Cron("0 3 * * *", tz="Europe/Berlin")`:
03:00 local time, which is 01:00 or 02:00 UTC depending on daylight saving.
The script prints the next fire times, then runs a worker on the embedded
SQLite log (`.stepline/stepline.db` unless STEPLINE_LOG says otherwise)
until REPORT_TICKS ticks (default 3) have run. Nobody waits for 3 am in a
demo, so REPORT_EVERY_SECONDS swaps the cron for `sl.Every(seconds)`.

Each tick has one run id, derived from the task and the tick time, so a tick
runs once however many workers fire it; the script prints every tick with
its run id and how often its report was built.

Or keep it scheduled with a worker of its own:

    stepline worker examples/nightly_report.py
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import Counter
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import stepline as sl

BERLIN = ZoneInfo("Europe/Berlin")
NIGHTLY = sl.Cron("0 3 * * *", tz="Europe/Berlin")
TICKS = int(os.environ.get("REPORT_TICKS", "3"))
EVERY = os.environ.get("REPORT_EVERY_SECONDS")

builds: Counter[str] = Counter()


@sl.step
async def build_report(day: str) -> dict:
    builds[day] += 1
    return {"day": day, "signups": 42, "orders": 17}


@sl.task(
    id="nightly-report",
    schedule=sl.Every(timedelta(seconds=float(EVERY))) if EVERY else NIGHTLY,
)
async def nightly_report(tick: sl.ScheduleTick) -> dict:
    # The tick time is the report's identity: keyed on it, builds are counted per tick.
    return await build_report(tick.scheduled_at.isoformat())


def ticks_run(worker: sl.Worker, since: datetime) -> list[tuple[datetime, sl.RunState]]:
    """Completed runs of ticks after `since` (older ones are from earlier runs of the script)."""
    out = []
    for run in worker.runs().values():
        if run.task_id == nightly_report.id and run.status == "completed":
            at = sl.ScheduleTick.model_validate_json(run.payload.data).scheduled_at
            if at > since:
                out.append((at, run))
    return sorted(out, key=lambda pair: pair[0])


async def main() -> int:
    sl.configure_logging(json_logs=False, level=logging.WARNING)
    url = os.environ.get("STEPLINE_LOG", sl.DEFAULT_LOG_URL)
    started = datetime.now(UTC)
    print(f"{nightly_report.id}: cron {NIGHTLY.expression!r} in {NIGHTLY.tz}; next fire times:")
    for at in itertools.islice(NIGHTLY.ticks_after(started), 3):
        print(f"  cron: {at.astimezone(BERLIN):%a %Y-%m-%d %H:%M %Z} = {at:%H:%M} UTC")
    schedule = nightly_report.schedule
    assert schedule is not None
    print(f"worker on {url} runs {schedule.describe()}; waiting for {TICKS} ticks (Ctrl-C to stop)")
    async with sl.Client(url) as client:
        async with sl.Worker(sl.default_registry, client.log, client=client) as worker:
            while len(done := ticks_run(worker, started)) < TICKS:
                await asyncio.sleep(0.05)
    print()
    for at, run in done:
        print(f"tick: {at.isoformat()} {run.run_id} report built {builds[at.isoformat()]}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
