"""Run state as a pure fold over run events.

`fold_run(state, event) -> state` has no I/O, no clock and no globals: the
same events always give the same state, which is what lets a worker rebuild
a partition after a crash and `stepline replay` rebuild any projection.

`PartitionRuns` holds the runs of one partition plus the fencing epoch. It
is the only mutable piece: a table of immutable `RunState`s (`RunTable`; a
worker keeps suspended ones packed), each replaced by the result of
`fold_run`, so a state handed out is never changed under the reader's feet.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol

from stepline.core.events import (
    PAUSE_QUEUE,
    PAUSE_TASK,
    REQUEST_TYPES,
    CopiedStep,
    ErrorInfo,
    Event,
    LogRecorded,
    PartitionClaimed,
    PatchRecorded,
    PauseChanged,
    Payload,
    RetryScheduled,
    RunCancelled,
    RunCompleted,
    RunDeadLettered,
    RunExpired,
    RunFailed,
    RunResumed,
    RunRetriggered,
    RunStarted,
    RunSuspended,
    RunTriggered,
    SlotGranted,
    StepCompleted,
    StepFailed,
    StepStarted,
    WaitCompleted,
)
from stepline.core.frozen import fast_init
from stepline.projections.ended import EndedIds

# The idempotency-key prefix of debounced triggers (engine/sdk/debounce.py).
DEBOUNCE_PREFIX = "stepline/debounce/"

PENDING = "pending"
RUNNING = "running"
SUSPENDED = "suspended"
RETRYING = "retrying"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"
EXPIRED = "expired"

# A wait resolved before the run recorded it; done, like "completed".
RESOLVED = "resolved"
# A branch of a `wait_for_any` that another branch beat: ended, never resolved.
LOST = "lost"
DONE_STEPS = frozenset({"completed", RESOLVED})

TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, EXPIRED})
# Ended for good: nothing but logs and a dead-letter mark can change them
# (a failed or cancelled run can still be retriggered, with its journal).
FINAL = frozenset({COMPLETED, EXPIRED})
LIVE = frozenset({PENDING, RUNNING, SUSPENDED, RETRYING})

# Logs kept per run in the projection. The log itself keeps every record;
# this bound only caps what one run can hold in a worker's memory.
MAX_LOGS_PER_RUN = 1000

_EMPTY_STEPS: Mapping[int, StepState] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class StepState:
    step: int
    name: str
    status: str  # running | completed | failed | waiting | resolved | lost
    attempt: int
    started_at: int | None = None
    ended_at: int | None = None
    input: Payload | None = None
    output: Payload | None = None
    error: ErrorInfo | None = None
    wake_at: int | None = None
    condition: str | None = None  # a wait's wake condition (JSON), as recorded
    group: int | None = None  # the wait_for_any it is a branch of (schema v5)


@dataclass(frozen=True, slots=True)
class AttemptError:
    attempt: int
    step: int | None
    step_name: str | None
    error: ErrorInfo
    time: int


@dataclass(frozen=True, slots=True)
class RetryInfo:
    attempt: int
    retry_at: int
    delay_ms: int
    reason: str
    time: int


@dataclass(frozen=True, slots=True)
class LogLine:
    time: int
    level: str
    message: str
    attempt: int
    step: int | None
    fields: str


@dataclass(frozen=True, slots=True)
class RunState:
    run_id: str
    task_id: str
    status: str
    payload: Payload
    created_at: int
    updated_at: int
    seq: int = 0
    attempt: int = 1
    # Attempt number at the last (re)trigger: retry policies count from here.
    first_attempt: int = 1
    priority: int = 0
    tags: tuple[str, ...] = ()
    idempotency_key: str | None = None
    parent_run_id: str | None = None
    parent_step: int | None = None
    queue: str | None = None
    concurrency_key: str | None = None
    not_before: int | None = None
    expires_at: int | None = None
    # The limited queue that admitted this run (SlotGranted), until its
    # attempt ends; None when it holds no slot.
    slot: str | None = None
    steps: Mapping[int, StepState] = field(default_factory=lambda: _EMPTY_STEPS)
    wake_at: int | None = None
    retry_at: int | None = None
    started_at: int | None = None
    ended_at: int | None = None
    output: Payload | None = None
    error: ErrorInfo | None = None
    dead_lettered: bool = False
    errors: tuple[AttemptError, ...] = ()
    retries: tuple[RetryInfo, ...] = ()
    logs: tuple[LogLine, ...] = ()
    logs_dropped: int = 0
    # Schema v5: lineage of a fork, the task code's version of the latest
    # attempt, and the run's answers to `patched()` (the first one counts).
    forked_from: str | None = None
    forked_at_step: int | None = None
    task_version: str | None = None
    patches: tuple[PatchRecorded, ...] = ()
    # Event ids of the requests that changed this run (cancels, retriggers,
    # grants, debounced re-triggers). Requests carry no sequence number, so
    # this is how a copy delivered again later is known for what it is: a
    # late copy of a retrigger would otherwise restart a run that failed
    # again since, and a late copy of a cancel would stop its retry.
    requests: tuple[str, ...] = ()
    # The worker pool of the parent run (`extra["parent_pool"]` on the
    # trigger), where the child's answer goes; None for the default pool.
    parent_pool: str | None = None

    @property
    def live(self) -> bool:
        return self.status in LIVE

    def step_failures(self) -> dict[int, tuple[AttemptError, ...]]:
        """The failed tries of each step in the current attempt, oldest first:
        where a step with its own retry policy (`@step(retry=...)`) resumes
        counting after its worker died."""
        found: dict[int, tuple[AttemptError, ...]] = {}
        for err in self.errors:
            if err.attempt == self.attempt and err.step is not None:
                found[err.step] = found.get(err.step, ()) + (err,)
        return found

    @property
    def attempt_in_trigger(self) -> int:
        """1 for the first attempt since the run was (re)triggered."""
        return self.attempt - self.first_attempt + 1

    def completed_steps(self) -> int:
        return sum(1 for s in self.steps.values() if s.status in DONE_STEPS)

    def patch_answers(self) -> dict[str, bool]:
        """The run's recorded answers to `patched()`, by patch id."""
        return {p.patch: p.applied for p in self.patches}


