"""Replaying recorded runs: a run's state at a past point, and today's code
checked against yesterday's histories.

`state_at` folds a run's events up to a log offset or a time, for
`stepline runs show RUN --as-of ...`.

`check_runs` is Temporal-style replay checking: before deploying changed
task code, re-execute it against every recorded run's journal and report
where it no longer matches. A replay has no side effects on the log or the
outside world through steps:

1. The run context's journal is the run's folded steps, so a position the
   history completed answers from the journal (the step wrapper returns the
   recorded output, a sleep or wait returns what resolved it) without running.
2. The first position without a completed record (the run failed there, is
   still in flight, or waits there) ends the replay. `next_position` raises
   a private BaseException before the step wrapper records StepStarted, so a
   step the history never completed does not run. `except Exception` in the
   task cannot swallow it.
3. `emit` records into memory, never onto the log, and no client is current,
   so a `trigger` or `publish` in the task body fails instead of appending.

Code in the task body outside steps does run, as it does on every real
replay after a retry or a sleep.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from stepline.client import Client
from stepline.core.events import Body, Event
from stepline.core.ids import TOKEN
from stepline.core.payloads import payload_json
from stepline.errors import KeyStoreError, NonDeterminismError, PayloadValidationError
from stepline.history._sandbox import Stop, run_sandboxed, sandbox_context
from stepline.log.topics import Topics
from stepline.projections.runs import COMPLETED, DONE_STEPS, PartitionRuns, RunState, StepState
from stepline.sdk.context import RunContext
from stepline.sdk.sealing import open_for_replay
from stepline.sdk.task import Registry, Task
from stepline.security.keystore import KeyStore

# --- a run's state at a point in its history ------------------------------

_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)(ms|s|m|h|d|w)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


@dataclass(frozen=True, slots=True)
class Point:
    """A point in a run's history: a log offset (inclusive) or a time in ms."""

    text: str
    offset: int | None = None
    time: int | None = None


def not_a_point(text: str, name: str = "--as-of") -> str:
    return (f"{name} {text!r} is neither a log offset (e.g. 1234), an ISO-8601 time "
            f"(e.g. 2025-01-31T12:00:00.250Z) nor a relative time (e.g. -5m, -90s, -2h)")


def parse_point(text: str, now: int, *, name: str = "--as-of") -> Point:
    """`1234` is an offset; `-5m`, `-90s`, `-2h`, `-1d` are relative to `now`
    (ms); anything else must be an ISO-8601 time, read as UTC when it names
    no zone (the CLI shows every time in UTC). `name` is the option or
    parameter the error message names."""
    value = text.strip()
    if value.isdigit():
        return Point(text, offset=int(value))
    rel = _RELATIVE.match(value)
    if rel is not None:
        return Point(text, time=now - int(float(rel.group(1)) * _UNIT_MS[rel.group(2)]))
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(not_a_point(text, name)) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return Point(text, time=(when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1))


