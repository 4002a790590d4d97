"""Stepline: durable background tasks for Python, recorded on an event log.

    import stepline as sl

    @sl.task(id="process-order", retry=sl.Retry(max_attempts=3))
    async def process_order(payload: OrderIn) -> dict: ...

Everything a user needs is importable from here; the modules behind it are
implementation and may move.
"""

from stepline.client import Client, RunHandle, SyncClient, SyncRunHandle, publish
from stepline.client.backfill import BackfillReport, backfill
from stepline.consumers.router import Subscription
from stepline.consumers.topic_subscription import KafkaTopic
from stepline.errors import (
    ChildProcessDied,
    ChildRunFailed,
    EmitUnsupported,
    FatalError,
    InvalidRunState,
    InvalidToken,
    KeyStoreError,
    LogError,
    LogUnavailable,
    MaxDurationExceeded,
    NoClient,
    NonDeterminismError,
    NotInRunContext,
    PayloadTooLarge,
    PayloadValidationError,
    RetryAfter,
    RunFailedError,
    SchemaError,
    SteplineError,
    StepRetriesExhausted,
    SubjectErased,
    TaskDefinitionError,
    UnknownPool,
    UnknownRun,
    UnknownTask,
)
from stepline.log import DEFAULT_LOG_URL, open_log
from stepline.projections.runs import RunState, StepState
from stepline.runtime.worker import Worker
from stepline.sdk.context import idempotency_key, patched, sleep, step
from stepline.sdk.debounce import Debounce
from stepline.sdk.emit import emit
from stepline.sdk.logs import configure_logging, logger
from stepline.sdk.retry import Retry, Rule, http_status
from stepline.sdk.schedule import Cron, Every, ScheduleTick
from stepline.sdk.task import Queue, RateLimit, Registry, Task, default_registry, load_app, task
from stepline.sdk.wait_any import AnyResult, ChildRun, EventWait, Timer, wait_for_any
from stepline.sdk.waits import WaitToken, create_token, wait_for_event, wait_for_token
from stepline.security.sensitive import Sensitive
from stepline.version import __version__

__all__ = [
    # declaring tasks
    "task",
    "step",
    "sleep",
    "idempotency_key",
    "patched",
    "emit",
    "logger",
    "wait_for_event",
    "wait_for_token",
    "wait_for_any",
    "EventWait",
    "Timer",
    "ChildRun",
    "AnyResult",
    "create_token",
    "WaitToken",
    "Task",
    "Queue",
    "RateLimit",
    "Debounce",
    "Sensitive",
    "Subscription",
    "KafkaTopic",
    "Cron",
    "Every",
    "ScheduleTick",
    "Retry",
    "Rule",
    "http_status",
    "Registry",
    "default_registry",
    "load_app",
    # triggering and inspecting runs
    "Client",
    "SyncClient",
    "SyncRunHandle",
    "publish",
    "backfill",
    "BackfillReport",
    "RunHandle",
    "RunState",
    "StepState",
    # running
    "Worker",
    "open_log",
    "DEFAULT_LOG_URL",
    "configure_logging",
    # errors
    "SteplineError",
    "FatalError",
    "RetryAfter",
    "RunFailedError",
    "StepRetriesExhausted",
    "NonDeterminismError",
    "PayloadValidationError",
    "PayloadTooLarge",
    "TaskDefinitionError",
    "UnknownTask",
    "UnknownPool",
    "UnknownRun",
    "InvalidRunState",
    "InvalidToken",
    "ChildRunFailed",
    "MaxDurationExceeded",
    "ChildProcessDied",
    "SubjectErased",
    "EmitUnsupported",
    "KeyStoreError",
    "NoClient",
    "NotInRunContext",
    "LogError",
    "LogUnavailable",
    "SchemaError",
    "__version__",
]