def _compile_evolve() -> Callable[[RunState, dict[str, Any]], RunState]:
    """`dataclasses.replace` for RunState, generated: about 6x faster.

    The fold copies a run's state on every event, so this is on the hot
    path of every worker (replace() re-inspects the fields on each call).
    It copies every slot through the slot's own setter (object.__setattr__,
    what a frozen class needs otherwise, costs twice as much per field),
    then overwrites the few that change; a name that is not a field raises
    KeyError.
    """
    lines = ["def evolve(s, kw):", "    n = _new(_cls)"]
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": RunState}
    setters = {name: getattr(RunState, name).__set__ for name in RunState.__slots__}
    for name in RunState.__slots__:
        namespace[f"_set_{name}"] = setters[name]
        lines.append(f"    _set_{name}(n, s.{name})")
    namespace["_setters"] = setters
    lines += ["    for k, v in kw.items():", "        _setters[k](n, v)", "    return n"]
    exec("\n".join(lines), namespace)
    fn: Callable[[RunState, dict[str, Any]], RunState] = namespace["evolve"]
    return fn


_evolve = _compile_evolve()
# The fold builds a StepState per step event (engine/core/frozen.py: half the cost).
for _cls in (StepState, RunState, AttemptError, RetryInfo, LogLine):
    fast_init(_cls)


def _with_step(state: RunState, step: StepState) -> Mapping[int, StepState]:
    steps = dict(state.steps)
    steps[step.step] = step
    return MappingProxyType(steps)


