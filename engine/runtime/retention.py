"""Retention: which ended runs may leave the log, and taking them out.

`plan` reads every partition of the runs topic once and folds it, as a
worker's rebuild would, to find the runs that ended before a cutoff. A run
is *prunable* when

* it has ended (completed, failed, cancelled, expired) before the cutoff,
* its parent, if it has one, is not live (a live parent may still need it),
* every record of it lies before the partition's newest snapshot, when the
  partition has one: that snapshot then holds the run as ended, so a worker
  that rebuilds from it and reads on from its offset, even one that loaded
  it just before the prune, never sees the run half-removed and never starts
  it again.

What may then go depends on the log (`Plan.prefix`):

* sqlite (`Log.remove`): exactly the records of the prunable runs, from the
  middle of the partitions. Offsets stay; every other record stays
  (ownership claims, pauses, live and younger runs), so a fold from offset 0
  gives every remaining run the state it had. The remove is one transaction
  that leaves out any run which got a record after the plan was made (a
  `dlq retry` racing the prune).
* Kafka (`Log.delete_before`, DeleteRecords): only a prefix of each
  partition. The prefix ends at the first record still needed: the first
  record of any run that stays, the newest snapshot's offset, a pause still
  in force (and the first copy of any pause delivered twice), an
  undecodable record; and then it moves back to the ownership claim that
  carries the highest epoch before that point, so a fold that starts where
  the prefix ends fences exactly as a fold from offset 0. A prunable run
  with any record at or after that point stays, and the point is computed
  again until it holds. So a fold of what is left, from the log start or
  from the newest snapshot, gives every remaining run the state it had.

Nothing here touches the other topics: the events topic (published events)
has its own retention, the queues topic is folded whole by the admission
owners, and waits are compacted (docs/operations.md, "Retention and
archival").
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from stepline.core import codec
from stepline.core.events import Event, PartitionClaimed, PauseChanged
from stepline.core.ids import new_event_id
from stepline.errors import SchemaError
from stepline.log.base import Log, Record
from stepline.log.topics import Topics
from stepline.projections.runs import LIVE, TERMINAL, PartitionRuns, RunState
from stepline.runtime.snapshots import SnapshotStore

__all__ = ["PartitionPlan", "Plan", "PruneReport", "RunRecords", "plan", "prune", "read_runs"]

READ_BATCH = 2000
# The "worker" named in the claim a Kafka prune appends (`_restate_epoch`).
RESTATED_BY = "stepline-prune"

# Why an ended run older than the cutoff is kept anyway (`Plan.held`).
HELD_PARENT = "its parent run is live"
HELD_SNAPSHOT = "it ended after its partition's newest snapshot (a later prune takes it)"
HELD_PREFIX = "a record still needed comes before its last one (Kafka deletes prefixes only)"


@dataclass(frozen=True, slots=True)
class RunRecords:
    """A prunable run: what it was, and where its records are."""

    run_id: str
    task_id: str
    status: str
    ended_at: int
    key: bytes
    offsets: tuple[int, ...]


@dataclass(slots=True)
class PartitionPlan:
    partition: int
    start: int  # the first offset the log still holds
    end: int  # the end offset the plan was made against
    snapshot: int | None  # the newest snapshot's offset, if there is one
    runs: dict[str, RunRecords] = field(default_factory=dict)
    # Kafka: records below this offset go (a prefix); else `end`.
    below: int = 0
    # The highest epoch any ownership claim of the partition carried.
    epoch: int = 0

    @property
    def events(self) -> int:
        return sum(len(r.offsets) for r in self.runs.values())


@dataclass(slots=True)
class Plan:
    cutoff_ms: int
    prefix: bool  # Kafka: whole prefixes go, not single records
    partitions: list[PartitionPlan]
    held: Counter[str] = field(default_factory=Counter)
    live: int = 0  # live runs seen, none of which is touched

    @property
    def runs(self) -> int:
        return sum(len(p.runs) for p in self.partitions)

    @property
    def events(self) -> int:
        return sum(p.events for p in self.partitions)

    def run_ids(self) -> set[str]:
        return {rid for p in self.partitions for rid in p.runs}

    def as_dict(self) -> dict[str, object]:
        return {
            "ended_before_ms": self.cutoff_ms, "runs": self.runs, "events": self.events, "live_runs": self.live,
            "held": dict(self.held),
            "partitions": [{"partition": p.partition, "runs": len(p.runs), "events": p.events,
                            "below": p.below if self.prefix else None} for p in self.partitions],
        }


@dataclass(slots=True)
class _Scan:
    """One partition, folded, with where each run's records are."""

    part: PartitionRuns
    offsets: dict[str, list[int]] = field(default_factory=dict)
    keys: dict[str, bytes] = field(default_factory=dict)
    claims: list[tuple[int, int]] = field(default_factory=list)  # (offset, epoch)
    # PauseChanged: (offset, event id, (scope, name), paused)
    pauses: list[tuple[int, str, tuple[str, str], bool]] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)
    # Events the fold dropped as a replaced owner's: (offset, epoch).
    fenced: list[tuple[int, int]] = field(default_factory=list)


