"""Run state is a pure fold: the same events always give the same state.

No I/O, no broker: every test builds a run's history by hand and folds it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stepline.core.events import (
    JSON,
    REQUEST_TYPES,
    Body,
    ErrorInfo,
    Event,
    LogRecorded,
    PartitionClaimed,
    Payload,
    RetryScheduled,
    RunCancelled,
    RunCompleted,
    RunDeadLettered,
    RunFailed,
    RunResumed,
    RunRetriggered,
    RunStarted,
    RunSuspended,
    RunTriggered,
    StepCompleted,
    StepFailed,
    StepStarted,
)
from stepline.projections.query_sql import SUMMARY_COLUMNS, run_values
from stepline.projections.runs import (
    CANCELLED,
    COMPLETED,
    FAILED,
    MAX_LOGS_PER_RUN,
    PENDING,
    RETRYING,
    RUNNING,
    SUSPENDED,
    PartitionRuns,
    RunState,
    fold_run,
)
from stepline.projections.views import state_dict

RUN_ID = "run_01HZZZZZZZZZZZZZZZZZZZZZZZ"
TASK_ID = "process-order"
T0 = 1_700_000_000_000  # ms since the epoch; each event is TICK ms after the last
TICK = 10
WORKER = "worker-a"


def payload(value: str) -> Payload:
    return Payload(JSON, f'"{value}"'.encode())


def boom(message: str = "boom", type_: str = "ValueError") -> ErrorInfo:
    return ErrorInfo(type_, message, "Traceback ...")


class History:
    """The events of one run, written the way the log would hold them.

    `seq` and `time` increase by one step per event. Client requests
    (trigger, cancel, retrigger) carry epoch 0, as the client writes them;
    everything else carries the owner's epoch.
    """

    def __init__(self, run_id: str = RUN_ID, task_id: str = TASK_ID, epoch: int = 1) -> None:
        self.run_id = run_id
        self.task_id = task_id
        self.epoch = epoch
        self.events: list[Event] = []

    def event(self, body: Body, *, epoch: int | None = None) -> Event:
        n = len(self.events) + 1
        if epoch is None:
            epoch = 0 if body.TYPE in REQUEST_TYPES else self.epoch
        return Event(f"ev-{n}", body.TYPE, self.run_id, self.task_id, n, T0 + n * TICK, epoch, body)

    def add(self, *bodies: Body, epoch: int | None = None) -> History:
        for body in bodies:
            self.events.append(self.event(body, epoch=epoch))
        return self

    def time_of(self, index: int) -> int:
        return self.events[index].time


def fold(events: Iterable[Event], state: RunState | None = None) -> RunState | None:
    return functools.reduce(fold_run, events, state)


def folded(events: Iterable[Event]) -> RunState:
    state = fold(events)
    assert state is not None, "the history should have triggered the run"
    return state


def triggered(p: str = "order-42") -> History:
    return History().add(RunTriggered(payload(p), idempotency_key="k-42", priority=3, tags=("a", "b")))


# --- triggering ---------------------------------------------------------------


def test_a_triggered_run_is_pending_with_its_payload_and_options() -> None:
    h = triggered()
    state = folded(h.events)

    assert state.status == PENDING
    assert state.live
    assert (state.run_id, state.task_id) == (RUN_ID, TASK_ID)
    assert state.payload == payload("order-42")
    assert state.created_at == state.updated_at == h.time_of(0)
    assert (state.idempotency_key, state.priority, state.tags) == ("k-42", 3, ("a", "b"))
    assert state.attempt == 1 and state.attempt_in_trigger == 1
    assert dict(state.steps) == {}


def test_a_repeated_trigger_is_a_no_op() -> None:
    h = triggered("first").add(RunStarted(1, WORKER))
    before = folded(h.events)

    h.add(RunTriggered(payload("second"), priority=9))
    after = folded(h.events)

    assert after == before
    assert after.payload == payload("first")
    assert after.status == RUNNING


def test_events_for_a_run_that_was_never_triggered_are_ignored() -> None:
    h = History().add(
        RunStarted(1, WORKER),
        StepCompleted(0, "charge", 1, payload("ok")),
        RunCompleted(payload("done"), 1),
        RunRetriggered(payload("again")),
    )

    assert fold(h.events) is None


# --- the happy path -------------------------------------------------------------


def test_a_run_completes_with_every_step_holding_its_input_output_and_timing() -> None:
    h = triggered().add(
        RunStarted(1, WORKER),  # 1
        StepStarted(0, "reserve", 1, payload("in-0")),  # 2
        StepCompleted(0, "reserve", 1, payload("out-0")),  # 3
        StepStarted(1, "charge", 1, payload("in-1")),  # 4
        StepCompleted(1, "charge", 1, payload("out-1")),  # 5
        RunCompleted(payload("done"), 1),  # 6
    )
    state = folded(h.events)

    assert state.status == COMPLETED
    assert not state.live
    assert state.output == payload("done")
    assert state.error is None
    assert state.started_at == h.time_of(1)
    assert state.ended_at == h.time_of(6)
    assert state.completed_steps() == 2
    reserve, charge = state.steps[0], state.steps[1]
    assert (reserve.name, reserve.status, reserve.attempt) == ("reserve", "completed", 1)
    assert (reserve.input, reserve.output) == (payload("in-0"), payload("out-0"))
    assert (reserve.started_at, reserve.ended_at) == (h.time_of(2), h.time_of(3))
    assert (charge.input, charge.output) == (payload("in-1"), payload("out-1"))
    assert (charge.started_at, charge.ended_at) == (h.time_of(4), h.time_of(5))


def test_a_running_step_is_visible_before_it_completes() -> None:
    h = triggered().add(RunStarted(1, WORKER), StepStarted(0, "reserve", 1, payload("in")))
    step = folded(h.events).steps[0]

    assert (step.status, step.input, step.output, step.ended_at) == ("running", payload("in"), None, None)


# --- exactly one accepted result per step --------------------------------------


def test_a_second_step_completion_is_ignored() -> None:
    h = triggered().add(
        RunStarted(1, WORKER),
        StepStarted(0, "charge", 1, payload("in")),
        StepCompleted(0, "charge", 1, payload("first")),  # 3
        StepCompleted(0, "charge", 2, payload("second")),  # a zombie's result
    )
    step = folded(h.events).steps[0]

    assert step.output == payload("first")
    assert step.attempt == 1
    assert step.ended_at == h.time_of(3)


def test_a_step_started_again_after_completion_stays_completed() -> None:
    h = triggered().add(
        RunStarted(1, WORKER),
        StepStarted(0, "charge", 1, payload("in")),
        StepCompleted(0, "charge", 1, payload("out")),
        StepStarted(0, "charge", 2, payload("other input")),
        StepFailed(2, boom(), 0, "charge"),
    )
    step = folded(h.events).steps[0]

    assert (step.status, step.input, step.output, step.attempt) == ("completed", payload("in"), payload("out"), 1)
    assert step.error is None


# --- failures and retries ---------------------------------------------------------


def test_a_failed_step_records_its_error_on_the_step_and_in_the_run_errors() -> None:
    err = boom("card declined")
    h = triggered().add(
        RunStarted(1, WORKER),
        StepStarted(0, "charge", 1, payload("in")),  # 2
        StepFailed(1, err, 0, "charge"),  # 3
    )
    state = folded(h.events)

    step = state.steps[0]
    assert (step.status, step.error, step.input) == ("failed", err, payload("in"))
    assert (step.started_at, step.ended_at) == (h.time_of(2), h.time_of(3))
    assert state.error == err
    assert len(state.errors) == 1
    recorded = state.errors[0]
    assert (recorded.attempt, recorded.step, recorded.step_name, recorded.error) == (1, 0, "charge", err)
    assert recorded.time == h.time_of(3)
    assert state.status == RUNNING  # a failed attempt is not a failed run


def test_a_failure_of_the_task_body_is_recorded_without_a_step() -> None:
    err = boom("bad payload")
    h = triggered().add(RunStarted(1, WORKER), StepFailed(1, err))
    state = folded(h.events)

    assert dict(state.steps) == {}
    assert state.errors[0].step is None and state.errors[0].error == err


def test_a_scheduled_retry_moves_the_run_to_retrying_on_the_next_attempt() -> None:
    h = triggered().add(
        RunStarted(1, WORKER),
        StepFailed(1, boom()),
        RetryScheduled(2, T0 + 5_000, 1_000, "ValueError: boom"),  # 3
    )
    state = folded(h.events)

    assert state.status == RETRYING
    assert state.live
    assert state.attempt == 2 and state.attempt_in_trigger == 2
    assert state.retry_at == T0 + 5_000
    assert len(state.retries) == 1
    info = state.retries[0]
    assert (info.attempt, info.retry_at, info.delay_ms, info.reason) == (2, T0 + 5_000, 1_000, "ValueError: boom")
    assert info.time == h.time_of(3)


def test_the_next_attempt_starting_clears_the_retry_time() -> None:
    h = triggered().add(
        RunStarted(1, WORKER),
        StepFailed(1, boom()),
        RetryScheduled(2, T0 + 5_000, 1_000, "ValueError: boom"),
        RunStarted(2, WORKER),
    )
    state = folded(h.events)

    assert (state.status, state.attempt, state.retry_at) == (RUNNING, 2, None)
    assert state.started_at == h.time_of(1)  # the run started once, at its first attempt


def test_a_failed_run_is_dead_lettered() -> None:
    err = boom("gave up")
    h = triggered().add(
        RunStarted(1, WORKER),
        StepFailed(1, err),
        RunFailed(err, 1),  # 3
        RunDeadLettered("ValueError after 1 attempt"),  # 4
    )
    state = folded(h.events)

    assert state.status == FAILED
    assert not state.live
    assert state.error == err
    assert state.ended_at == h.time_of(3)
    assert state.dead_lettered
    assert state.updated_at == h.time_of(4)


# --- durable sleep ------------------------------------------------------------------


def test_a_sleep_suspends_the_run_and_resuming_completes_the_wait() -> None:
    wake = T0 + 60_000
    h = triggered().add(
        RunStarted(1, WORKER),
        StepStarted(0, "reserve", 1),
        StepCompleted(0, "reserve", 1, payload("out")),
        RunSuspended(1, "sleep", wake_at=wake),  # 4
    )
    suspended = folded(h.events)

    assert suspended.status == SUSPENDED
    assert suspended.wake_at == wake
    wait = suspended.steps[1]
    assert (wait.name, wait.status, wait.wake_at, wait.started_at) == ("sleep", "waiting", wake, h.time_of(4))

    h.add(RunResumed(1, "sleep"))  # 5
    resumed = folded(h.events)

    assert resumed.status == PENDING
    assert resumed.wake_at is None
    wait = resumed.steps[1]
    assert (wait.status, wait.ended_at) == ("completed", h.time_of(5))
    assert resumed.steps[0].output == payload("out")


def test_a_suspension_for_a_wait_already_resumed_is_ignored() -> None:
    h = triggered().add(
        RunStarted(1, WORKER),
        RunSuspended(0, "sleep", wake_at=T0 + 60_000),
        RunResumed(0, "sleep"),
        RunStarted(1, WORKER),
        RunSuspended(0, "sleep", wake_at=T0 + 99_000),  # a stale duplicate
    )
    state = folded(h.events)

    assert state.status == RUNNING
    assert state.wake_at is None
    assert state.steps[0].status == "completed"


def test_resuming_a_step_that_never_waited_is_ignored() -> None:
    h = triggered().add(RunStarted(1, WORKER))
    before = folded(h.events)
    h.add(RunResumed(7, "sleep"))
    after = folded(h.events)

    assert (after.status, dict(after.steps)) == (before.status, dict(before.steps))


# --- retrigger and cancel ---------------------------------------------------------


def failed_history() -> History:
    err = boom()
    return triggered("old").add(
        RunStarted(1, WORKER),
        StepFailed(1, err),
        RetryScheduled(2, T0 + 1_000, 1_000, "ValueError: boom"),
        RunStarted(2, WORKER),
        StepFailed(2, err),
        RunFailed(err, 2),
        RunDeadLettered("ValueError after 2 attempts"),
    )


def test_retriggering_a_failed_run_makes_it_pending_again_with_the_new_payload() -> None:
    h = failed_history()
    assert folded(h.events).attempt_in_trigger == 2

    h.add(RunRetriggered(payload("new")))
    state = folded(h.events)

    assert state.status == PENDING
    assert state.live
    assert state.payload == payload("new")
    assert state.attempt == 3
    assert state.attempt_in_trigger == 1  # retry policies count from the retrigger
    assert not state.dead_lettered
    assert state.error is None and state.ended_at is None



def test_a_retriggered_run_shows_the_attempt_its_events_and_steps_carry() -> None:
    # One meaning of "attempt": the run's count over its whole life, as on
    # RunStarted and StepStarted. `runs show`, the API and the dashboard's
    # lists must not restart it at 1 after `dlq retry`.
    h = failed_history().add(RunRetriggered(None), RunStarted(3, WORKER),
                             StepStarted(1, "charge", 3, payload("in")))
    state = folded(h.events)
    view = state_dict(state)
    [step] = view["steps"]

    assert view["attempt"] == step["attempt"] == 3
    assert view["attempt"] == max(e.body.attempt for e in h.events if isinstance(e.body, RunStarted))
    assert dict(zip(SUMMARY_COLUMNS, run_values(state), strict=False))["attempt"] == 3

def test_retriggering_without_a_payload_keeps_the_old_one() -> None:
    h = failed_history().add(RunRetriggered(None))

    assert folded(h.events).payload == payload("old")


def test_retriggering_a_completed_run_is_ignored() -> None:
    h = triggered().add(RunStarted(1, WORKER), RunCompleted(payload("done"), 1))
    before = folded(h.events)

    h.add(RunRetriggered(payload("new")))
    after = folded(h.events)

    assert after == before
    assert (after.status, after.payload, after.output) == (COMPLETED, payload("order-42"), payload("done"))


def test_retriggering_a_live_run_is_ignored() -> None:
    h = triggered().add(RunStarted(1, WORKER))
    h.add(RunRetriggered(payload("new")))
    state = folded(h.events)

    assert (state.status, state.payload, state.attempt) == (RUNNING, payload("order-42"), 1)


def test_cancelling_a_live_run_ends_it_and_clears_its_timers() -> None:
    h = triggered().add(
        RunStarted(1, WORKER),
        RunSuspended(0, "sleep", wake_at=T0 + 60_000),
        RunCancelled("no longer needed"),  # 3
    )
    state = folded(h.events)

    assert state.status == CANCELLED
    assert not state.live
    assert state.ended_at == h.time_of(3)
    assert state.wake_at is None and state.retry_at is None


@pytest.mark.parametrize(
    "late",
    [
        RunStarted(2, WORKER),
        StepStarted(0, "charge", 1),
        StepCompleted(0, "charge", 1, payload("late")),
        StepFailed(1, boom()),
        RetryScheduled(2, T0, 0, "late"),
        RunSuspended(0, "sleep", wake_at=T0),
        RunResumed(0, "sleep"),
        RunCompleted(payload("late"), 1),
        RunFailed(boom(), 1),
        RunCancelled("late"),
        RunTriggered(payload("late")),
    ],
    ids=lambda b: type(b).__name__,
)
@pytest.mark.parametrize("ending", ["completed", "failed", "cancelled"])
def test_events_after_a_run_ended_change_nothing(late: Body, ending: str) -> None:
    h = triggered().add(RunStarted(1, WORKER), StepStarted(0, "charge", 1))
    if ending == "completed":
        h.add(RunCompleted(payload("done"), 1))
    elif ending == "failed":
        h.add(RunFailed(boom(), 1))
    else:
        h.add(RunCancelled("stop"))
    before = folded(h.events)

    h.add(late)
    after = folded(h.events)

    assert after == before


def test_a_run_that_ended_still_records_logs_and_dead_lettering() -> None:
    h = triggered().add(RunStarted(1, WORKER), RunCancelled("stop"))
    h.add(LogRecorded("info", "cleanup done", 1), RunDeadLettered("cancelled"))
    state = folded(h.events)

    assert state.status == CANCELLED
    assert [line.message for line in state.logs] == ["cleanup done"]
    assert state.dead_lettered


def test_a_cancelled_run_can_be_retriggered() -> None:
    h = triggered().add(RunStarted(1, WORKER), RunCancelled("oops"), RunRetriggered(None))
    state = folded(h.events)

    assert (state.status, state.attempt, state.attempt_in_trigger) == (PENDING, 2, 1)


# --- logs ---------------------------------------------------------------------------


def test_logs_are_recorded_with_their_context() -> None:
    h = triggered().add(RunStarted(1, WORKER), LogRecorded("warning", "slow card API", 1, '{"ms": 900}', 0))
    line = folded(h.events).logs[0]

    assert (line.level, line.message, line.attempt, line.step, line.fields) == (
        "warning", "slow card API", 1, 0, '{"ms": 900}',
    )
    assert line.time == h.time_of(2)


def test_logs_beyond_the_per_run_bound_are_counted_not_kept() -> None:
    extra = 7
    h = triggered().add(RunStarted(1, WORKER))
    h.add(*(LogRecorded("info", f"line {i}", 1) for i in range(MAX_LOGS_PER_RUN + extra)))
    state = folded(h.events)

    assert len(state.logs) == MAX_LOGS_PER_RUN
    assert state.logs[-1].message == f"line {MAX_LOGS_PER_RUN - 1}"  # the oldest are kept
    assert state.logs_dropped == extra


# --- epoch fencing --------------------------------------------------------------------


def apply_all(part: PartitionRuns, events: Iterable[Event]) -> None:
    for offset, e in enumerate(events, start=part.next_offset):
        part.apply(e, offset)


def claim(epoch: int, worker: str = WORKER) -> Event:
    return Event(f"claim-{epoch}-{worker}", PartitionClaimed.TYPE, "", "", 0, T0, epoch, PartitionClaimed(0, worker))


def test_a_partition_claim_raises_the_epoch_and_is_not_a_run() -> None:
    part = PartitionRuns(partition=0)

    assert part.apply(claim(2), offset=0) is None
    assert part.epoch == 2
    assert part.runs == {}
    assert part.next_offset == 1


def test_an_owner_event_from_an_older_epoch_is_fenced() -> None:
    part = PartitionRuns(partition=0)
    h = History(epoch=1)
    h.add(RunTriggered(payload("p")), RunStarted(1, "old-owner"))
    apply_all(part, [claim(1, "old-owner"), *h.events])
    apply_all(part, [claim(2, "new-owner")])

    zombie = h.event(StepCompleted(0, "charge", 1, payload("zombie")), epoch=1)
    assert part.apply(zombie) is None
    assert part.fenced == 1

    h.epoch = 2
    fresh = h.event(StepCompleted(0, "charge", 1, payload("owner")))
    assert part.apply(fresh) is not None
    assert part.runs[RUN_ID].steps[0].output == payload("owner")
    assert part.fenced == 1


def test_client_requests_are_never_fenced() -> None:
    part = PartitionRuns(partition=0)
    apply_all(part, [claim(2)])
    a = History(run_id="run_A", epoch=2)
    b = History(run_id="run_B", epoch=2)

    a.add(RunTriggered(payload("a")), epoch=0)
    b.add(RunTriggered(payload("b")), epoch=0)
    b.add(RunStarted(1, WORKER), StepFailed(1, boom()), RunFailed(boom(), 1))
    apply_all(part, a.events + b.events)
    part.apply(a.event(RunCancelled("stop"), epoch=0))
    part.apply(b.event(RunRetriggered(payload("b2")), epoch=0))

    assert part.fenced == 0
    assert part.runs["run_A"].status == CANCELLED
    assert (part.runs["run_B"].status, part.runs["run_B"].payload) == (PENDING, payload("b2"))


def test_a_claim_with_a_lower_epoch_does_not_lower_it() -> None:
    part = PartitionRuns(partition=0)
    apply_all(part, [claim(5), claim(3)])

    assert part.epoch == 5
    h = History(epoch=3).add(RunTriggered(payload("p")))
    apply_all(part, h.events)
    part.apply(h.event(RunStarted(1, WORKER)))

    assert part.fenced == 1
    assert part.runs[RUN_ID].status == PENDING


def test_events_for_an_untriggered_run_leave_the_partition_empty() -> None:
    part = PartitionRuns(partition=0)
    h = History(epoch=0).add(RunStarted(1, WORKER), RunCancelled("stop"))

    apply_all(part, h.events)

    assert part.runs == {}
    assert list(part.live_runs()) == []


# --- purity ---------------------------------------------------------------------------


def test_folding_the_same_events_twice_gives_equal_states() -> None:
    events = failed_history().add(RunRetriggered(payload("new")), LogRecorded("info", "x", 3)).events

    assert fold(events) == fold(events)


def test_folding_never_mutates_the_state_it_was_given() -> None:
    h = triggered().add(RunStarted(1, WORKER), StepStarted(0, "charge", 1, payload("in")))
    old = folded(h.events)
    old_steps = dict(old.steps)
    old_fields = {f.name: getattr(old, f.name) for f in dataclasses.fields(old)}

    later = h.add(
        StepCompleted(0, "charge", 1, payload("out")),
        StepStarted(1, "ship", 1),
        StepFailed(1, boom(), 1, "ship"),
        LogRecorded("info", "x", 1),
        RetryScheduled(2, T0, 0, "r"),
    ).events[-5:]
    new = fold(later, old)

    assert new is not None and new is not old
    assert dict(old.steps) == old_steps
    assert old.steps[0].status == "running" and 1 not in old.steps
    assert {f.name: getattr(old, f.name) for f in dataclasses.fields(old)} == old_fields
    with pytest.raises(TypeError):
        old.steps[0] = new.steps[0]  # type: ignore[index]  # the mapping is read-only on purpose
    with pytest.raises(dataclasses.FrozenInstanceError):
        old.status = COMPLETED  # type: ignore[misc]  # frozen on purpose


# --- duplicate delivery (property-based) ------------------------------------------------


@st.composite
def run_histories(draw: st.DrawFn) -> list[Body]:
    """A valid history of one run, as a worker and a client would write it.

    Attempts run steps in order; completed steps are replayed, not re-run, so
    a later attempt continues at the first step that has not completed. An
    attempt ends by completing, sleeping, retrying or failing; a failed or
    cancelled run may be retriggered.
    """
    bodies: list[Body] = [RunTriggered(payload(draw(st.sampled_from(["a", "b"]))))]
    attempt = 1
    next_step = 0
    live = True
    asleep: int | None = None
    for _ in range(draw(st.integers(1, 6))):
        if not live:
            if not draw(st.booleans()):
                break
            bodies.append(RunRetriggered(draw(st.one_of(st.none(), st.just(payload("re"))))))
            attempt += 1
            live = True
        bodies.append(RunStarted(attempt, WORKER))
        if asleep is not None:  # cancelled mid-sleep: the retriggered run reaches that sleep first
            bodies.append(RunSuspended(asleep, "sleep", wake_at=T0 + 1_000_000))
            bodies.append(RunResumed(asleep, "sleep"))
            bodies.append(RunStarted(attempt, WORKER))
            asleep = None
        for _ in range(draw(st.integers(0, 3))):
            name = f"step-{next_step}"
            bodies.append(StepStarted(next_step, name, attempt, payload(f"in-{next_step}")))
            if draw(st.booleans()):
                bodies.append(LogRecorded("info", f"in {name}", attempt, "{}", next_step))
            if draw(st.integers(0, 4)) == 0:
                bodies.append(StepFailed(attempt, boom(f"{name} failed"), next_step, name))
                break
            bodies.append(StepCompleted(next_step, name, attempt, payload(f"out-{next_step}-{attempt}")))
            next_step += 1
        ending = draw(st.sampled_from(
            ["complete", "sleep", "retry", "fail", "cancel", "body-fails", "cancel-asleep", "cancel-retrying"]
        ))
        if ending == "complete":
            bodies.append(RunCompleted(payload(f"done-{attempt}"), attempt))
            live = False
            break  # a completed run never runs again
        if ending == "sleep":
            bodies.append(RunSuspended(next_step, "sleep", wake_at=T0 + 1_000_000))
            bodies.append(RunResumed(next_step, "sleep"))
            next_step += 1
        elif ending == "retry":
            bodies.append(StepFailed(attempt, boom("body")))
            attempt += 1
            bodies.append(RetryScheduled(attempt, T0 + 1_000_000, 1_000, "ValueError: body"))
        elif ending == "cancel":
            bodies.append(RunCancelled("stop"))
            live = False
        elif ending == "cancel-asleep":
            bodies.append(RunSuspended(next_step, "sleep", wake_at=T0 + 1_000_000))
            bodies.append(RunCancelled("stop"))
            asleep = next_step
            next_step += 1
            live = False
        elif ending == "cancel-retrying":
            bodies.append(StepFailed(attempt, boom("body")))
            attempt += 1
            bodies.append(RetryScheduled(attempt, T0 + 1_000_000, 1_000, "ValueError: body"))
            bodies.append(RunCancelled("stop"))
            live = False
        else:
            if ending == "body-fails":
                bodies.append(StepFailed(attempt, boom("body")))
            bodies.append(RunFailed(boom("gave up"), attempt))
            bodies.append(RunDeadLettered("gave up"))
            live = False
    return bodies


def outcome(state: RunState | None) -> tuple[Any, ...]:
    """What duplicate delivery must not change: status, output, accepted step results."""
    assert state is not None
    return (
        state.status,
        state.output,
        {n: s.output for n, s in state.steps.items() if s.status == "completed"},
    )


@settings(max_examples=300, deadline=None)
@given(run_histories())
def test_delivering_every_event_twice_gives_the_same_outcome_as_once(bodies: list[Body]) -> None:
    once = History().add(*bodies).events
    twice = [e for e in once for _ in range(2)]  # the same record, redelivered

    assert outcome(fold(twice)) == outcome(fold(once))


@settings(max_examples=100, deadline=None)
@given(run_histories())
def test_folding_a_history_is_deterministic(bodies: list[Body]) -> None:
    events = History().add(*bodies).events

    assert fold(events) == fold(list(events))
