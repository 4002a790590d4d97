"""Two runs side by side, step by step: `stepline diff`, the API's and the dashboard's diff.

Steps are matched by journal position, the key a replay matches them by:
position 3 of a fork is position 3 of its original. Each pair says which of
name, input, output, error and status differ; durations and attempts are
shown, never counted as a difference (two good runs rarely take the same
time). The first divergence is the lowest position whose name, input,
output, error or status differ, or the payload when it differs (a change of
input before any step): where to start reading when yesterday's run worked
and today's did not, or to see what a fork changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stepline.core.payloads import payload_json
from stepline.projections.runs import RunState, StepState

# What makes two steps differ, in the order a reader cares about.
COMPARED = ("name", "input", "output", "error", "status")


@dataclass(frozen=True, slots=True)
class StepPair:
    step: int
    a: dict[str, Any] | None  # None: the run has no step at this position
    b: dict[str, Any] | None
    differs: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "a": self.a, "b": self.b, "differs": list(self.differs)}


@dataclass(frozen=True, slots=True)
class RunDiff:
    a: dict[str, Any]
    b: dict[str, Any]
    run_differs: tuple[str, ...]  # payload, task_id, task_version, status, output, error
    steps: tuple[StepPair, ...]
    first_divergence: str | int | None  # "payload", "task_id", a step position, or None

    @property
    def same(self) -> bool:
        return not self.run_differs and all(not p.differs for p in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "same": self.same, "run_differs": list(self.run_differs),
            "first_divergence": self.first_divergence, "steps": [p.to_dict() for p in self.steps],
        }


def _error(error: Any) -> str | None:
    return None if error is None else f"{error.type}: {error.message}"


def _step(st: StepState) -> dict[str, Any]:
    duration = None if st.started_at is None or st.ended_at is None else st.ended_at - st.started_at
    return {
        "name": st.name, "status": st.status, "attempt": st.attempt, "duration_ms": duration,
        "input": payload_json(st.input), "output": payload_json(st.output), "error": _error(st.error),
    }


def _run(s: RunState) -> dict[str, Any]:
    duration = None if s.started_at is None or s.ended_at is None else s.ended_at - s.started_at
    return {
        "run_id": s.run_id, "task_id": s.task_id, "task_version": s.task_version, "status": s.status,
        "attempt": s.attempt_in_trigger, "created_at": s.created_at, "duration_ms": duration,
        "payload": payload_json(s.payload), "output": payload_json(s.output), "error": _error(s.error),
        "forked_from": s.forked_from, "forked_at_step": s.forked_at_step,
    }


def diff_runs(a: RunState, b: RunState) -> RunDiff:
    ra, rb = _run(a), _run(b)
    run_differs = tuple(k for k in ("task_id", "payload", "task_version", "status", "output", "error")
                        if ra[k] != rb[k])
    pairs = []
    for pos in sorted(set(a.steps) | set(b.steps)):
        sa = _step(a.steps[pos]) if pos in a.steps else None
        sb = _step(b.steps[pos]) if pos in b.steps else None
        if sa is None or sb is None:
            differs: tuple[str, ...] = ("missing",)
        else:
            differs = tuple(k for k in COMPARED if sa[k] != sb[k])
        pairs.append(StepPair(pos, sa, sb, differs))
    first: str | int | None = next((k for k in ("task_id", "payload") if k in run_differs), None)
    if first is None:
        first = next((p.step for p in pairs if p.differs), None)
    if first is None and run_differs:
        # Same steps, different end: the body after its last step (or the version) differs.
        first = run_differs[0]
    return RunDiff(ra, rb, run_differs, tuple(pairs), first)
