"""Finding an event that went by before a wait was reached.

`wait_for_event(..., lookback=)` also accepts an event published up to
`lookback` before the wait began: the race where the event is published
just before the run gets to its wait. The router only offers a wait the
events it routes after learning of it (plus its last minute of routed
events, consumers/waits.py), so the registering worker searches the events
topic itself, once, right after registering the wait:

1. per partition, the offset of `since - CLOCK_SKEW_MS` (Kafka's time index,
   a bisection on the other backends) up to the end offset as of now;
2. every DomainEvent there whose own time is at or after `since` and that
   matches the wait is a candidate: the first in each partition, and of
   those the earliest by (time, partition), the order a live router would
   most likely have seen them in.

Events appended after step 1 read the end offset are the router's: the wait
is registered before the search starts, so one of the two always sees them.
The cost is one read of every event published in the lookback window, which
is why `lookback` is capped at MAX_LOOKBACK.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from stepline.consumers.patterns import Matcher, compile_name, compile_where
from stepline.consumers.router import codec_json
from stepline.consumers.waits import SeenEvent, WaitEntry
from stepline.core import codec
from stepline.core.events import DomainEvent
from stepline.errors import SchemaError
from stepline.log.base import Log

MAX_LOOKBACK = timedelta(hours=24)
# Record timestamps come from the writers' clocks; start this much earlier
# and filter by each event's own time, so a slightly slow clock loses nothing.
CLOCK_SKEW_MS = 60_000
_BATCH = 1000


async def find_past_event(log_: Log, events_topic: str, entry: WaitEntry) -> SeenEvent | None:
    """The earliest event on the log at or after `entry.since` that matches the wait."""
    name, data_matches = compile_name(entry.event), compile_where(entry.match)
    best: tuple[tuple[int, int], SeenEvent] | None = None
    for p in range(await log_.partitions(events_topic)):
        offset = await log_.offset_for_time(events_topic, p, entry.since - CLOCK_SKEW_MS)
        end = await log_.end_offset(events_topic, p)
        while offset < end:
            recs = await log_.read(events_topic, p, offset, min(_BATCH, end - offset))
            if not recs:
                break
            found = next((seen for r in recs if r.offset < end
                          and (seen := _matching(r.value, entry, name, data_matches)) is not None), None)
            if found is not None:
                if best is None or (found.time, p) < best[0]:
                    best = ((found.time, p), found)
                break  # the first match of a partition is its earliest
            offset = recs[-1].offset + 1
    return None if best is None else best[1]


def _matching(value: bytes, entry: WaitEntry, name: Callable[[str], bool], data_matches: Matcher) -> SeenEvent | None:
    try:
        ev = codec.decode(value)
    except SchemaError:
        return None  # the router quarantines it; a wait cannot match what nobody can read
    body = ev.body
    if not isinstance(body, DomainEvent) or ev.time < entry.since:
        return None
    try:
        data = codec_json(body)
    except ValueError:
        return None
    try:
        ok = name(body.name) and data_matches(data if isinstance(data, dict) else {})
    except Exception:  # a pattern that cannot judge this data: no match, as in the router
        return None
    return SeenEvent(ev.event_id, body.name, ev.time, data, body.data) if ok else None