async def read_runs(log: Log, topic: str, partition: int, start: int, end: int) -> Iterator[Record]:
    """Every record of a partition from `start` to `end` (a snapshot of the
    partition as the plan saw it), as one list: the caller decodes."""
    found: list[Record] = []
    offset = start
    while offset < end:
        recs = await log.read(topic, partition, offset, READ_BATCH)
        if not recs:
            break
        found.extend(r for r in recs if r.offset < end)
        offset = recs[-1].offset + 1
    return iter(found)


async def _scan(log: Log, topic: str, partition: int, start: int, end: int) -> _Scan:
    scan = _Scan(PartitionRuns(partition))
    for rec in await read_runs(log, topic, partition, start, end):
        try:
            ev = codec.decode(rec.value)
        except SchemaError:
            scan.unreadable.append(rec.offset)
            continue
        body = ev.body
        if isinstance(body, PartitionClaimed):
            scan.claims.append((rec.offset, ev.epoch))
        elif isinstance(body, PauseChanged):
            scan.pauses.append((rec.offset, ev.event_id, (body.scope, body.name), body.paused))
        elif ev.run_id:
            scan.offsets.setdefault(ev.run_id, []).append(rec.offset)
            scan.keys.setdefault(ev.run_id, rec.key)
        fenced = scan.part.fenced
        scan.part.apply(ev, rec.offset)
        if scan.part.fenced != fenced:
            scan.fenced.append((rec.offset, ev.epoch))
    return scan


def _ended(state: RunState) -> int:
    return state.ended_at if state.ended_at is not None else state.updated_at


async def plan(log: Log, topics: Topics, cutoff_ms: int, *, prefix: bool | None = None,
               progress: Callable[[int, int], None] | None = None) -> Plan:
    """What `prune` would remove of runs that ended before `cutoff_ms`.

    `prefix` (default: whether the log is Kafka, `not log.removes_records`)
    chooses whole prefixes over single records; see the module docstring.
    """
    if prefix is None:
        prefix = not log.removes_records
    runs_topic = topics.runs
    count = await log.partitions(runs_topic)
    snapshots = SnapshotStore(log, topics.snapshots)
    scans: list[tuple[PartitionPlan, _Scan]] = []
    for p in range(count):
        end = await log.end_offset(runs_topic, p)
        start = await log.start_offset(runs_topic, p)
        snap = await _snapshot_offset(log, snapshots, topics, p)
        scans.append((PartitionPlan(p, start, end, snap, below=end), await _scan(log, runs_topic, p, start, end)))
        if progress is not None:
            progress(p + 1, count)
    states: dict[str, RunState] = {rid: s for _, scan in scans for rid, s in scan.part.runs.items()}
    result = Plan(cutoff_ms, prefix, [pp for pp, _ in scans])
    result.live = sum(1 for s in states.values() if s.status in LIVE)
    for pp, scan in scans:
        pp.epoch = max((e for _, e in scan.claims), default=0)
        candidates = _candidates(scan, states, pp, cutoff_ms, result.held)
        if prefix:
            pp.below, kept = _prefix(scan, pp, candidates)
            result.held[HELD_PREFIX] += len(candidates) - len(kept)
            candidates = kept
        for rid in sorted(candidates, key=lambda r: scan.offsets[r][0]):
            state = states[rid]
            pp.runs[rid] = RunRecords(rid, state.task_id, state.status, _ended(state), scan.keys[rid],
                                      tuple(scan.offsets[rid]))
    return result


async def _snapshot_offset(log: Log, snapshots: SnapshotStore, topics: Topics, partition: int) -> int | None:
    try:
        if await log.partitions(topics.snapshots) <= partition:
            return None
        found = await snapshots.load(partition)
    except SchemaError:
        return None
    return None if found is None else found.next_offset


def _candidates(scan: _Scan, states: dict[str, RunState], pp: PartitionPlan, cutoff_ms: int,
                held: Counter[str]) -> set[str]:
    out: set[str] = set()
    for rid, state in scan.part.runs.items():
        if state.status not in TERMINAL or _ended(state) >= cutoff_ms or rid not in scan.offsets:
            continue
        parent = states.get(state.parent_run_id) if state.parent_run_id else None
        if parent is not None and parent.status in LIVE:
            held[HELD_PARENT] += 1
        elif pp.snapshot is not None and scan.offsets[rid][-1] >= pp.snapshot:
            held[HELD_SNAPSHOT] += 1
        else:
            out.add(rid)
    return out


