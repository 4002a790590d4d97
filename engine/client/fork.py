"""Forking a run: a new run whose history starts as a copy of another's.

`stepline fork RUN --at-step N` (also `Client.fork`, `POST
/v1/runs/{id}/fork`, and "Fork from here" in the dashboard) triggers a new
run of the same task whose journal positions 0..N-1 are the original's,
as recorded (optionally with edited outputs, and a new payload); position
N onwards runs live on whichever worker owns the new run.

The whole copy travels inside the new run's `RunTriggered` (schema v5:
`forked_from`, `forked_at_step`, `journal`, `patches`), one request like
any trigger: nothing reads the original's partition afterwards, so the
fork's state is a pure fold of its own events and survives rebuilds and
snapshots like any run. The fold turns the copied positions into
completed steps with attempt 0 (copied, never executed here); the first
attempt replays them from the journal, as after a retry.

What is copied: every done position (completed steps, resolved waits:
sleeps, events, tokens, children) before N, and the `patched()` answers
given before N. A position before N that the history holds but never
completed (a failed or running step, an open wait) refuses the fork: there
is no result to copy. A position with no record at all (a `create_token`
whose wait came later) is left empty and taken live again.
"""

from __future__ import annotations

from collections.abc import Mapping

from stepline.core.events import CopiedStep, Payload, RunTriggered
from stepline.errors import InvalidFork
from stepline.projections.runs import DONE_STEPS, RunState


def fork_trigger(
    state: RunState,
    at_step: int,
    *,
    payload: Payload | None = None,
    step_outputs: Mapping[int, Payload] | None = None,
    idempotency_key: str | None = None,
) -> RunTriggered:
    """The RunTriggered of a fork of `state` at `at_step`. Pure; raises InvalidFork.

    `payload` replaces the run's payload; `step_outputs` replaces the
    recorded outputs of positions before `at_step` (a wait's output is
    what it answers: the event data, the token data, the child's output).
    """
    if isinstance(at_step, bool) or not isinstance(at_step, int) or at_step < 0:
        raise InvalidFork(f"at_step must be a journal position (an integer >= 0), got {at_step!r}")
    recorded = sorted(state.steps)
    end = recorded[-1] + 1 if recorded else 0
    if at_step > end:
        have = f"positions 0 to {end - 1}" if end else "no journal positions yet"
        raise InvalidFork(f"run {state.run_id} has {have}: fork at a step from 0 to {end}")
    edits = dict(step_outputs or {})
    journal: list[CopiedStep] = []
    for pos in recorded:
        if pos >= at_step:
            break
        rec = state.steps[pos]
        if rec.status == "lost":
            # A wait_for_any branch another branch beat: it answers nothing,
            # and the winner (copied) decides the replay.
            continue
        if rec.status not in DONE_STEPS:
            raise InvalidFork(
                f"step {pos} ({rec.name}) of run {state.run_id} is {rec.status}, so it has no result "
                f"to copy: fork at step {pos} or earlier"
            )
        if pos in edits:
            journal.append(CopiedStep(pos, rec.name, rec.input, edits.pop(pos), None))
        else:
            journal.append(CopiedStep(pos, rec.name, rec.input, rec.output, rec.error))
    if edits:
        bad = sorted(edits)
        raise InvalidFork(
            f"cannot edit the output of step{'s' * (len(bad) > 1)} {', '.join(map(str, bad))}: a fork at "
            f"step {at_step} copies only completed steps before it"
            + (f" ({', '.join(str(c.step) for c in journal)})" if journal else " (none)")
        )
    return RunTriggered(
        payload if payload is not None else state.payload,
        idempotency_key,
        None,
        state.priority,
        state.tags,
        state.queue,
        state.concurrency_key,
        # Not a child of the original's parent: the parent waits for the original only.
        None,
        None,
        None,
        forked_from=state.run_id,
        forked_at_step=at_step,
        journal=tuple(journal),
        patches=tuple(p for p in state.patches if p.step < at_step),
    )


def copied_bytes(body: RunTriggered) -> int:
    """Bytes of user data a fork's trigger carries (payload, copied inputs and outputs)."""
    size = len(body.payload.data)
    for c in body.journal:
        size += sum(len(p.data) for p in (c.input, c.output) if p is not None)
    return size


__all__ = ["copied_bytes", "fork_trigger"]