def fold_run(state: RunState | None, event: Event) -> RunState | None:
    """Apply one event to one run's state. Unknown or misplaced events are no-ops.

    Returns None only while the run has not been triggered yet (an event
    that arrives for a run id with no RunTriggered is ignored). An owner
    event whose `seq` is not above the run's is a duplicate delivery and
    changes nothing; client requests carry no sequence and are idempotent
    by their own rules.
    """
    body = event.body
    t = event.time
    if state is not None and event.type in _REMEMBERED and event.event_id in state.requests:
        return state  # this very request was applied already
    if isinstance(body, RunTriggered):
        if state is not None:
            if (
                body.idempotency_key is not None and body.idempotency_key.startswith(DEBOUNCE_PREFIX)
                and state.status == PENDING and state.started_at is None
            ):
                # A later trigger of a debounced key: it replaces the payload
                # and pushes the start back, until the run has started.
                return _evolve(state, {"payload": body.payload, "not_before": body.not_before,
                                       "updated_at": t, "requests": state.requests + (event.event_id,)})
            return state  # idempotent: a repeated trigger is a no-op
        return RunState(
            run_id=event.run_id,
            task_id=event.task_id,
            status=PENDING,
            payload=body.payload,
            created_at=t,
            updated_at=t,
            seq=event.seq,
            priority=body.priority,
            tags=tuple(body.tags),
            idempotency_key=body.idempotency_key,
            parent_run_id=body.parent_run_id,
            parent_step=body.parent_step,
            parent_pool=event.extra.get(PARENT_POOL) if event.extra else None,
            queue=body.queue,
            concurrency_key=body.concurrency_key,
            not_before=body.not_before,
            expires_at=body.expires_at,
            forked_from=body.forked_from,
            forked_at_step=body.forked_at_step,
            steps=_copied_steps(body.journal, t) if body.journal else _EMPTY_STEPS,
            patches=body.patches,
            # Only a debounced trigger can change a run after creating it,
            # so only its own late copy needs recognising.
            requests=(event.event_id,) if _debounced(body) else (),
        )
    if state is None:
        return None
    if event.type not in REQUEST_TYPES:
        if event.seq <= state.seq:
            return state
    if state.status in TERMINAL:
        return _fold_terminal(state, event)
    changes = _changes(state, event)
    if changes is None or (not changes and event.seq <= state.seq):
        return state  # nothing changed: not even the time of the last change
    if changes and event.type in _REMEMBERED:
        changes["requests"] = state.requests + (event.event_id,)
    changes["updated_at"] = t
    if event.seq > state.seq:
        changes["seq"] = event.seq
    return _evolve(state, changes)


# Requests whose copies the fold recognises by event id. WaitCompleted is
# not among them: a wait takes the first resolution of its journal position
# and ignores the rest, which covers copies too.
# The envelope's `extra` entry naming a child run's parent's pool (set only
# when that is not the default pool). Never rename it: logs carry it.
PARENT_POOL = "parent_pool"

_REMEMBERED = frozenset({RunTriggered.TYPE, RunCancelled.TYPE, RunRetriggered.TYPE, SlotGranted.TYPE})


def _debounced(body: RunTriggered) -> bool:
    return body.idempotency_key is not None and body.idempotency_key.startswith(DEBOUNCE_PREFIX)


def _copied_steps(journal: tuple[CopiedStep, ...], t: int) -> Mapping[int, StepState]:
    """A fork's copied journal: done positions that answer on replay. Attempt
    0 marks them as copied, never executed in this run."""
    return MappingProxyType({
        c.step: StepState(c.step, c.name, "completed", 0, t, t, input=c.input, output=c.output, error=c.error)
        for c in journal
    })