def _prefix(scan: _Scan, pp: PartitionPlan, candidates: set[str]) -> tuple[int, set[str]]:
    """Where the deletable prefix of a partition ends, and the runs wholly inside it."""
    kept = set(candidates)
    fixed = pp.end if pp.snapshot is None else min(pp.end, pp.snapshot)
    if scan.unreadable:
        fixed = min(fixed, scan.unreadable[0])
    fixed = min(fixed, _pauses_needed(scan.pauses))
    while True:
        point = fixed
        for rid, offs in scan.offsets.items():
            if rid not in kept:
                point = min(point, offs[0])
        point = _fencing_kept(scan, point)
        late = {rid for rid in kept if scan.offsets[rid][-1] >= point}
        if not late:
            return max(point, pp.start), kept
        kept -= late


def _fencing_kept(scan: _Scan, point: int) -> int:
    """Move `point` back until a fold starting there drops every event the
    full fold dropped: each fenced event needs a claim above its epoch
    between `point` and itself. (Events it accepts it accepts anyway: a
    fold from later knows no higher epoch than the full one.)"""
    for offset, epoch in reversed(scan.fenced):
        if offset < point:
            break
        if not any(point <= o <= offset and e > epoch for o, e in scan.claims):
            point = max(o for o, e in scan.claims if o <= offset and e > epoch)
    return point


def _pauses_needed(pauses: list[tuple[int, str, tuple[str, str], bool]]) -> int:
    """The first offset a fold must still see for pauses to come out the same:
    the pause in force for each scope, and the first copy of any change that
    was delivered twice (a fold that missed it would apply the copy)."""
    first: dict[str, int] = {}
    copies: Counter[str] = Counter()
    latest: dict[tuple[str, str], tuple[str, bool]] = {}
    for offset, event_id, scope, paused in pauses:
        first.setdefault(event_id, offset)
        copies[event_id] += 1
        if copies[event_id] == 1:
            latest[scope] = (event_id, paused)
    needed = [first[eid] for eid, paused in latest.values() if paused]
    needed += [first[eid] for eid, n in copies.items() if n > 1]
    return min(needed, default=1 << 62)


async def _restate_epoch(log: Log, topics: Topics, pp: PartitionPlan) -> None:
    """Append a claim with the partition's highest epoch before its prefix goes.

    The claim that set that epoch may lie inside the prefix. A replaced
    owner that comes back after the prune (paused past its session) would
    then write events that every fold from the log start accepts, while the
    workers, holding the epoch in memory and in snapshots, drop them. A
    claim with an epoch that is already the highest changes no fold, and no
    owner sees it as a newer claim (`Partitions._claimed_elsewhere`).
    """
    if pp.epoch <= 0:
        return
    claim = Event(new_event_id(), PartitionClaimed.TYPE, "", "", 0, int(time.time() * 1000), pp.epoch,
                  PartitionClaimed(pp.partition, RESTATED_BY))
    await log.append(topics.runs, pp.partition, [(b"", codec.encode(claim))])


@dataclass(slots=True)
class PruneReport:
    runs: int
    events: int
    run_ids: set[str]
    # Kafka: the offsets each partition now starts at.
    starts: dict[int, int] = field(default_factory=dict)
    # sqlite: runs left whole because they got a record after the plan.
    moved_on: int = 0


async def prune(log: Log, topics: Topics, the_plan: Plan) -> PruneReport:
    """Remove what `the_plan` found. On sqlite, also drop the affected
    partitions' snapshots: they hold the pruned runs' states, and a worker
    rebuilds from offset 0 (or from its next snapshot) instead."""
    removed: set[str] = set()
    events = 0
    report = PruneReport(0, 0, removed)
    for pp in the_plan.partitions:
        if not pp.runs:
            continue
        if the_plan.prefix:
            await _restate_epoch(log, topics, pp)
            await log.delete_before(topics.runs, pp.partition, pp.below)
            report.starts[pp.partition] = pp.below
            removed.update(pp.runs)
            events += pp.events
            continue
        by_key = {r.key: list(r.offsets) for r in pp.runs.values()}
        gone = set(await log.remove(topics.runs, pp.partition, by_key, pp.end))
        for r in pp.runs.values():
            if r.key in gone:
                removed.add(r.run_id)
                events += len(r.offsets)
            else:
                report.moved_on += 1
        if gone:
            end = await log.end_offset(topics.snapshots, pp.partition)
            await log.delete_before(topics.snapshots, pp.partition, end)
    report.runs, report.events = len(removed), events
    return report
