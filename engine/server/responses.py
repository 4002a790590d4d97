"""What the HTTP API answers, as pydantic models: they describe the JSON views
(projections/views.py, the query store's rows, the reports of client/) for the
OpenAPI document; the handlers still answer those views as they are.

tests/test_openapi.py checks real answers against these models, and that every
field a view returns is described here. A client should ignore fields it does
not know: new ones may be added, none removed.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stepline.server.models import RunStatus

Millis = Annotated[int, Field(description="milliseconds since the Unix epoch")]


class Error(BaseModel):
    """Every error answer, whatever its status."""

    error: str = Field(description="what was wrong and what to do")


class RunSummary(BaseModel):
    """A run as the lists show it."""

    run_id: str
    task_id: str
    status: RunStatus
    dead_lettered: bool
    priority: int
    tags: list[str]
    created_at: Millis
    updated_at: Millis
    started_at: Millis | None = None
    ended_at: Millis | None = None
    attempt: int | None = None
    queue: str | None = None
    concurrency_key: str | None = None
    parent_run_id: str | None = None
    idempotency_key: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    paused: bool | None = Field(None, description="queued behind a paused task or queue (in lists only)")


class ErrorInfo(BaseModel):
    type: str
    message: str
    stack: str


class AttemptError(BaseModel):
    attempt: int
    step: int | None
    step_name: str | None
    time: Millis
    type: str
    message: str
    stack: str


class Step(BaseModel):
    step: int
    name: str
    status: str = Field(examples=["running", "completed", "failed", "waiting", "resolved"])
    attempt: int
    started_at: Millis | None
    ended_at: Millis | None
    input: Any
    output: Any
    error: str | None
    wake_at: Millis | None
    condition: Any = Field(description="a wait's wake condition, as recorded")


class RetryEntry(BaseModel):
    attempt: int
    retry_at: Millis
    delay_ms: int
    reason: str


class LogLine(BaseModel):
    time: Millis
    level: str
    message: str
    attempt: int
    step: int | None
    fields: dict[str, Any]


class Patch(BaseModel):
    patch: str
    applied: bool
    step: int


class AsOf(BaseModel):
    """Where in its history a run's state was read (`GET /v1/runs/{run_id}?as_of=`)."""

    offset: int = Field(description="the offset of the last event folded")
    time: Millis = Field(description="that event's time")
    iso_time: str = Field(json_schema_extra={"format": "date-time"})
    event: str = Field(description="that event's type", examples=["StepCompleted"])
    events: int = Field(description="how many of the run's events were folded")
    of: int = Field(description="how many events the run has now")
    requested: str = Field(description="the point asked for, as given")


class RunState(BaseModel):
    """A run's whole state: steps, outputs, errors, retries, logs."""

    run_id: str
    task_id: str
    status: RunStatus
    dead_lettered: bool
    attempt: int = Field(description="the latest attempt, counted over the run's whole life as on its events "
                                     "and steps: a retriggered dead letter goes on from its last attempt")
    created_at: Millis
    updated_at: Millis
    ended_at: Millis | None
    priority: int
    tags: list[str]
    idempotency_key: str | None
    payload: Any
    output: Any
    error: ErrorInfo | None
    wake_at: Millis | None
    retry_at: Millis | None
    started_at: Millis | None
    expires_at: Millis | None
    queue: str | None
    concurrency_key: str | None
    parent_run_id: str | None
    parent_step: int | None
    forked_from: str | None
    forked_at_step: int | None
    task_version: str | None
    patches: list[Patch]
    errors: list[AttemptError]
    steps: list[Step]
    retries: list[RetryEntry]
    logs: list[LogLine]
    logs_dropped: int
    as_of: AsOf | None = Field(None, description="only with ?as_of=: the state is the run's at that point")


class RunPage(BaseModel):
    runs: list[RunSummary]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page")
    total_estimate: int | None = Field(None, description="only on an unfiltered first page")


class DomainEvent(BaseModel):
    event_id: str
    name: str
    key: str | None = None
    source: str | None = None
    time: Millis
    data: Any = None
    partition: int
    offset: int
    runs: list[RunSummary]


class EventPage(BaseModel):
    events: list[DomainEvent]
    next_cursor: str | None


class HistoryEvent(BaseModel):
    offset: int
    time: Millis
    type: str = Field(examples=["RunTriggered"])
    seq: int
    epoch: int
    run_id: str
    task_id: str
    body: dict[str, Any] = Field(description="the event's fields")


class RunHistory(BaseModel):
    run_id: str
    events: list[HistoryEvent]


class RateLimit(BaseModel):
    limit: int
    period_ms: int


class Queue(BaseModel):
    name: str
    pending: int
    running: int
    retrying: int
    suspended: int
    limit: int | None = None
    key_limit: int | None = None
    rate_limit: RateLimit | None = None
    paused: bool | None = None


class QueueList(BaseModel):
    queues: list[Queue]


class Pause(BaseModel):
    scope: Literal["task", "queue"]
    name: str
    since: Millis | None = None
    reason: str
    requested_by: str | None = None


class PauseList(BaseModel):
    pauses: list[Pause]


