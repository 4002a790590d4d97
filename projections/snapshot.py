"""Snapshots of a partition's run state: bytes <-> PartitionRuns.

A snapshot is `fold(log[0:next_offset])` written down, so whoever writes
it, a rebuild may start from it and fold only the tail. The format is
versioned JSON (no pickle: the log outlives the code), zlib-compressed.
An unknown version or a damaged snapshot is refused with SnapshotError and
the caller rebuilds from offset 0 instead.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from stepline.core.events import ErrorInfo, PatchRecorded, PauseChanged, Payload
from stepline.errors import SteplineError
from stepline.projections.ended import EndedIds
from stepline.projections.runs import (
    AttemptError,
    LogLine,
    PartitionRuns,
    RetryInfo,
    RunState,
    StepState,
)

# 2: runs gained parent_step (schema v3); 3: expires_at and slot (v4);
# 4: steps keep their wake condition; 5: runs keep the ids of the requests
# applied to them (a late copy of one is then recognised), and steps their
# wait_for_any group; 6: the ids of compacted ended runs (PartitionRuns.ended)
# and the ends of the runs still whole (`ending`); a worker that could not
# read them would take a repeated trigger of a compacted run for a new run.
# 7: the compacted ids packed, 16 bytes each (`ended_ids`, base64 of
# EndedIds.packed; ids not of the engine's format stay strings in `ended`).
# A snapshot of another version is not read; the partition is rebuilt from
# the log instead. Version 5 is read as 6 with nothing compacted, version 6's
# `ended` as strings.
VERSION = 7
_READABLE = (5, 6, VERSION)


class SnapshotError(SteplineError):
    """A snapshot could not be read; rebuild from the log instead."""


def _payload(p: Payload | None) -> Any:
    return None if p is None else [p.content_type, base64.b64encode(p.data).decode()]


def _unpayload(v: Any) -> Payload | None:
    return None if v is None else Payload(v[0], base64.b64decode(v[1]))


def _error(e: ErrorInfo | None) -> Any:
    return None if e is None else [e.type, e.message, e.stack, e.retriable]


def _unerror(v: Any) -> ErrorInfo | None:
    return None if v is None else ErrorInfo(v[0], v[1], v[2], v[3])


def _step(s: StepState) -> list[Any]:
    return [s.step, s.name, s.status, s.attempt, s.started_at, s.ended_at,
            _payload(s.input), _payload(s.output), _error(s.error), s.wake_at, s.condition, s.group]


def _unstep(v: list[Any]) -> StepState:
    return StepState(v[0], v[1], v[2], v[3], v[4], v[5],
                     _unpayload(v[6]), _unpayload(v[7]), _unerror(v[8]), v[9], v[10],
                     # Run JSON the query store kept from before version 5 has no group.
                     v[11] if len(v) > 11 else None)


# RunState fields stored as they are (JSON scalars); the rest are converted.
_PLAIN = (
    "run_id", "task_id", "status", "created_at", "updated_at", "seq", "attempt",
    "first_attempt", "priority", "idempotency_key", "parent_run_id", "parent_step", "queue",
    "concurrency_key", "not_before", "expires_at", "slot", "wake_at", "retry_at", "started_at", "ended_at",
    "dead_lettered", "logs_dropped",
)


def _unattempt_error(v: list[Any]) -> AttemptError:
    error = _unerror(v[3])
    if error is None:
        raise SnapshotError("an attempt error without its error")
    return AttemptError(v[0], v[1], v[2], error, v[4])


def _run(r: RunState) -> dict[str, Any]:
    d: dict[str, Any] = {name: getattr(r, name) for name in _PLAIN}
    d["tags"] = list(r.tags)
    d["payload"] = _payload(r.payload)
    d["output"] = _payload(r.output)
    d["error"] = _error(r.error)
    d["steps"] = [_step(s) for s in r.steps.values()]
    d["errors"] = [[e.attempt, e.step, e.step_name, _error(e.error), e.time] for e in r.errors]
    d["retries"] = [[i.attempt, i.retry_at, i.delay_ms, i.reason, i.time] for i in r.retries]
    d["logs"] = [[g.time, g.level, g.message, g.attempt, g.step, g.fields] for g in r.logs]
    if r.requests:
        d["requests"] = list(r.requests)
    # Schema v5 (forks, task versions, patches): absent when unset.
    if r.forked_from is not None:
        d["forked"] = [r.forked_from, r.forked_at_step]
    if r.task_version is not None:
        d["task_version"] = r.task_version
    if r.patches:
        d["patches"] = [[x.patch, x.applied, x.step] for x in r.patches]
    if r.parent_pool is not None:  # worker pools: absent when unset, still format 5
        d["parent_pool"] = r.parent_pool
    return d


def _unrun(d: dict[str, Any]) -> RunState:
    steps: Mapping[int, StepState] = MappingProxyType({s[0]: _unstep(s) for s in d["steps"]})
    payload = _unpayload(d["payload"])
    if payload is None:
        raise SnapshotError(f"run {d.get('run_id')!r} has no payload")
    return RunState(
        **{name: d[name] for name in _PLAIN},
        tags=tuple(d["tags"]),
        payload=payload,
        output=_unpayload(d["output"]),
        error=_unerror(d["error"]),
        steps=steps,
        errors=tuple(_unattempt_error(e) for e in d["errors"]),
        retries=tuple(RetryInfo(*i) for i in d["retries"]),
        logs=tuple(LogLine(*g) for g in d["logs"]),
        # Absent when empty (most runs), and in query rows written before v5.
        requests=tuple(d.get("requests", ())),
        forked_from=d["forked"][0] if "forked" in d else None,
        forked_at_step=d["forked"][1] if "forked" in d else None,
        task_version=d.get("task_version"),
        patches=tuple(PatchRecorded(x[0], x[1], x[2]) for x in d.get("patches", ())),
        parent_pool=d.get("parent_pool"),
    )


def run_to_json(r: RunState) -> dict[str, Any]:
    """One run in the snapshot's per-run JSON form (the query projection stores it)."""
    return _run(r)