def _changes(state: RunState, event: Event) -> dict[str, Any] | None:
    """The fields one event changes in a live run, or None for no change."""
    body = event.body
    t = event.time
    steps = state.steps
    if isinstance(body, RunStarted):
        return {
            "status": RUNNING,
            "attempt": body.attempt,
            "started_at": state.started_at if state.started_at is not None else t,
            "wake_at": None,
            "retry_at": None,
            "not_before": None,
            "task_version": body.task_version,
        }
    if isinstance(body, StepStarted):
        prev = steps.get(body.step)
        if prev is not None and prev.status == "completed":
            return {}
        step = StepState(body.step, body.name, "running", body.attempt, t, input=body.input)
        return {"steps": _with_step(state, step)}
    if isinstance(body, StepCompleted):
        prev = steps.get(body.step)
        if prev is not None and prev.status == "completed":
            return {}  # exactly one accepted result per step
        step = StepState(
            body.step, body.name, "completed", body.attempt,
            prev.started_at if prev is not None else t, t,
            input=prev.input if prev is not None else None, output=body.output,
        )
        return {"steps": _with_step(state, step)}
    if isinstance(body, StepFailed):
        return _step_failed(state, body, t)
    if isinstance(body, RetryScheduled):
        info = RetryInfo(body.attempt, body.retry_at, body.delay_ms, body.reason, t)
        return {
            "slot": None,
            "status": RETRYING,
            "attempt": body.attempt,
            "retry_at": body.retry_at,
            "retries": state.retries + (info,),
        }
    if isinstance(body, RunSuspended):
        return _run_suspended(state, body, t)
    if isinstance(body, RunResumed):
        prev = steps.get(body.step)
        if prev is None or prev.status != "waiting":
            return {}
        return _waits_changed(_won(state, replace(prev, status="completed", ended_at=t)))
    if isinstance(body, WaitCompleted):
        return _wait_completed(state, body, t)
    if isinstance(body, RunCompleted):
        return {"status": COMPLETED, "output": body.output, "ended_at": t, "error": None, "slot": None}
    if isinstance(body, RunFailed):
        return {"status": FAILED, "error": body.error, "ended_at": t, "slot": None}
    if isinstance(body, RunCancelled):
        return {"status": CANCELLED, "ended_at": t, "wake_at": None, "retry_at": None, "slot": None}
    if isinstance(body, SlotGranted):
        return {"slot": body.queue} if state.slot is None else {}
    if isinstance(body, RunExpired):
        if state.status != PENDING or state.started_at is not None:
            return {}  # it started in time; a late expiry changes nothing
        return {"status": EXPIRED, "ended_at": t, "slot": None}
    if isinstance(body, LogRecorded):
        return _log_changes(state, event, body)
    if isinstance(body, PatchRecorded):
        if any(p.patch == body.patch for p in state.patches):
            return {}  # the first answer stands
        return {"patches": state.patches + (body,)}
    return None


def _step_failed(state: RunState, body: StepFailed, t: int) -> dict[str, Any]:
    """Every failed attempt is recorded on the run; a step that already
    completed keeps its one accepted result."""
    err = AttemptError(body.attempt, body.step, body.name, body.error, t)
    changes: dict[str, Any] = {"errors": state.errors + (err,), "error": body.error}
    if body.step is None:
        return changes
    prev = state.steps.get(body.step)
    if prev is not None and prev.status == "completed":
        return changes
    changes["steps"] = _with_step(
        state,
        StepState(
            body.step, body.name or (prev.name if prev else "?"), "failed",
            body.attempt, prev.started_at if prev else t, t,
            input=prev.input if prev else None, error=body.error,
        ),
    )
    return changes


def _run_suspended(state: RunState, body: RunSuspended, t: int) -> dict[str, Any]:
    """A wait opens at its journal position, unless it is already decided."""
    steps = state.steps
    prev = steps.get(body.step)
    if prev is not None and prev.status in ("completed", LOST):
        return {}  # a stale duplicate: already resumed past this wait
    if body.group is not None and _group_decided(steps, body.group, body.step):
        # Another branch of the same wait_for_any already won (in log
        # order): this one ends here, whatever resolved it early.
        lost = StepState(body.step, body.reason, LOST, state.attempt, prev.started_at if prev else t, t,
                         wake_at=body.wake_at, condition=body.condition, group=body.group)
        return _waits_changed(_with_step(state, lost))
    if prev is not None and prev.status == RESOLVED:
        # Resolved before the wait was recorded (a token completed, a
        # child ended or an event matched first): nothing to wait for.
        done = replace(prev, status="completed", condition=body.condition, group=body.group)
        return _waits_changed(_won(state, done))
    step = StepState(
        body.step, body.reason, "waiting", state.attempt,
        prev.started_at if prev else t, wake_at=body.wake_at, condition=body.condition,
        group=body.group,
    )
    return _waits_changed(_with_step(state, step))


