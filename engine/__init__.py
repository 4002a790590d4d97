"""Stepline: durable background tasks for Python, recorded on an event log.

    import stepline as sl

    @sl.task(id="process-order", retry=sl.Retry(max_attempts=3))
    async def process_order(payload: OrderIn) -> dict: ...

Everything a user needs is importable from here; the modules behind it are
implementation and may move.
"""

from stepline.backfill import BackfillReport, backfill
from stepline.client import Client, RunHandle, publish
from stepline.consumers.router import Subscription
from stepline.context import idempotency_key, patched, sleep, step
from stepline.debounce import Debounce
from stepline.emit import emit
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
    SubjectErased,
    TaskDefinitionError,
    UnknownRun,
    UnknownTask,
)
from stepline.log import DEFAULT_LOG_URL, open_log
from stepline.logs import configure_logging, logger
from stepline.projections.runs import RunState, StepState
from stepline.retry import Retry, Rule, http_status
from stepline.schedule import Cron, Every, ScheduleTick
from stepline.sensitive import Sensitive
from stepline.task import Queue, RateLimit, Registry, Task, default_registry, load_app, task
from stepline.wait_any import AnyResult, ChildRun, EventWait, Timer, wait_for_any
from stepline.waits import WaitToken, create_token, wait_for_event, wait_for_token
from stepline.worker import Worker

__version__ = "0.1.0"

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
    "NonDeterminismError",
    "PayloadValidationError",
    "PayloadTooLarge",
    "TaskDefinitionError",
    "UnknownTask",
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