def run_from_json(d: dict[str, Any]) -> RunState:
    """The inverse of `run_to_json`; SnapshotError when `d` does not add up."""
    try:
        return _unrun(d)
    except (KeyError, IndexError, TypeError) as exc:
        raise SnapshotError(f"run state is damaged: {type(exc).__name__}: {exc}") from exc


# Runs serialised per json.dumps call when a snapshot is written: each call
# holds the GIL throughout, and a worker writes snapshots in a thread while
# its event loop runs timers (engine/runtime/snapshots.py).
_CHUNK = 256


def _runs(part: PartitionRuns) -> Iterator[bytes]:
    """The runs' JSON objects, comma-separated, `_CHUNK` runs at a time."""
    table = part.runs
    whole = list(table.whole.values())
    for i in range(0, len(whole), _CHUNK):
        text = json.dumps([_run(r) for r in whole[i : i + _CHUNK]], separators=(",", ":"))
        yield text[1:-1].encode()
    if table.packed:
        # A worker's packed suspended runs: their JSON without a RunState.
        packer = table.packer
        assert packer is not None
        packed = list(table.packed.items())
        for i in range(0, len(packed), _CHUNK):
            yield b",".join(packer.text(rid, data) for rid, data in packed[i : i + _CHUNK])


def dump(part: PartitionRuns) -> bytes:
    """The snapshot of `part`. Reads `part` only: a `part.frozen()` copy may
    be dumped in another thread while the original folds on."""
    doc: dict[str, Any] = {
        "v": VERSION,
        "partition": part.partition,
        "epoch": part.epoch,
        "next_offset": part.next_offset,
        "fenced": part.fenced,
    }
    if part.paused:  # written only when set, read with a default: still format 5
        doc["paused"] = [[p.scope, p.name, p.reason, p.requested_by] for p in part.paused.values()]
    if part.pause_events:
        doc["pause_events"] = sorted(part.pause_events)
    if part.ended:
        packed, other = part.ended.packed()
        doc["ended_ids"] = base64.b64encode(packed).decode()
        doc["ended"] = other
    if part.ending:
        doc["ending"] = [[o, rid] for o, rid in part.ending]
    head = json.dumps(doc, separators=(",", ":")).encode()
    # Compressed as it is serialised: the JSON of 100,000 runs is ~70 MB,
    # compressed a few, and a worker's memory would keep the peak.
    z = zlib.compressobj(3)
    out = [z.compress(head[:-1] + b',"runs":[')]
    sep = b""
    for piece in _runs(part):
        out.append(z.compress(sep + piece))
        sep = b","
    out += [z.compress(b"]}"), z.flush()]
    return b"".join(out)


def load(data: bytes) -> PartitionRuns:
    try:
        doc = json.loads(zlib.decompress(data))
    except (zlib.error, ValueError) as exc:
        raise SnapshotError(f"snapshot is damaged: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("v") not in _READABLE:
        raise SnapshotError(f"snapshot version {doc.get('v') if isinstance(doc, dict) else '?'} is unknown")
    try:
        part = PartitionRuns(doc["partition"], doc["epoch"], doc["next_offset"], fenced=doc["fenced"])
        for d in doc["runs"]:
            run = _unrun(d)
            part.runs[run.run_id] = run
        for scope, name, reason, by in doc.get("paused", ()):
            part.paused[(scope, name)] = PauseChanged(scope, name, True, reason, by)
        part.pause_events = set(doc.get("pause_events", ()))
        part.ended = EndedIds.unpacked(base64.b64decode(doc.get("ended_ids", "")), doc.get("ended", ()))
        part.ending.extend((o, rid) for o, rid in doc.get("ending", ()))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot is damaged: {type(exc).__name__}: {exc}") from exc
    return part