def _waits_changed(steps: Mapping[int, StepState]) -> dict[str, Any]:
    """Status after a wait opened or closed: suspended while any wait is open
    (woken by the earliest deadline among them), else ready to run again.
    Either way the attempt is over, and with it any queue slot."""
    waiting = [s for s in steps.values() if s.status == "waiting"]
    if not waiting:
        return {"status": PENDING, "wake_at": None, "steps": steps, "slot": None}
    deadlines = [s.wake_at for s in waiting if s.wake_at is not None]
    return {"status": SUSPENDED, "wake_at": min(deadlines) if deadlines else None, "steps": steps, "slot": None}


def _wait_completed(state: RunState, body: WaitCompleted, t: int) -> dict[str, Any]:
    """The first resolution of a wait wins; later ones (redelivery, a late
    event after the timeout) change nothing."""
    prev = state.steps.get(body.step)
    if prev is not None and (prev.status != "waiting" or prev.name != body.reason):
        return {}
    if prev is None:
        # Resolved early, while the run is still on its way to the wait:
        # the journal answers when it gets there.
        early = StepState(body.step, body.reason, RESOLVED, state.attempt, t, t,
                          output=body.output, error=body.error)
        return {"steps": _with_step(state, early)}
    step = replace(prev, status="completed", ended_at=t, output=body.output, error=body.error)
    return _waits_changed(_won(state, step))


def _group_decided(steps: Mapping[int, StepState], group: int, step: int) -> bool:
    return any(s.group == group and s.step != step and s.status == "completed" for s in steps.values())


def _won(state: RunState, done: StepState) -> Mapping[int, StepState]:
    """Record a resolved wait; if it is a wait_for_any branch, the first to
    resolve, its still waiting siblings are lost (a late resolution of one
    of them then finds it not waiting and changes nothing)."""
    steps = dict(state.steps)
    steps[done.step] = done
    if done.group is not None:
        for s in state.steps.values():
            if s.group == done.group and s.step != done.step and s.status == "waiting":
                steps[s.step] = replace(s, status=LOST, ended_at=done.ended_at)
    return MappingProxyType(steps)


def _fold_terminal(state: RunState, event: Event) -> RunState:
    """After a run ended only dead-lettering, retriggering and logs apply."""
    body = event.body
    t = event.time
    changes: dict[str, Any]
    if isinstance(body, RunDeadLettered):
        changes = {"dead_lettered": True}
    elif isinstance(body, RunRetriggered) and state.status in (FAILED, CANCELLED):
        next_attempt = state.attempt + 1
        changes = {
            "status": PENDING,
            "payload": body.payload if body.payload is not None else state.payload,
            "attempt": next_attempt,
            "first_attempt": next_attempt,
            "dead_lettered": False,
            "error": None,
            "ended_at": None,
            "requests": state.requests + (event.event_id,),
        }
    elif isinstance(body, LogRecorded):
        changes = _log_changes(state, event, body)
    else:
        return state
    changes["updated_at"] = t
    if event.seq > state.seq:
        changes["seq"] = event.seq
    return _evolve(state, changes)


def _log_changes(state: RunState, event: Event, body: LogRecorded) -> dict[str, Any]:
    if len(state.logs) >= MAX_LOGS_PER_RUN:
        return {"logs_dropped": state.logs_dropped + 1}
    line = LogLine(event.time, body.level, body.message, body.attempt, body.step, body.fields)
    return {"logs": state.logs + (line,)}


class Packer(Protocol):
    """How a `RunTable` keeps runs packed (projections/packing.py)."""

    def pack(self, state: RunState) -> bytes: ...

    def unpack(self, run_id: str, data: bytes) -> RunState: ...

    def text(self, run_id: str, data: bytes) -> bytes:
        """The run's snapshot form (projections/snapshot.py) as JSON, without a RunState."""
        ...


