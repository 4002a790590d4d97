"""Records no reader could decode, kept aside with the reason.

A malformed or unknown-schema record must never block its partition, and
must not vanish either: the reader that meets it appends a copy to
`<namespace>.quarantine` (kept forever) with where it was and why, logs it,
and moves on. `read_quarantine` lists them for operators.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from stepline.log.base import Log, partition_for


@dataclass(frozen=True, slots=True)
class Quarantined:
    topic: str
    partition: int
    offset: int
    reason: str
    reader: str
    value: bytes


async def quarantine(log_: Log, quarantine_topic: str, topic: str, partition: int, offset: int,
                     value: bytes, reason: str, reader: str) -> None:
    key = f"{topic}/{partition}/{offset}".encode()
    record = json.dumps({
        "topic": topic, "partition": partition, "offset": offset, "reason": reason, "reader": reader,
        "value": base64.b64encode(value).decode(),
    }).encode()
    parts = await log_.partitions(quarantine_topic)
    await log_.append(quarantine_topic, partition_for(key, parts), [(key, record)])


async def read_quarantine(log_: Log, quarantine_topic: str) -> list[Quarantined]:
    out: list[Quarantined] = []
    for p in range(await log_.partitions(quarantine_topic)):
        offset, end = 0, await log_.end_offset(quarantine_topic, p)
        while offset < end:
            recs = await log_.read(quarantine_topic, p, offset, 1000)
            for r in recs:
                d: dict[str, Any] = json.loads(r.value)
                out.append(Quarantined(d["topic"], d["partition"], d["offset"], d["reason"], d["reader"],
                                       base64.b64decode(d["value"])))
            offset = recs[-1].offset + 1 if recs else end
    # Several readers (the worker and a rebuilding projection) may quarantine
    # the same record: one entry per place.
    unique = {(q.topic, q.partition, q.offset): q for q in out}
    return sorted(unique.values(), key=lambda q: (q.topic, q.partition, q.offset))
