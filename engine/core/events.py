"""The events Stepline records, as frozen dataclasses.

These are the in-code shapes; `stepline.codec` translates them to and from
Avro at the edge (schemas in `stepline.schemas`). Field names match the Avro
field names one to one, so the codec stays a mechanical mapping.

Times are integer milliseconds since the Unix epoch (plain Avro longs), so
an event's meaning never depends on a local clock or time zone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Union

from stepline.core.frozen import fast_init

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Payload:
    """User data inside an event: opaque bytes plus how to read them."""

    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A failure as recorded: enough to classify, show and debug it."""

    type: str
    message: str
    stack: str = ""
    retriable: bool = True


# --- stepline.runs ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunTriggered:
    TYPE: ClassVar[str] = "RunTriggered"
    payload: Payload
    idempotency_key: str | None = None
    not_before: int | None = None
    priority: int = 0
    tags: tuple[str, ...] = ()
    queue: str | None = None
    concurrency_key: str | None = None
    parent_run_id: str | None = None
    parent_step: int | None = None  # schema v3
    expires_at: int | None = None  # schema v4
    # A fork (schema v5): the original run, the first position that runs
    # live, and the journal and patch decisions copied from before it.
    forked_from: str | None = None
    forked_at_step: int | None = None
    journal: tuple[CopiedStep, ...] = ()
    patches: tuple[PatchRecorded, ...] = ()


@dataclass(frozen=True, slots=True)
class CopiedStep:
    """A journal position a fork copies from its original run. Schema v5."""

    step: int
    name: str
    input: Payload | None = None
    output: Payload | None = None
    error: ErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class PatchRecorded:
    """A run's answer to `patched(patch)`, recorded when first asked, so that
    every replay of the run answers the same. Schema v5."""

    TYPE: ClassVar[str] = "PatchRecorded"
    patch: str
    applied: bool
    step: int  # the journal position the run had reached when it asked


@dataclass(frozen=True, slots=True)
class RunStarted:
    TYPE: ClassVar[str] = "RunStarted"
    attempt: int
    worker_id: str
    task_version: str | None = None  # schema v5


@dataclass(frozen=True, slots=True)
class StepStarted:
    TYPE: ClassVar[str] = "StepStarted"
    step: int
    name: str
    attempt: int
    input: Payload | None = None


@dataclass(frozen=True, slots=True)
class StepCompleted:
    TYPE: ClassVar[str] = "StepCompleted"
    step: int
    name: str
    attempt: int
    output: Payload


@dataclass(frozen=True, slots=True)
class StepFailed:
    """An attempt failed; `step` is None when the task body itself raised."""

    TYPE: ClassVar[str] = "StepFailed"
    attempt: int
    error: ErrorInfo
    step: int | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    TYPE: ClassVar[str] = "RetryScheduled"
    attempt: int  # the attempt that will run next
    retry_at: int
    delay_ms: int
    reason: str


@dataclass(frozen=True, slots=True)
class RunSuspended:
    """The run waits; the worker holds nothing for it but a timer entry."""

    TYPE: ClassVar[str] = "RunSuspended"
    step: int
    reason: str  # "sleep" | "event" | "child" | "token"
    wake_at: int | None = None
    condition: str | None = None  # JSON of the wake condition, for humans
    # Schema v5: a branch of `wait_for_any`, named by its first branch's
    # position. The first branch of a group to resolve wins; the others end.
    group: int | None = None


@dataclass(frozen=True, slots=True)
class RunResumed:
    TYPE: ClassVar[str] = "RunResumed"
    step: int
    reason: str


@dataclass(frozen=True, slots=True)
class RunCompleted:
    TYPE: ClassVar[str] = "RunCompleted"
    output: Payload
    attempt: int


@dataclass(frozen=True, slots=True)
class RunFailed:
    TYPE: ClassVar[str] = "RunFailed"
    error: ErrorInfo
    attempt: int


@dataclass(frozen=True, slots=True)
class RunDeadLettered:
    TYPE: ClassVar[str] = "RunDeadLettered"
    reason: str


@dataclass(frozen=True, slots=True)
class RunCancelled:
    TYPE: ClassVar[str] = "RunCancelled"
    reason: str
    requested_by: str = "api"


@dataclass(frozen=True, slots=True)
class RunRetriggered:
    """Manual retry of a dead letter, optionally with a new payload."""

    TYPE: ClassVar[str] = "RunRetriggered"
    payload: Payload | None = None
    requested_by: str = "api"


@dataclass(frozen=True, slots=True)
class LogRecorded:
    TYPE: ClassVar[str] = "LogRecorded"
    level: str
    message: str
    attempt: int
    fields: str = "{}"  # JSON object
    step: int | None = None


@dataclass(frozen=True, slots=True)
class SlotGranted:
    TYPE: ClassVar[str] = "SlotGranted"
    queue: str
    concurrency_key: str | None = None


@dataclass(frozen=True, slots=True)
class PartitionClaimed:
    """A worker took ownership of a partition; its epoch fences older owners."""

    TYPE: ClassVar[str] = "PartitionClaimed"
    partition: int
    worker_id: str


# --- stepline.events ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class DomainEvent:
    """Something that happened (user.created, a webhook delivery). Schema v2.

    On the events topic; the envelope's run_id and task_id are empty.
    """

    TYPE: ClassVar[str] = "DomainEvent"
    name: str
    data: Payload
    key: str | None = None
    source: str = "api"