class RunTable(MutableMapping[str, RunState]):
    """The runs of a partition by id, with suspended runs optionally packed.

    A mapping of RunStates to whoever reads it. Given a `packer`, a run
    stored while SUSPENDED (asleep, or waiting for an event or a child) is
    kept as the packer's bytes (a few hundred bytes against a couple of
    kilobytes of objects) and unpacked each time it is read: a suspended run
    is read when its timer fires or an event for it is folded, a handful of
    times. Without a packer (the default: clients, retention, replay) it is
    a plain dict.
    """

    __slots__ = ("whole", "packed", "packer")

    def __init__(self, packer: Packer | None = None) -> None:
        self.whole: dict[str, RunState] = {}
        self.packed: dict[str, bytes] = {}
        self.packer = packer

    def use(self, packer: Packer | None) -> None:
        """Pack with `packer` from now on; runs stored so far are repacked."""
        states = list(self.items())
        self.whole, self.packed, self.packer = {}, {}, packer
        for rid, st in states:
            self[rid] = st

    def get(self, run_id: str, default: RunState | None = None) -> RunState | None:  # type: ignore[override]  # no other defaults
        st = self.whole.get(run_id)
        if st is not None:
            return st
        if self.packed:
            data = self.packed.get(run_id)
            if data is not None:
                assert self.packer is not None
                return self.packer.unpack(run_id, data)
        return default

    def __getitem__(self, run_id: str) -> RunState:
        st = self.get(run_id)
        if st is None:
            raise KeyError(run_id)
        return st

    def __setitem__(self, run_id: str, state: RunState) -> None:
        if self.packer is not None and state.status == SUSPENDED:
            self.packed[run_id] = self.packer.pack(state)
            self.whole.pop(run_id, None)
        else:
            self.whole[run_id] = state
            if self.packed:
                self.packed.pop(run_id, None)

    def __delitem__(self, run_id: str) -> None:
        if self.whole.pop(run_id, None) is None and self.packed.pop(run_id, None) is None:
            raise KeyError(run_id)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self.whole or run_id in self.packed

    def __len__(self) -> int:
        return len(self.whole) + len(self.packed)

    def __iter__(self) -> Iterator[str]:
        yield from self.whole
        yield from self.packed

    def statuses(self) -> Iterator[str]:
        """Each run's status, without unpacking (a packed run is suspended)."""
        for st in self.whole.values():
            yield st.status
        for _ in range(len(self.packed)):
            yield SUSPENDED

    def __repr__(self) -> str:
        return f"RunTable({len(self.whole)} whole, {len(self.packed)} packed)"


