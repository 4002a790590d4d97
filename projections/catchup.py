"""A rebuild that decodes only what it keeps.

A worker that takes a partition over folds it from its newest snapshot (or
offset 0) to the end. Most runs in a long log ended long ago, and with
compaction on (`PartitionRuns.keep_ended`) all the fold keeps of them is
their id. Decoding and folding each of their events to learn that costs
~20 µs per event; reading the envelope (type, run id, seq, epoch) costs
~1.5 µs (`codec.peek_envelope`).

`plan` looks at the envelopes of one read batch and picks the runs whose
whole story in the batch can be told from envelopes alone: triggered in
the batch (no state before it), only event kinds that cannot end a run
other than by completing it, and a RunCompleted the fold would accept
(not fenced by the partition's epoch at that point, its seq above the
run's) at an offset the compaction window has passed by the end of the
rebuild. The fold would end such a run COMPLETED and compact it before the
rebuild ends, so the caller records its id as ended and decodes none of
its events. Everything else (other runs, claims, pauses, records of older
schema versions or that do not parse) goes through the full fold, in log
order. The result is the state the full fold reaches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from stepline.core.events import (
    REQUEST_TYPES,
    LogRecorded,
    PartitionClaimed,
    PatchRecorded,
    RetryScheduled,
    RunCompleted,
    RunResumed,
    RunStarted,
    RunSuspended,
    RunTriggered,
    SlotGranted,
    StepCompleted,
    StepFailed,
    StepStarted,
    WaitCompleted,
)
from stepline.projections.runs import PartitionRuns

# Kinds a run can meet on its way to completing without any of them ending
# it: each is folded by `_changes`, so an accepted one only raises the seq.
_PLAIN = frozenset({
    RunTriggered.TYPE, RunStarted.TYPE, StepStarted.TYPE, StepCompleted.TYPE, StepFailed.TYPE,
    RetryScheduled.TYPE, RunSuspended.TYPE, RunResumed.TYPE, WaitCompleted.TYPE, SlotGranted.TYPE,
    LogRecorded.TYPE, PatchRecorded.TYPE, RunCompleted.TYPE,
})

Envelope = tuple[str, str, int, int]  # type, run id, seq, epoch


@dataclass(slots=True)
class _Run:
    seq: int | None = None  # None until triggered
    done: bool = False
    fenced: int = 0
    plain: bool = True
    indices: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Plan:
    skip: set[int]  # indices into the batch nobody needs decoded
    ended: list[str]  # runs the fold would end and compact in this batch
    fenced: int  # events of those runs the epoch fence would have dropped


def plan(part: PartitionRuns, values: Sequence[bytes], offsets: Sequence[int], end: int,
         peek: Callable[[bytes], Envelope | None], claim_epoch: Callable[[bytes], int | None]) -> Plan:
    """What of one batch (in log order) needs no decoding; see the module docstring.

    `claim_epoch` decodes a PartitionClaimed record's epoch (None when it
    does not decode: the full fold then deals with it, and no run of this
    batch is skipped, since the epoch is unknown from there on).
    """
    none = Plan(set(), [], 0)
    if part.keep_ended is None:
        return none
    horizon = end - part.keep_ended  # a run ended below this is compacted by the end
    runs: dict[str, _Run] = {}
    epoch = part.epoch
    known, ended = part.runs, part.ended
    for i, value in enumerate(values):
        env = peek(value)
        if env is None:
            return none  # an older schema or damage: the full fold handles the rest
        kind, rid, seq, ev_epoch = env
        if kind == PartitionClaimed.TYPE:
            claimed = claim_epoch(value)
            if claimed is None:
                return none
            epoch = max(epoch, claimed)
            continue
        if not rid:
            continue
        run = runs.get(rid)
        if run is None:
            # Known and compacted runs are never in `runs`: asked once per run.
            if rid in known or rid in ended:
                continue
            run = runs[rid] = _Run()
        run.indices.append(i)
        if not run.plain:
            continue
        if kind not in _PLAIN:
            run.plain = False
            continue
        # As PartitionRuns.apply and fold_run would take it:
        request = kind in REQUEST_TYPES
        if not request and ev_epoch < epoch:
            run.fenced += 1
        elif run.done:
            pass
        elif run.seq is None:
            if kind == RunTriggered.TYPE:
                run.seq = seq
        elif seq > run.seq:  # a request raises it too, if it carries one
            run.seq = seq
            if kind == RunCompleted.TYPE:
                run.done = offsets[i] < horizon
                if not run.done:
                    run.plain = False  # it stays whole: fold it all
    out = Plan(set(), [], 0)
    for rid, run in runs.items():
        if run.plain and run.done:
            out.skip.update(run.indices)
            out.ended.append(rid)
            out.fenced += run.fenced
    return out