def iso_ms(ms: int) -> str:
    """`2025-01-31T12:00:00.250Z`: an event time as ISO-8601, UTC, to the millisecond."""
    at = datetime.fromtimestamp(ms // 1000, tz=UTC).replace(microsecond=ms % 1000 * 1000)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class StateAt:
    """A run's state folded from its first `events` events (of `total`)."""

    state: RunState
    offset: int  # of the last event folded
    time: int
    type: str
    events: int
    total: int

    def header(self) -> dict[str, Any]:
        return {"offset": self.offset, "time": self.time, "iso_time": iso_ms(self.time), "event": self.type,
                "events": self.events, "of": self.total}


def state_at(run_id: str, events: Sequence[tuple[int, Event]], point: Point) -> StateAt:
    """The run as it stood at `point`: its events (in log order) folded up to
    the offset, inclusive, or up to the first event later than the time.

    Raises ValueError when the run did not exist yet at that point.
    """
    if not events:
        raise ValueError(f"run {run_id} has no events on this log")
    # The same fold as `runs show`, over a prefix of the same events.
    part = PartitionRuns(0)
    folded = 0
    for off, ev in events:
        if not reached(off, ev, point):
            break
        part.apply(ev, off)
        folded += 1
    state = part.runs.get(run_id)
    if state is None:
        first_off, first = events[0]
        where = f"offset {point.offset}" if point.offset is not None else iso_ms(point.time or 0)
        raise ValueError(
            f"run {run_id} did not exist yet as of {where}: its first event is at offset "
            f"{first_off} ({iso_ms(first.time)})"
        )
    last_off, last = events[folded - 1]
    return StateAt(state, last_off, last.time, last.type, folded, len(events))


def reached(off: int, ev: Event, point: Point) -> bool:
    """Whether the event at offset `off` lies at or before `point`."""
    if point.offset is not None:
        return off <= point.offset
    return point.time is None or ev.time <= point.time


def events_between(events: Sequence[tuple[int, Event]], after: Point | None,
                   upto: Point | None) -> list[tuple[int, Event]]:
    """The events after `after` (exclusive) up to `upto` (inclusive): what
    turned the state at `after` into the state at `upto`. None: the history's
    start, or its end."""
    return [(off, ev) for off, ev in events
            if (after is None or not reached(off, ev, after)) and (upto is None or reached(off, ev, upto))]


# --- checking code against recorded runs ----------------------------------

NON_DETERMINISTIC = "non-deterministic"
TASK_MISSING = "task-missing"
PAYLOAD_INVALID = "payload-invalid"
DIVERGENCE = "divergence"

# Seconds one run's replay may take: every recorded step answers at once, so
# only code awaiting something outside the journal gets near this.
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class ReplayProblem:
    """One run the current code does not replay cleanly."""

    run_id: str
    task_id: str
    kind: str  # NON_DETERMINISTIC | TASK_MISSING | PAYLOAD_INVALID | DIVERGENCE
    message: str  # one line, for humans
    status: str  # the run's status on the log (a live run breaks on deploy)
    position: int | None = None  # journal position where it went wrong
    expected: str | None = None  # step name the history recorded at `position`
    got: str | None = None  # step name the code reached there; None: the code ended first
    error: str | None = None  # "Type: message" of what the code raised
    recorded_output: Any = None  # a completed run's output, as JSON
    replayed_output: Any = None  # what the code returned instead, as JSON

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class ReplayReport:
    checked: int = 0  # runs replayed (or found unreplayable)
    ok: int = 0
    problems: list[ReplayProblem] = field(default_factory=list)
    # Runs of tasks this registry does not declare, left out when no run or
    # task ids were asked for (another module's tasks, most likely).
    skipped: int = 0

    @property
    def passed(self) -> bool:
        return not self.problems

    def totals(self) -> dict[str, int]:
        counts = {NON_DETERMINISTIC: 0, TASK_MISSING: 0, PAYLOAD_INVALID: 0, DIVERGENCE: 0}
        for p in self.problems:
            counts[p.kind] = counts.get(p.kind, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "ok": self.ok, "skipped": self.skipped,
                "totals": self.totals(), "problems": [p.to_dict() for p in self.problems]}


class _ReplayContext(RunContext):
    """A RunContext that answers from the journal and never runs anything new.

    Overrides only `next_position`, which every step, sleep and wait calls
    before doing anything: the place to stop a replay at the end of history.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reached = 0  # positions the code has taken
        self.stopped_at: int | None = None
        # Kept even if the task's `except Exception` swallows it.
        self.nondeterminism: NonDeterminismError | None = None
        self.emitted: list[Body] = []  # what the code recorded; stays in memory

    def next_position(self, name: str) -> tuple[int, StepState | None]:
        if self.stopped_at is not None:
            raise Stop(self.stopped_at)  # a parallel branch went past the end
        try:
            pos, rec = super().next_position(name)
        except NonDeterminismError as exc:
            if self.nondeterminism is None:
                self.nondeterminism = exc
            raise
        self.reached = pos + 1
        # create_token only names its position; the wait for it reads the
        # journal itself (and, with nothing there, suspends: also an end).
        if name != TOKEN and (rec is None or rec.status not in DONE_STEPS):
            self.stopped_at = pos
            raise Stop(pos)
        return pos, rec


def _replay_context(state: RunState) -> _ReplayContext:
    emitted: list[Body] = []
    ctx = sandbox_context(_ReplayContext, state, emitted)
    ctx.emitted = emitted
    return ctx


def _problem(state: RunState, kind: str, message: str, **details: Any) -> ReplayProblem:
    return ReplayProblem(state.run_id, state.task_id, kind, message, state.status, **details)




def _completed_after(state: RunState, reached: int) -> StepState | None:
    """The first position at or after `reached` that the history completed."""
    later = [s for pos, s in state.steps.items() if pos >= reached and s.status in DONE_STEPS]
    return min(later, key=lambda s: s.step) if later else None


async def check_run(task: Task[Any, Any] | None, state: RunState,
                    timeout: float | None = DEFAULT_TIMEOUT, keys: KeyStore | None = None) -> ReplayProblem | None:
    """Replay one run's recorded journal through `task`'s current code; None when it matches.

    Sensitive fields are decrypted with `keys`; a forgotten subject's read
    as "[erased]", and then only the journal is checked: the code's output
    or errors may rightly differ once the values are gone.
    """
    if task is None:
        return _problem(state, TASK_MISSING, f"task {state.task_id!r} is not declared by this app")
    erased = False
    try:
        recorded, erased = await open_for_replay(task, state.payload, keys)
        payload = task.payload_codec.load(recorded, f"payload of run {state.run_id}")
    except PayloadValidationError as exc:
        if erased:
            return None  # an erased field's type refuses the text "[erased]": nothing left to check
        return _problem(state, PAYLOAD_INVALID, str(exc), error=f"{type(exc).__name__}: {exc}")
    except KeyStoreError as exc:
        return _problem(state, PAYLOAD_INVALID, str(exc), error=f"{type(exc).__name__}: {exc}")
    ctx = _replay_context(state)
    # A stop leaves ctx.stopped_at saying where.
    end = await run_sandboxed(task, payload, ctx, timeout)
    if end.suspended is not None:
        # A wait_for_token whose token position has no record yet.
        ctx.stopped_at = end.suspended.waits[0].step if ctx.stopped_at is None else ctx.stopped_at
    if end.expired and ctx.nondeterminism is None and ctx.stopped_at is None:
        return _problem(state, DIVERGENCE, f"replay did not finish within {timeout:g} s: the task "
                        f"awaits something outside its steps", position=ctx.reached)
    problem = _judge(task, state, ctx, end.raised, end.returned)
    if erased and problem is not None and problem.kind == DIVERGENCE and problem.expected is None:
        return None  # the output or an error came from the erased values; the journal matched
    return problem


def _judge(task: Task[Any, Any], state: RunState, ctx: _ReplayContext,
           raised: Exception | None, result: Any) -> ReplayProblem | None:
    nd = ctx.nondeterminism
    if nd is not None:
        return _problem(state, NON_DETERMINISTIC, str(nd), position=nd.step, expected=nd.expected, got=nd.got)
    if ctx.stopped_at is not None:
        return None  # matched as far as the history goes
    if isinstance(raised, PayloadValidationError):
        return _problem(state, PAYLOAD_INVALID, str(raised), position=ctx.reached,
                        error=f"{type(raised).__name__}: {raised}")
    later = _completed_after(state, ctx.reached)
    if raised is not None:
        error = f"{type(raised).__qualname__}: {raised}"
        if later is not None:
            return _problem(state, DIVERGENCE, f"the code raised {error} before position {later.step}, "
                            f"which the history completed as {later.name!r}",
                            position=later.step, expected=later.name, error=error)
        if state.status == COMPLETED:
            return _problem(state, DIVERGENCE, f"the code raised {error} where the history completed "
                            f"the run", position=ctx.reached, error=error,
                            recorded_output=payload_json(state.output))
        return None  # the history ends where the code fails: nothing to contradict
    if later is not None:
        return _problem(state, NON_DETERMINISTIC, f"the code returned before position {later.step}, which "
                        f"the history completed as {later.name!r}", position=later.step, expected=later.name)
    if state.status != COMPLETED:
        return None
    try:
        replayed = payload_json(task.output_codec.dump(result, f"output of run {state.run_id}"))
    except PayloadValidationError as exc:
        return _problem(state, PAYLOAD_INVALID, str(exc), error=f"{type(exc).__name__}: {exc}")
    recorded = payload_json(state.output)
    if replayed != recorded:
        return _problem(state, DIVERGENCE, f"the code returns {json.dumps(replayed)} where the history "
                        f"completed with {json.dumps(recorded)}",
                        recorded_output=recorded, replayed_output=replayed)
    return None


async def check_runs(
    log_url: str,
    registry: Registry,
    *,
    run_ids: Sequence[str] | None = None,
    task_ids: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    namespace: str = "stepline",
    timeout: float | None = DEFAULT_TIMEOUT,
) -> ReplayReport:
    """Replay recorded runs through the registry's current code.

    Which runs: the given `run_ids` (UnknownRun for one not on the log), else
    every run of the given `task_ids`, else every run of a task the registry
    declares. A run whose task the registry lacks is a TASK_MISSING problem
    when asked for by run or task id, and counted in `skipped` otherwise.
    Runs are replayed one at a time, oldest first; `progress(done, total)`
    follows them. `timeout` bounds each run's replay (seconds).
    """
    async with Client(log_url, topics=Topics(namespace=namespace)) as client:
        if run_ids is not None:
            states = [await client.get_run(rid) for rid in dict.fromkeys(run_ids)]
        else:
            states = await client.list_runs()
        keys = client.keys
    report = ReplayReport()
    if run_ids is None:
        wanted = set(task_ids) if task_ids is not None else None
        chosen = [s for s in states if (s.task_id in wanted if wanted is not None else s.task_id in registry)]
        report.skipped = len(states) - len(chosen) if wanted is None else 0
        states = sorted(chosen, key=lambda s: (s.created_at, s.run_id))
    for done, state in enumerate(states, 1):
        problem = await check_run(registry.find(state.task_id), state, timeout, keys)
        report.checked += 1
        if problem is None:
            report.ok += 1
        else:
            report.problems.append(problem)
        if progress is not None:
            progress(done, len(states))
    return report


__all__ = [
    "DIVERGENCE",
    "NON_DETERMINISTIC",
    "PAYLOAD_INVALID",
    "TASK_MISSING",
    "Point",
    "ReplayProblem",
    "ReplayReport",
    "StateAt",
    "check_run",
    "check_runs",
    "events_between",
    "iso_ms",
    "not_a_point",
    "parse_point",
    "reached",
    "state_at",
]