@dataclass(slots=True)
class PartitionRuns:
    """Every run of one partition, fenced by the owner's epoch.

    Events written by a partition owner carry its epoch; once a newer owner
    has claimed the partition, events from older epochs are dropped, so a
    zombie worker cannot record a second outcome for a step. Client
    requests (trigger, cancel, retrigger) carry epoch 0 and are not fenced.
    """

    partition: int
    epoch: int = 0
    next_offset: int = 0
    runs: RunTable = field(default_factory=RunTable)
    fenced: int = 0
    # What is paused in this partition, by (scope, name): the PauseChanged
    # that paused it. A PauseChanged goes to every partition, and each
    # partition's fold follows its own copy, in order with its runs.
    paused: dict[tuple[str, str], PauseChanged] = field(default_factory=dict)
    # Ids of the PauseChanged events folded: "the last one wins" holds for
    # distinct changes, but a late copy of a pause would otherwise undo the
    # resume that followed it. Pauses are human actions: a handful.
    pause_events: set[str] = field(default_factory=set)
    # Compaction of ended runs (None: every run is kept whole, as retention
    # and the query side need). A run that ended for good (FINAL) is kept
    # whole until the fold is `keep_ended` offsets past its end, then only
    # its id stays, in `ended`: enough for a repeated trigger, a late copy of
    # any of its events, to change nothing. The window is in log offsets,
    # not time, so the fold stays a pure function of the log and a rebuild
    # compacts exactly what the live fold did (projections/catchup.py).
    # The ids take 16 bytes each (projections/ended.py).
    keep_ended: int | None = None
    ended: EndedIds = field(default_factory=EndedIds)
    # Runs ended for good and still whole: (offset of the end, run id), in log order.
    ending: deque[tuple[int, str]] = field(default_factory=deque)

    def apply(self, event: Event, offset: int | None = None) -> RunState | None:
        """Fold one event in; return the run's new state (None if not a run event)."""
        if offset is not None:
            self.next_offset = offset + 1
        body = event.body
        if isinstance(body, PartitionClaimed):
            if event.epoch > self.epoch:
                self.epoch = event.epoch
            return None
        if isinstance(body, PauseChanged):
            if event.event_id in self.pause_events:
                return None  # a copy of a change already folded
            self.pause_events.add(event.event_id)
            if body.paused:
                self.paused[(body.scope, body.name)] = body
            else:
                self.paused.pop((body.scope, body.name), None)
            return None
        if event.type not in REQUEST_TYPES and event.epoch < self.epoch:
            self.fenced += 1
            return None
        rid = event.run_id
        runs = self.runs
        old = runs.whole.get(rid)
        if old is None:
            old = runs.get(rid) if runs.packed else None
            # A run is held or compacted, never both: only an id not held is
            # looked up among the compacted ones.
            if old is None and rid in self.ended:
                return None  # ended for good and compacted: nothing can change it
            packed = old is not None
        else:
            packed = False
        new = fold_run(old, event)
        if new is not None:
            if new is old:
                pass  # a duplicate or a no-op: nothing to store (or to pack again)
            elif packed or (runs.packer is not None and new.status == SUSPENDED):
                runs[rid] = new  # into or out of the packed runs
            else:
                runs.whole[rid] = new
            if self.keep_ended is not None and new.status in FINAL and (old is None or old.status not in FINAL):
                self.ending.append((self.next_offset - 1, rid))
        if self.ending and self.keep_ended is not None:
            self.compact(self.next_offset - self.keep_ended)
        return new

    def compact(self, below: int) -> None:
        """Keep only the id of each run that ended for good below offset `below`."""
        ending, runs, ended = self.ending, self.runs, self.ended
        while ending and ending[0][0] < below:
            _, rid = ending.popleft()
            runs.pop(rid, None)
            ended.add(rid)

    def frozen(self) -> PartitionRuns:
        """A copy later folds leave alone, for a snapshot written in another
        thread. Cheap: the states and packed bytes are immutable and shared."""
        table = RunTable(self.runs.packer)
        table.whole, table.packed = self.runs.whole.copy(), self.runs.packed.copy()
        return PartitionRuns(self.partition, self.epoch, self.next_offset, table, self.fenced,
                             dict(self.paused), set(self.pause_events), self.keep_ended,
                             self.ended.copy(), deque(self.ending))

    def live_runs(self) -> Iterator[RunState]:
        return (r for r in self.runs.values() if r.status in LIVE)

    def run_counts(self) -> dict[str, int]:
        """How many runs are in each state (packed runs are not unpacked)."""
        counts: dict[str, int] = {}
        for status in self.runs.statuses():
            counts[status] = counts.get(status, 0) + 1
        return counts

    def is_paused(self, task_id: str, queue: str | None) -> bool:
        """Whether a run of this task on this queue may not start a new attempt now."""
        paused = self.paused
        return bool(paused) and ((PAUSE_TASK, task_id) in paused
                                or (queue is not None and (PAUSE_QUEUE, queue) in paused))


def fold_events(events: list[Event]) -> dict[str, RunState]:
    """Fold a list of events (one partition's, in log order) into run states."""
    part = PartitionRuns(partition=0)
    for e in events:
        part.apply(e)
    return part.runs.whole
