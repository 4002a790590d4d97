"""Where partition snapshots live: the `<namespace>.snapshots` topic.

Partition p of the snapshots topic holds snapshots of partition p of the
runs topic. One snapshot is one append: its bytes in chunks (so no record
outgrows a broker's message limit), then a manifest naming the chunk count,
size and CRC. The newest snapshot is therefore found from the end of the
partition without a scan: the last record is its manifest, the chunks sit
right before it. Anything that does not add up (a zombie's interleaved
append, a torn write, retention) makes `load` return None, and the worker
rebuilds from offset 0: a snapshot is only ever a shortcut.
"""

from __future__ import annotations

import asyncio
import json
import zlib

from stepline.log.base import Log
from stepline.projections import snapshot
from stepline.projections.runs import PartitionRuns

CHUNK = 256 * 1024
_CHUNK_TAG = b"C"
_MANIFEST_TAG = b"M"


class SnapshotStore:
    def __init__(self, log: Log, topic: str) -> None:
        self.log = log
        self.topic = topic

    async def save(self, part: PartitionRuns) -> int:
        """Write a snapshot of `part`; returns the runs offset it covers up to.

        The snapshot is of `part` as it is now (a frozen copy), serialised
        in a thread: a partition of a hundred thousand runs takes a good
        part of a second to write, which on the event loop would hold up
        every timer due meanwhile."""
        part = part.frozen()
        data = await asyncio.to_thread(snapshot.dump, part)
        key = str(part.partition).encode()
        records = [(key, _CHUNK_TAG + data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)]
        manifest = {
            "chunks": len(records),
            "bytes": len(data),
            "crc": zlib.crc32(data),
            "next_offset": part.next_offset,
        }
        records.append((key, _MANIFEST_TAG + json.dumps(manifest).encode()))
        await self.log.append(self.topic, part.partition, records)
        return part.next_offset

    async def load(self, partition: int) -> PartitionRuns | None:
        """The newest intact snapshot of a partition, or None."""
        end = await self.log.end_offset(self.topic, partition)
        if end == 0:
            return None
        last = await self.log.read(self.topic, partition, end - 1, 1)
        if not last or not last[0].value.startswith(_MANIFEST_TAG):
            return None
        try:
            manifest = json.loads(last[0].value[1:])
            count, size, crc = manifest["chunks"], manifest["bytes"], manifest["crc"]
        except (ValueError, KeyError, TypeError):
            return None
        first = end - 1 - count
        if first < 0:
            return None
        parts: list[bytes] = []
        offset = first
        while offset < end - 1:
            recs = await self.log.read(self.topic, partition, offset, min(64, end - 1 - offset))
            if not recs or recs[0].offset != offset:
                return None  # retention took part of it
            for r in recs:
                if r.offset >= end - 1:
                    break
                if not r.value.startswith(_CHUNK_TAG):
                    return None
                parts.append(r.value[1:])
                offset = r.offset + 1
        data = b"".join(parts)
        if len(data) != size or zlib.crc32(data) != crc:
            return None
        part = snapshot.load(data)
        if part.partition != partition:
            return None
        return part
