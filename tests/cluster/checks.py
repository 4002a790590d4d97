"""What tests/test_cluster_faults.py reads back and checks once the faults are over.

Everything is judged from the runs topic as the brokers hold it, read from
the host, plus the file where every step body recorded when it began and
ended (tests/apps/cluster_app.py). The runs topic's records carry the
leader's append time (the cluster runs with LogAppendTime), on the same
clock as the step bodies' records.

What "a completed step executed twice" means here. The engine promises a
step runs at least once and is recorded exactly once: a step in flight
when its worker is cut off or paused runs again on the new owner, and the
old owner may even finish it later (its checkpoint is then fenced). What
must never happen is a step body *beginning* after the log has accepted
that step's checkpoint: whoever starts it then either did not read the
log up to it (a new owner that resumed too early) or does not know it has
lost the partition (a zombie that carried on). So each body's `begin` is
compared with the append time of its step's accepted StepCompleted.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import stepline as sl
from stepline.core import codec
from stepline.core.events import Event, PartitionClaimed, StepCompleted, StepStarted
from stepline.projections.runs import TERMINAL, PartitionRuns, RunState
from stepline.runtime.snapshots import SnapshotStore

# A body that began this long after its checkpoint was appended began after
# the checkpoint was accepted: the records' times come from the same clock,
# and the leader appends before the followers acknowledge (acks=all), so
# this covers the replication of the checkpoint, not clock skew.
AFTER_CHECKPOINT_S = 0.25


@dataclass(frozen=True, slots=True)
class Logged:
    partition: int
    offset: int
    appended_ms: int
    event: Event
    accepted: bool


@dataclass
class RunsTopic:
    """The runs topic read from offset 0, each event marked accepted or fenced by a fresh fold."""

    events: list[Logged] = field(default_factory=list)
    folds: dict[int, PartitionRuns] = field(default_factory=dict)

    @property
    def runs(self) -> dict[str, RunState]:
        return {rid: st for part in self.folds.values() for rid, st in part.runs.items()}

    def fenced(self) -> list[Logged]:
        return [e for e in self.events if not e.accepted]

    def claims(self) -> list[Logged]:
        return [e for e in self.events if isinstance(e.event.body, PartitionClaimed)]

    def owner_at(self, partition: int, t_ms: int) -> str | None:
        """The worker id of the last claim of `partition` appended before `t_ms`."""
        owner = None
        for e in self.claims():
            if e.partition == partition and e.appended_ms <= t_ms:
                assert isinstance(e.event.body, PartitionClaimed)
                owner = e.event.body.worker_id
        return owner

    def claimer(self, partition: int, epoch: int) -> str | None:
        for e in self.claims():
            body = e.event.body
            if e.partition == partition and e.event.epoch == epoch and isinstance(body, PartitionClaimed):
                return body.worker_id
        return None


async def read_runs_topic(client: sl.Client, partitions: int) -> RunsTopic:
    out = RunsTopic()
    log, topic = client.log, client.topics.runs
    for p in range(partitions):
        part = out.folds[p] = PartitionRuns(p)
        end = await log.end_offset(topic, p)
        offset = 0
        while offset < end:
            recs = await log.read(topic, p, offset, 5000)
            if not recs:
                break  # only transaction markers left below the end
            for r in recs:
                ev = codec.decode(r.value)
                before = part.fenced
                part.apply(ev, r.offset)
                out.events.append(Logged(p, r.offset, r.timestamp_ms, ev, part.fenced == before))
            offset = recs[-1].offset + 1
    return out


async def rebuilt_from_snapshots(client: sl.Client, partitions: int) -> dict[str, RunState]:
    """Each partition as a worker taking it over now rebuilds it: its newest
    snapshot (written by the workers along the way, zombies included), then
    the rest of the partition folded on top."""
    store = SnapshotStore(client.log, client.topics.snapshots)
    runs: dict[str, RunState] = {}
    for p in range(partitions):
        part = await store.load(p) or PartitionRuns(p)
        end = await client.log.end_offset(client.topics.runs, p)
        while part.next_offset < end:
            recs = await client.log.read(client.topics.runs, p, part.next_offset, 5000)
            if not recs:
                break
            for r in recs:
                part.apply(codec.decode(r.value), r.offset)
        runs.update(part.runs)
    return runs


@dataclass(frozen=True, slots=True)
class Execution:
    kind: str  # begin | end
    run_id: str
    step: int
    host: str
    at: float


def executions(records: Path) -> list[Execution]:
    if not records.exists():
        return []
    out = []
    for line in records.read_text().splitlines():
        kind, key, host, at = line.split()
        run_id, step = key.rsplit(":", 1)
        out.append(Execution(kind, run_id, int(step), host, float(at)))
    return out


def accepted_checkpoints(topic: RunsTopic) -> dict[tuple[str, int], list[Logged]]:
    found: dict[tuple[str, int], list[Logged]] = defaultdict(list)
    for e in topic.events:
        if e.accepted and isinstance(e.event.body, StepCompleted):
            found[(e.event.run_id, e.event.body.step)].append(e)
    return found


def started_after_checkpoint(topic: RunsTopic, runs: list[Execution]) -> list[str]:
    """Step bodies that began after their step's checkpoint was accepted, and
    accepted StepStarted events after an accepted StepCompleted of their step."""
    bad: list[str] = []
    checkpoints = accepted_checkpoints(topic)
    for x in runs:
        done = checkpoints.get((x.run_id, x.step))
        if x.kind == "begin" and done and x.at > done[0].appended_ms / 1000 + AFTER_CHECKPOINT_S:
            bad.append(f"{x.run_id}:{x.step} began on {x.host} {x.at - done[0].appended_ms / 1000:.2f} s "
                       f"after its checkpoint (offset {done[0].offset}) was appended")
    completed: set[tuple[str, int]] = set()
    for e in topic.events:
        body = e.event.body
        if e.accepted and isinstance(body, StepCompleted):
            completed.add((e.event.run_id, body.step))
        if e.accepted and isinstance(body, StepStarted) and (e.event.run_id, body.step) in completed:
            bad.append(f"{e.event.run_id}:{body.step} accepted StepStarted at offset {e.offset} after its checkpoint")
    return bad


def fenced_checkpoints_ignored(topic: RunsTopic) -> list[str]:
    """Every fenced checkpoint left the fold's record of its step as the accepted one wrote it."""
    bad: list[str] = []
    runs = topic.runs
    checkpoints = accepted_checkpoints(topic)
    for e in topic.fenced():
        body = e.event.body
        if not isinstance(body, StepCompleted):
            continue
        kept = runs[e.event.run_id].steps[body.step].output
        accepted = checkpoints[(e.event.run_id, body.step)][0].event.body
        assert isinstance(accepted, StepCompleted)
        if kept != accepted.output or kept == body.output:
            bad.append(f"{e.event.run_id}:{body.step}: the fold kept {kept!r}, the accepted checkpoint "
                       f"says {accepted.output!r}, the fenced one {body.output!r}")
    return bad


def not_ended(runs: dict[str, RunState], acknowledged: list[str]) -> list[str]:
    """Acknowledged triggers that are not on the log, or whose run has not ended."""
    return [f"{rid}: {runs[rid].status if rid in runs else 'not on the log'}"
            for rid in acknowledged if rid not in runs or runs[rid].status not in TERMINAL]


def reexecuted(runs: list[Execution]) -> Counter[tuple[str, int]]:
    """Steps whose body began more than once (in flight at a fault: allowed), and how often."""
    begins = Counter((x.run_id, x.step) for x in runs if x.kind == "begin")
    return Counter({k: n - 1 for k, n in begins.items() if n > 1})