class PauseState(BaseModel):
    scope: str
    name: str
    paused: bool
    reason: str


class BulkReport(BaseModel):
    action: Literal["cancel", "retry", "replay"]
    request_id: str
    dry_run: bool
    filter: dict[str, Any] = Field(description="the filter applied; `to` pinned to the request's time")
    matched: int
    acted: int = Field(description="on a dry run: would act")
    skipped: dict[str, int] = Field(description="runs skipped, by reason (e.g. `already completed`)")
    skipped_total: int
    sample: list[str] = Field(description="the first run ids acted on (for replays, the new runs)")


class Schedule(BaseModel):
    task_id: str
    schedule: str = Field(examples=["cron 0 3 * * * Europe/Berlin"])
    next_tick: str = Field(json_schema_extra={"format": "date-time"})
    next_tick_ms: Millis
    last_run: RunSummary | None = None


class ScheduleList(BaseModel):
    schedules: list[Schedule]


class Triggered(BaseModel):
    run_id: str
    task_id: str


class Published(BaseModel):
    event_id: str


class Cancelled(BaseModel):
    run_id: str
    cancelled: Literal[True]
    was: RunStatus


class Retried(BaseModel):
    run_id: str
    retriggered: Literal[True]
    was: RunStatus
    new_payload: bool


class Forked(BaseModel):
    run_id: str
    task_id: str
    forked_from: str
    at_step: int


class TokenCompleted(BaseModel):
    token: str
    run_id: str
    completed: Literal[True]


class ShadowDiff(BaseModel):
    """The shadow diff of engine/history/shadow.py, and which code made it."""

    run_id: str
    task_id: str
    status: str
    diverged: bool
    code: str


class DiffRun(BaseModel):
    """One side of a diff: the run's facts."""

    run_id: str
    task_id: str
    task_version: str | None
    status: RunStatus
    attempt: int
    created_at: Millis
    duration_ms: int | None
    payload: Any
    output: Any
    error: str | None = Field(description="`Type: message` of its error")
    forked_from: str | None
    forked_at_step: int | None


class DiffStep(BaseModel):
    """One run's step at a position."""

    name: str
    status: str
    attempt: int
    duration_ms: int | None
    input: Any
    output: Any
    error: str | None = Field(description="`Type: message` of its error")


class DiffPair(BaseModel):
    step: int = Field(description="the journal position")
    a: DiffStep | None = Field(description="null: run A has no step here")
    b: DiffStep | None
    differs: list[Literal["name", "input", "output", "error", "status", "missing"]] = Field(
        description="what differs (durations and attempts never count); `missing`: one run has no step here")


class RunDiff(BaseModel):
    """Two runs step by step (projections/diff.py), as `stepline diff --json` prints it."""

    a: DiffRun
    b: DiffRun
    same: bool
    run_differs: list[Literal["task_id", "payload", "task_version", "status", "output", "error"]]
    first_divergence: int | Literal["task_id", "payload", "task_version", "status", "output", "error"] | None = Field(
        description="where to start reading: a step position, or the run field that differs first; null: the same")
    steps: list[DiffPair]


class WhyReason(BaseModel):
    """One thing that holds a run back (projections/why.py), with the facts behind it."""

    model_config = ConfigDict(extra="allow")

    kind: Literal["ended", "running", "delayed", "retrying", "paused", "queue", "concurrency_key", "rate_limit",
                  "wait", "ttl", "ready"]
    message: str = Field(description="one sentence for people")


class RunWhy(BaseModel):
    """Why a run is not running (`stepline runs why --json`). Each reason
    carries its facts beside kind and message: queue: queue, position, waiting,
    limit, holders; concurrency_key: key, key_limit, holders; rate_limit:
    queue, rate_limit, period_ms, next_free_at; paused: scope, name, by, at,
    reason; delayed: not_before; retrying: retry_at, attempt, error; wait:
    step, wait, since, timeout_at and the condition (event and match, token,
    child and task); ttl: expires_at; ready: pool; ended: status, ended_at;
    running: attempt, steps."""

    run_id: str
    task_id: str
    status: RunStatus
    reasons: list[WhyReason]


class BackfillReport(BaseModel):
    task_id: str
    since: Millis
    until: Millis
    dry_run: bool
    scanned: int
    matched: int
    existing: int
    to_start: int
    started: int
    run_ids: list[str]


class Erased(BaseModel):
    subject: str
    erased: bool
    keys_deleted: int


class Healthy(BaseModel):
    ok: Literal[True]


class Ready(BaseModel):
    ready: Literal[True]


class Info(BaseModel):
    auth: bool
    version: str


class Document(BaseModel):
    """The OpenAPI document."""

    openapi: str


__all__ = [
    "AsOf", "BackfillReport", "BulkReport", "Cancelled", "Document", "DomainEvent", "Erased", "Error", "EventPage",
    "Forked", "Healthy", "HistoryEvent", "Info", "PauseList", "PauseState", "Published", "QueueList",
    "Ready", "Retried", "RunDiff", "RunHistory", "RunPage", "RunState", "RunSummary", "RunWhy", "ScheduleList",
    "ShadowDiff", "TokenCompleted", "Triggered", "WhyReason",
]