@dataclass(frozen=True, slots=True)
class WaitCompleted:
    """Resolves a durable wait: an event matched, a token was completed, a
    child run ended. Schema v3.

    A request, like a trigger: the router, a CLI or a child's worker appends
    it to the waiting run's partition without owning it. The fold accepts
    the first resolution of a wait and ignores the rest, so redelivery and
    races (an event against the wait's timeout) are harmless.
    """

    TYPE: ClassVar[str] = "WaitCompleted"
    step: int
    reason: str  # event | token | child
    source: str  # event id, token, child run id
    output: Payload | None = None
    error: ErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class SlotRequested:
    """On the queues topic (keyed by queue); the envelope names the run. Schema v4."""

    TYPE: ClassVar[str] = "SlotRequested"
    queue: str
    concurrency_key: str | None = None
    priority: int = 0
    created_at: int = 0
    limit: int | None = None
    key_limit: int | None = None
    rate_limit: int | None = None
    rate_period_ms: int | None = None


@dataclass(frozen=True, slots=True)
class SlotReleased:
    """On the queues topic: a slot given back, or a request withdrawn. Schema v4."""

    TYPE: ClassVar[str] = "SlotReleased"
    queue: str
    concurrency_key: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RunExpired:
    """The run's time to live ran out before it started. Schema v4."""

    TYPE: ClassVar[str] = "RunExpired"
    expires_at: int


# Scopes a PauseChanged names.
PAUSE_TASK = "task"
PAUSE_QUEUE = "queue"


@dataclass(frozen=True, slots=True)
class PauseChanged:
    """A task or a queue paused (or resumed). Schema v5.

    A request appended to every partition of the runs and queues topics
    (run id empty, key empty), so each partition's fold knows what is
    paused in order with its own runs: a run's owner holds back new
    attempts, a queue's owner holds back grants (engine/client/pause.py).
    """

    TYPE: ClassVar[str] = "PauseChanged"
    scope: str  # PAUSE_TASK | PAUSE_QUEUE
    name: str
    paused: bool
    reason: str = ""
    requested_by: str = "api"


Body = Union[
    RunTriggered,
    RunStarted,
    StepStarted,
    StepCompleted,
    StepFailed,
    RetryScheduled,
    RunSuspended,
    RunResumed,
    RunCompleted,
    RunFailed,
    RunDeadLettered,
    RunCancelled,
    RunRetriggered,
    LogRecorded,
    SlotGranted,
    PartitionClaimed,
    DomainEvent,
    WaitCompleted,
    SlotRequested,
    SlotReleased,
    RunExpired,
    PatchRecorded,
    PauseChanged,
]

BODY_TYPES: tuple[type[Body], ...] = (
    RunTriggered,
    RunStarted,
    StepStarted,
    StepCompleted,
    StepFailed,
    RetryScheduled,
    RunSuspended,
    RunResumed,
    RunCompleted,
    RunFailed,
    RunDeadLettered,
    RunCancelled,
    RunRetriggered,
    LogRecorded,
    SlotGranted,
    PartitionClaimed,
    DomainEvent,
    WaitCompleted,
    SlotRequested,
    SlotReleased,
    RunExpired,
    PatchRecorded,
    PauseChanged,
)

# Events a client may append for a run it does not own. Everything else is
# written by the partition owner and fenced by its epoch.
REQUEST_TYPES: frozenset[str] = frozenset(
    {RunTriggered.TYPE, RunCancelled.TYPE, RunRetriggered.TYPE, WaitCompleted.TYPE,
     # The queue's owner admits runs it does not own (schema v4).
     SlotGranted.TYPE,
     # Pauses are any client's to append, on every partition (schema v5).
     PauseChanged.TYPE}
)


@dataclass(frozen=True, slots=True)
class Event:
    """The envelope: one record on the log.

    `seq` orders a run's events as written by its owner; `epoch` is the
    owner's fencing epoch (0 for client requests, which are not fenced).
    """

    event_id: str
    type: str
    run_id: str
    task_id: str
    seq: int
    time: int
    epoch: int
    body: Body
    traceparent: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


# Several of these are built per event: let their __init__ store through the
# slots, at half the cost (engine/core/frozen.py; classes that don't qualify keep theirs).
for _cls in [c for c in list(globals().values()) if isinstance(c, type) and c.__module__ == __name__]:
    fast_init(_cls)
del _cls


__all__ = [
    "JSON",
    "Payload",
    "ErrorInfo",
    "RunTriggered",
    "CopiedStep",
    "PatchRecorded",
    "RunStarted",
    "StepStarted",
    "StepCompleted",
    "StepFailed",
    "RetryScheduled",
    "RunSuspended",
    "RunResumed",
    "RunCompleted",
    "RunFailed",
    "RunDeadLettered",
    "RunCancelled",
    "RunRetriggered",
    "LogRecorded",
    "SlotGranted",
    "PartitionClaimed",
    "DomainEvent",
    "WaitCompleted",
    "SlotRequested",
    "SlotReleased",
    "RunExpired",
    "PAUSE_TASK",
    "PAUSE_QUEUE",
    "PauseChanged",
    "Body",
    "BODY_TYPES",
    "REQUEST_TYPES",
    "Event",
]
