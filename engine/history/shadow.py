"""Shadow runs: recorded runs re-executed against new code, and the diff.

`stepline shadow RUN --module NEW_CODE` answers "what would this code have
done with that run?" before the code ships. The run's task, loaded from
NEW_CODE (engine/history/shadow_code.py), executes with every journal position
answered from the recorded history, and nothing reaches the log or the
outside world through steps:

1. Each step, sleep and wait asks the context for its position. A position
   the history completed answers with the recorded output; the step body
   never runs. The step's arguments are compared with the recorded input
   (except at a fork's copied positions, whose inputs are the original
   run's).
2. A position the history does not have (new code calls a step the old
   code never reached), or holds under another name, is not executed: the
   shadow stops there and reports the divergence. A position the history
   holds but never completed (the run failed or waits there) ends the
   shadow without a verdict on what follows: the history says no more.
3. `emit` goes to memory and no client is current, so `trigger` and
   `publish` in the task body fail rather than append.

Code in the task body outside steps does run, as on every replay.

The result lists every position side by side (recorded name, input and
output; shadow name and input) with a verdict, the run's output recorded
and recomputed, and the task version recorded on the run's last attempt
beside the new code's. A version change alone is not a divergence: it is
what the shadow is there to check.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from stepline.client import Client
from stepline.core.ids import TOKEN
from stepline.core.payloads import describe_args, payload_json
from stepline.errors import KeyStoreError, PayloadValidationError
from stepline.history._sandbox import Stop, run_sandboxed, sandbox_context
from stepline.projections.runs import COMPLETED, DONE_STEPS, FAILED, RunState, StepState
from stepline.sdk.context import RunContext
from stepline.sdk.task import Registry, Task
from stepline.security.keystore import KeyStore
from stepline.security.sensitive import ERASED, Scrubber, unseal

# Verdicts of one position.
SAME = "same"
INPUT_CHANGED = "input-changed"  # same step, other arguments: the recorded output is served anyway
NAME_CHANGED = "name-changed"  # the code reached another step here: not executed, the shadow stops
NEW_STEP = "new-step"  # the code reached a position the ended history never had: not executed
MISSING_STEP = "missing-step"  # the history completed a position the code never reached
OPEN = "open"  # the history holds the position but never completed it: the shadow ends there
# A position past the end of a history the code did not end (a live run, a
# cancelled or expired one): the original has not got there either.
BEYOND = "beyond-history"
UNRECORDED = "unrecorded"  # a create_token position, which records nothing until its wait

DIVERGING = frozenset({INPUT_CHANGED, NAME_CHANGED, NEW_STEP, MISSING_STEP})

# Run-level divergences, beside the positions'.
OUTPUT_CHANGED = "output-changed"
RAISED = "raised"
TASK_MISSING = "task-missing"
PAYLOAD_INVALID = "payload-invalid"
TIMEOUT = "timeout"

DEFAULT_TIMEOUT = 30.0

ENDED_BY_CODE = frozenset({COMPLETED, FAILED})


@dataclass(frozen=True, slots=True)
class StepDiff:
    """One journal position, as recorded and as the new code reached it."""

    step: int
    verdict: str
    recorded_name: str | None = None
    recorded_status: str | None = None
    recorded_input: Any = None
    output: Any = None  # the recorded output, which the shadow was served
    shadow_name: str | None = None
    shadow_input: Any = None

    @property
    def diverged(self) -> bool:
        return self.verdict in DIVERGING

    def describe(self) -> str:
        """One line for the first divergence of a run."""
        if self.verdict == INPUT_CHANGED:
            return (f"step {self.step} ({self.recorded_name}) is called with {json.dumps(self.shadow_input)} "
                    f"where the history recorded {json.dumps(self.recorded_input)}")
        if self.verdict == NAME_CHANGED:
            return (f"step {self.step} is {self.shadow_name!r} in the new code but {self.recorded_name!r} "
                    f"in the history")
        if self.verdict == NEW_STEP:
            return f"the new code reaches step {self.step} ({self.shadow_name}), which the history never ran"
        if self.verdict == MISSING_STEP:
            return f"the new code never reaches step {self.step} ({self.recorded_name}), which the history completed"
        return f"step {self.step}: {self.verdict}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class ShadowResult:
    """One run shadowed: its positions side by side, its outcome, its versions."""

    run_id: str
    task_id: str
    status: str  # the run's status on the log
    steps: list[StepDiff] = field(default_factory=list)
    recorded_version: str | None = None  # of the run's latest attempt
    shadow_version: str | None = None
    recorded_output: Any = None
    shadow_output: Any = None
    problem: str | None = None  # a run-level divergence kind (OUTPUT_CHANGED, RAISED, ...)
    message: str | None = None  # what the problem is, for humans

    @property
    def diverged(self) -> bool:
        return self.problem is not None or any(s.diverged for s in self.steps)

    @property
    def version_changed(self) -> bool:
        return self.recorded_version != self.shadow_version

    def first_divergence(self) -> dict[str, Any] | None:
        """The earliest position that diverged, else the run-level problem."""
        for s in self.steps:
            if s.diverged:
                return {"step": s.step, "kind": s.verdict, "message": s.describe()}
        if self.problem is not None:
            return {"step": None, "kind": self.problem, "message": self.message}
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "task_id": self.task_id, "status": self.status,
            "diverged": self.diverged, "first_divergence": self.first_divergence(),
            "versions": {"recorded": self.recorded_version, "shadow": self.shadow_version,
                         "changed": self.version_changed},
            "output": {"recorded": self.recorded_output, "shadow": self.shadow_output},
            "problem": self.problem, "message": self.message,
            "steps": [s.to_dict() for s in self.steps],
        }


def _same(value: Any) -> Any:
    return value


class _ShadowContext(RunContext):
    """Answers every position from the journal and notes what the code asked."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reached: dict[int, tuple[str, Any]] = {}  # position -> (name, input JSON)
        self.stopped: StepDiff | None = None  # where the shadow stopped, and why
        # The history ends where the code ended the run (completed, failed):
        # a position past it is new behaviour. Otherwise it is just unfinished.
        self.open_history = False
        self._args: tuple[str, Any] | None = None
        self.scrub: Callable[[Any], Any] = _same

    def observe_step(self, name: str, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        self._args = (name, self.scrub(payload_json(describe_args(args, kwargs))))

    def next_position(self, name: str) -> tuple[int, StepState | None]:
        if self.stopped is not None:
            raise Stop  # a parallel branch went past where another stopped
        pos = self._next
        self._next += 1
        shown = self._args[1] if self._args is not None and self._args[0] == name else None
        self._args = None
        self.reached[pos] = (name, shown)
        rec = self.journal.get(pos)
        if rec is None:
            if name == TOKEN:
                return pos, None  # create_token records nothing; its wait reads the journal itself
            self.stopped = StepDiff(pos, BEYOND if self.open_history else NEW_STEP, shadow_name=name,
                                    shadow_input=shown)
            raise Stop
        if rec.name != name:
            self.stopped = StepDiff(pos, NAME_CHANGED, rec.name, rec.status, payload_json(rec.input),
                                    payload_json(rec.output), name, shown)
            raise Stop
        if rec.status not in DONE_STEPS:
            self.stopped = StepDiff(pos, OPEN, rec.name, rec.status, payload_json(rec.input), None, name, shown)
            raise Stop
        return pos, rec


def _context(state: RunState) -> _ShadowContext:
    ctx = sandbox_context(_ShadowContext, state)  # emits into nothing: a shadow records no event anywhere
    ctx.open_history = state.status not in ENDED_BY_CODE
    return ctx


async def shadow_run(task: Task[Any, Any] | None, state: RunState,
                     timeout: float | None = DEFAULT_TIMEOUT, keys: KeyStore | None = None) -> ShadowResult:
    """Re-execute one recorded run through `task` (the new code) and diff it.

    Sensitive payload fields are decrypted with `keys` (engine/security/sensitive.py);
    a forgotten subject's read as "[erased]", and then only the journal is
    judged: the output may rightly differ once the values are gone.
    """
    result = ShadowResult(state.run_id, state.task_id, state.status, recorded_version=state.task_version,
                          recorded_output=payload_json(state.output) if state.status == COMPLETED else None)
    if task is None:
        result.problem, result.message = TASK_MISSING, f"task {state.task_id!r} is not declared by the new code"
        result.steps = _recorded_only(state)
        return result
    result.shadow_version = task.version
    erased = False
    scrub: Callable[[Any], Any] = _same
    try:
        recorded = state.payload
        if task.sensitive is not None:
            recorded, values, erased = await unseal(task.sensitive, state.payload, keys,
                                                    f"shadow of run {state.run_id}", erased_as=ERASED)
            # The worker recorded inputs and outputs with these values cut out: so are the shadow's.
            # An erased value reaches the code as "[erased]"; the history had it cut out.
            scrubber = Scrubber([*values, ERASED] if erased else values)
            if scrubber:
                scrub = scrubber.value
        payload = task.payload_codec.load(recorded, f"payload of run {state.run_id}")
    except (PayloadValidationError, KeyStoreError) as exc:
        if not erased:
            result.problem, result.message = PAYLOAD_INVALID, str(exc)
        result.steps = _recorded_only(state)
        return result
    ctx = _context(state)
    ctx.scrub = scrub
    end = await run_sandboxed(task, payload, ctx, timeout)
    if end.suspended is not None and ctx.stopped is None:
        # wait_for_token on a token position with no record: the history waits there.
        wait = end.suspended.waits[0]
        ctx.stopped = StepDiff(wait.step, BEYOND if ctx.open_history else NEW_STEP, shadow_name=wait.reason)
    if end.expired and ctx.stopped is None:
        result.problem = TIMEOUT
        result.message = f"the shadow did not finish within {timeout:g} s: the task awaits something outside its steps"
    result.steps = _diff(state, ctx)
    if result.problem is None and ctx.stopped is None and not erased:
        _judge_end(task, state, result, end.raised, scrub(_output(task, state, end.returned)))
    return result


def _judge_end(task: Task[Any, Any], state: RunState, result: ShadowResult,
               raised: BaseException | None, output: Any) -> None:
    """The run-level verdict of a shadow that ran to its end; `output` is
    what the code returned, as JSON, scrubbed like the recorded one."""
    if raised is not None:
        if state.status == COMPLETED:
            result.problem = RAISED
            result.message = f"the new code raises {type(raised).__qualname__}: {raised} where the history completed"
        return  # the history ended in a failure too, or has not ended: nothing it contradicts
    if state.status == FAILED:
        result.problem = OUTPUT_CHANGED
        result.message = "the new code completes the run, which failed in the history"
        result.shadow_output = output
        return
    if state.status != COMPLETED:
        return  # cancelled, expired or still live: the code never ended it
    result.shadow_output = output
    if result.shadow_output != result.recorded_output:
        result.problem = OUTPUT_CHANGED
        result.message = (f"the new code returns {json.dumps(result.shadow_output)} where the history completed "
                          f"with {json.dumps(result.recorded_output)}")


def _output(task: Task[Any, Any], state: RunState, returned: Any) -> Any:
    try:
        return payload_json(task.output_codec.dump(returned, f"output of run {state.run_id}"))
    except PayloadValidationError as exc:
        return {"error": str(exc)}


def _diff(state: RunState, ctx: _ShadowContext) -> list[StepDiff]:
    """Every position either side reached, in order, with its verdict."""
    out: list[StepDiff] = []
    stop = ctx.stopped
    for pos in sorted(set(state.steps) | set(ctx.reached)):
        if stop is not None and pos == stop.step:
            out.append(stop)
            continue
        rec = state.steps.get(pos)
        got = ctx.reached.get(pos)
        if rec is None:
            if got is not None:  # a create_token position
                out.append(StepDiff(pos, UNRECORDED, shadow_name=got[0]))
            continue
        recorded = (rec.name, rec.status, payload_json(rec.input), payload_json(rec.output))
        if got is None:
            if stop is not None and pos > stop.step:
                continue  # the shadow stopped before: no verdict on what follows
            verdict = MISSING_STEP if rec.status in DONE_STEPS else OPEN
            out.append(StepDiff(pos, verdict, *recorded))
            continue
        name, shown = got
        # Inputs are compared when both sides have them: a history written
        # before inputs were recorded, or a wait (no arguments), has none.
        # Nor are a fork's copied positions (attempt 0): they keep the
        # inputs of the run they were copied from, which the fork's payload
        # or edited outputs change without any change of code.
        copied = state.forked_from is not None and rec.attempt == 0
        changed = not copied and rec.input is not None and shown is not None and recorded[2] != shown
        out.append(StepDiff(pos, INPUT_CHANGED if changed else SAME, *recorded, name, shown))
    return out


def _recorded_only(state: RunState) -> list[StepDiff]:
    return [StepDiff(pos, OPEN if rec.status not in DONE_STEPS else SAME, rec.name, rec.status,
                     payload_json(rec.input), payload_json(rec.output))
            for pos, rec in sorted(state.steps.items())]


# --- many runs ---------------------------------------------------------------


@dataclass(slots=True)
class ShadowSummary:
    """Every recent run of a task shadowed: which would diverge, and where first."""

    task_id: str
    since: int  # ms: runs created at or after this
    results: list[ShadowResult] = field(default_factory=list)

    @property
    def diverged(self) -> list[ShadowResult]:
        return [r for r in self.results if r.diverged]

    def counts(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for r in self.diverged:
            first = r.first_divergence()
            if first is not None:
                kinds[first["kind"]] = kinds.get(first["kind"], 0) + 1
        return {"checked": len(self.results), "same": len(self.results) - len(self.diverged),
                "diverged": len(self.diverged),
                "version_changed": sum(1 for r in self.results if r.version_changed), **kinds}

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id, "since": self.since, "counts": self.counts(),
            "runs": [{"run_id": r.run_id, "status": r.status, "diverged": r.diverged,
                      "recorded_version": r.recorded_version, "shadow_version": r.shadow_version,
                      "first_divergence": r.first_divergence()} for r in self.results],
        }


async def shadow_task(
    client: Client,
    registry: Registry,
    task_id: str,
    since: int,
    *,
    timeout: float | None = DEFAULT_TIMEOUT,
    progress: Callable[[int, int], None] | None = None,
) -> ShadowSummary:
    """Shadow every run of `task_id` created at or after `since` (ms), oldest first."""
    states = [s for s in await client.list_runs() if s.task_id == task_id and s.created_at >= since]
    states.sort(key=lambda s: (s.created_at, s.run_id))
    summary = ShadowSummary(task_id, since)
    task = registry.find(task_id)
    for done, state in enumerate(states, 1):
        summary.results.append(await shadow_run(task, state, timeout, client.keys))
        if progress is not None:
            progress(done, len(states))
    return summary


async def shadow_runs(client: Client, registry: Registry, run_ids: Sequence[str],
                      timeout: float | None = DEFAULT_TIMEOUT) -> list[ShadowResult]:
    """Shadow the given runs (UnknownRun for one not on the log)."""
    out = []
    for run_id in dict.fromkeys(run_ids):
        state = await client.get_run(run_id)
        out.append(await shadow_run(registry.find(state.task_id), state, timeout, client.keys))
    return out


__all__ = [
    "BEYOND",
    "DIVERGING",
    "INPUT_CHANGED",
    "MISSING_STEP",
    "NAME_CHANGED",
    "NEW_STEP",
    "OPEN",
    "OUTPUT_CHANGED",
    "PAYLOAD_INVALID",
    "RAISED",
    "SAME",
    "TASK_MISSING",
    "TIMEOUT",
    "UNRECORDED",
    "ShadowResult",
    "ShadowSummary",
    "StepDiff",
    "shadow_run",
    "shadow_runs",
    "shadow_task",
]
