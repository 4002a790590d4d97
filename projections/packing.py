"""Suspended runs packed into a few hundred bytes (a worker's `RunTable`).

A run asleep or waiting costs a worker its `RunState` (45 slots), its
steps' mapping and states, its payload and the strings and integers they
hold: about two kilobytes, for as long as it sleeps, and a worker may hold
a hundred thousand sleepers. Packed, it is its snapshot form
(projections/snapshot.py, `run_to_json` without the run id, which the table
keeps as the key) as JSON, deflated with a preset dictionary: the first run
this packer packed. Runs of one worker share field names, task ids,
statuses and most of their shape, so a sleeper takes well under 200 bytes.

The bytes stay in this process's memory and never reach the log or a
snapshot (which stores runs in the snapshot's own form), so the dictionary
may differ from one worker to the next.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from stepline.projections.runs import RunState
from stepline.projections.snapshot import SnapshotError, run_from_json, run_to_json

# Raw deflate (no header or checksum: the bytes never leave memory) with a
# 4 KiB window: a run's JSON is mostly shorter, and a small window is cheaper
# to set up on every call.
_WBITS = -12
_LEVEL = 6
_MEM_LEVEL = 2


class JsonPacker:
    """`RunTable`'s packer (projections/runs.py, `Packer`)."""

    __slots__ = ("_zdict",)

    def __init__(self) -> None:
        self._zdict: bytes | None = None

    def pack(self, state: RunState) -> bytes:
        doc = run_to_json(state)
        del doc["run_id"]
        raw = json.dumps(doc, separators=(",", ":")).encode()
        if self._zdict is None:
            self._zdict = raw
        c = zlib.compressobj(_LEVEL, zlib.DEFLATED, _WBITS, _MEM_LEVEL, zlib.Z_DEFAULT_STRATEGY, self._zdict)
        return c.compress(raw) + c.flush()

    def _raw(self, data: bytes) -> bytes:
        assert self._zdict is not None, "bytes this packer did not pack"
        d = zlib.decompressobj(_WBITS, self._zdict)
        return d.decompress(data) + d.flush()

    def text(self, run_id: str, data: bytes) -> bytes:
        """The run's snapshot form (`run_to_json`) as JSON, from its packed
        bytes: the id goes first, where `run_to_json` puts it. Safe in
        another thread (the dictionary is set before anything is packed)."""
        raw = self._raw(data)
        return b'{"run_id":' + json.dumps(run_id).encode() + (b"," + raw[1:] if raw != b"{}" else b"}")

    def unpack(self, run_id: str, data: bytes) -> RunState:
        try:
            doc: dict[str, Any] = json.loads(self._raw(data))
            doc["run_id"] = run_id
            return run_from_json(doc)
        except (zlib.error, ValueError, SnapshotError) as exc:
            # Only this packer's own bytes come here: a bug, not damage.
            raise RuntimeError(f"a packed run {run_id} did not unpack: {exc}") from exc
