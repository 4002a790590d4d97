"""One error tree. Leaves say what was wrong and what to do about it."""

from __future__ import annotations

from datetime import timedelta


class SteplineError(Exception):
    """Root of every error Stepline raises on purpose."""


# --- the log ---------------------------------------------------------------


class LogError(SteplineError):
    """Something went wrong talking to the log."""

    retriable: bool = False


class LogUnavailable(LogError):
    """The log could not be reached or opened."""

    retriable = True


class UnknownTopic(LogError):
    pass


class LogLocked(LogError):
    """Another process holds the embedded log's single-worker lock."""

    retriable = True


class InvalidLogUrl(LogError, ValueError):
    pass


class LogWriteFailed(LogError):
    """The log could not make an append durable (disk full, I/O error, locked).

    Nothing of the failed batch was written; retry once the cause is gone.
    """

    retriable = True


class RetentionUnsupported(LogError):
    """The log cannot remove records (memory://): `stepline prune` needs the
    embedded sqlite log or Kafka."""


class LogCorrupted(LogError):
    """The log's stored data is damaged: a torn or overwritten file.

    Refused rather than read around, so that no acknowledged event goes
    missing without a word; restore the file from a copy, or salvage it
    (`sqlite3 FILE .recover`) and check what it kept.
    """


# --- schemas and encoding --------------------------------------------------


class SchemaError(SteplineError):
    """An event could not be encoded or decoded."""


class UnknownSchemaVersion(SchemaError):
    """The bytes carry a schema fingerprint this build does not know."""


class MalformedEvent(SchemaError):
    """The bytes are not a valid single-object-encoded Stepline event."""


# --- definitions -----------------------------------------------------------


class TaskDefinitionError(SteplineError, TypeError):
    """A task, step, retry policy or queue was declared wrongly."""


class UnknownTask(SteplineError, LookupError):
    def __init__(self, task_id: str, known: list[str] | None = None, *, reason: str | None = None) -> None:
        hint = f"; known tasks: {', '.join(sorted(known))}" if known else ""
        super().__init__(reason or f"unknown task id {task_id!r}{hint}")
        self.task_id = task_id
        self.reason = reason


class UnknownPool(SteplineError, ValueError):
    """A worker pool name that is not valid, or that no task of the app declares."""

    def __init__(self, pool: str, known: list[str] | None = None, *, reason: str | None = None) -> None:
        if reason is None:
            hint = f" (the app's pools: {', '.join(sorted(known))})" if known else ""
            reason = f"no task of the app declares pool {pool!r}{hint}"
        super().__init__(reason)
        self.pool = pool


class UnknownRun(SteplineError, LookupError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run with id {run_id!r} on this log")
        self.run_id = run_id


class InvalidRunState(SteplineError):
    """The run is not in a state that allows the requested operation."""


class InvalidFork(InvalidRunState):
    """A fork asked for what the original run's history cannot give: a fork
    point past its journal, a step before it that never completed, or an
    edit of a step outside the copied prefix."""


# --- payloads --------------------------------------------------------------


class PayloadValidationError(SteplineError, ValueError):
    """A payload or recorded output does not fit the declared type."""

    def __init__(self, where: str, detail: str) -> None:
        super().__init__(f"{where}: {detail}")
        self.where = where
        self.detail = detail


class InvalidEventName(SteplineError, ValueError):
    """An event name must be a non-empty dotted name without spaces."""


# --- serving ---------------------------------------------------------------


class ServeConfigError(SteplineError, ValueError):
    """The HTTP server was configured wrongly: no API token, a bad webhook source."""


# --- running ---------------------------------------------------------------


class NonDeterminismError(SteplineError):
    """The task code no longer matches the run's recorded journal.

    Raised when a step at a given position has a different name than the one
    recorded; the run fails without retry, since re-running would diverge
    the same way. Deploy the change as a new task version instead.
    """

    def __init__(self, run_id: str, step: int, expected: str, got: str) -> None:
        super().__init__(
            f"run {run_id}: step {step} is {got!r} in the code but {expected!r} in "
            f"the journal; the task changed under a run in flight"
        )
        self.run_id = run_id
        self.step = step
        self.expected = expected
        self.got = got


class RunFailedError(SteplineError):
    """Raised by `handle.result()` when the run ended without an output."""

    def __init__(self, run_id: str, status: str, error_type: str, message: str) -> None:
        super().__init__(f"run {run_id} {status}: {error_type}: {message}")
        self.run_id = run_id
        self.status = status
        self.error_type = error_type
        self.message = message


class StepRetriesExhausted(SteplineError):
    """A step with its own retry policy had already given up when its run
    was resumed (its worker died before recording the attempt's end): the
    step is not run again, and this takes its last error's place under the
    task's retry policy."""

    def __init__(self, run_id: str, step: int, name: str, tries: int, error_type: str, message: str) -> None:
        super().__init__(f"step {step} ({name}) of run {run_id} gave up after {tries} tr"
                         f"{'ies' if tries != 1 else 'y'}: {error_type}: {message}")
        self.run_id = run_id
        self.step = step
        self.error_type = error_type


class NotInRunContext(SteplineError, RuntimeError):
    """A step or durable wait was used outside a running task."""


class NoClient(SteplineError, RuntimeError):
    """A trigger was made with no client: open `stepline.Client(url)` first."""


class FatalError(SteplineError):
    """Raise from a task to fail the run now, without retries."""


class EmitUnsupported(FatalError):
    """`stepline.emit` was called where records cannot be written atomically
    with the step's checkpoint. Never retried: the next attempt would run
    on the same log."""

    def __init__(self, where: str) -> None:
        super().__init__(
            f"stepline.emit needs a kafka:// log with transactions, and a task that runs "
            f"in the worker process; here: {where}. memory:// and sqlite:// logs, tasks with "
            f"isolation='process', and kafka:// URLs with transactions=false cannot write "
            f"a Kafka topic in the same transaction as a step's checkpoint"
        )
        self.where = where

    def __reduce__(self) -> tuple[type[EmitUnsupported], tuple[str]]:
        return (type(self), (self.where,))


class RetryAfter(SteplineError):
    """Raise from a task to retry after a given delay (e.g. HTTP 429)."""

    def __init__(self, message: str, retry_after: float | timedelta) -> None:
        super().__init__(message)
        self.retry_after: float = (
            retry_after.total_seconds() if isinstance(retry_after, timedelta) else float(retry_after)
        )


class InvalidToken(SteplineError, ValueError):
    """A wait token that is malformed, unknown, or already used."""


class ChildRunFailed(SteplineError):
    """Raised in a parent by `trigger_and_wait` when the child run failed or
    was cancelled. Its error is recorded, so every replay raises it again."""

    def __init__(self, child_run_id: str, task_id: str, error_type: str, message: str) -> None:
        super().__init__(f"child run {child_run_id} ({task_id}) failed: {error_type}: {message}")
        self.child_run_id = child_run_id
        self.task_id = task_id
        self.error_type = error_type
        self.message = message


# --- flow control ----------------------------------------------------------


class MaxDurationExceeded(SteplineError):
    """An attempt ran past its task's `max_duration` and was cancelled (or its
    child process killed). A failure like any other: the retry policy decides."""

    def __init__(self, task_id: str, limit: float, attempt: int) -> None:
        super().__init__(
            f"task {task_id!r} exceeded its max_duration of {limit:g} s on attempt {attempt}"
        )
        self.task_id = task_id
        self.limit = limit
        self.attempt = attempt

    def __reduce__(self) -> tuple[type[MaxDurationExceeded], tuple[str, float, int]]:
        return (type(self), (self.task_id, self.limit, self.attempt))


class IsolationError(SteplineError):
    """The child process of a task with isolation="process" could not run or
    finish the attempt (the app did not import, the task was not found)."""


class ChildProcessDied(IsolationError):
    """The child process running an isolated attempt ended without reporting an
    outcome: a crash, a signal, the memory limit, or `sys.exit` in the task."""

    def __init__(self, task_id: str, attempt: int, returncode: int | None) -> None:
        super().__init__(f"the child process of task {task_id!r} died on attempt {attempt}: {_death(returncode)}")
        self.task_id = task_id
        self.attempt = attempt
        self.returncode = returncode

    def __reduce__(self) -> tuple[type[ChildProcessDied], tuple[str, int, int | None]]:
        return (type(self), (self.task_id, self.attempt, self.returncode))


def _death(returncode: int | None) -> str:
    """A process's end in words: a negative return code is the signal that killed it."""
    import signal

    if returncode is None:
        return "it closed its connection and did not exit"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit code {returncode}"


class PayloadTooLarge(SteplineError, ValueError):
    """A payload or event data over the client's size limit; nothing was appended."""


# --- sensitive data (engine/security/sensitive.py, engine/security/keystore.py) ----------------


class KeyStoreError(SteplineError):
    """The key store of sensitive fields is missing, unreachable or misconfigured.

    Retriable: a worker pointed at the wrong store (or none) fails the attempt,
    and the run's retry policy gives the operator time to fix the setting.
    """

    retriable = True


class KeyNotFound(KeyStoreError):
    """A sensitive field was encrypted with a key this key store never had.

    Not an erasure (that leaves a tombstone): the process reads a different
    key store than the one that encrypted, e.g. a worker on another host
    without STEPLINE_KEYS pointing at the shared store.
    """

    def __init__(self, kid: str, store: str) -> None:
        super().__init__(
            f"key {kid} of a sensitive field is not in the key store {store}, and was never "
            f"erased there: every process (clients, workers, the API) must use the same key "
            f"store (STEPLINE_KEYS, or Client(keys=...) / Worker(keys=...))"
        )
        self.kid = kid
        self.store = store

    def __reduce__(self) -> tuple[type[KeyNotFound], tuple[str, str]]:
        return (type(self), (self.kid, self.store))


class SubjectErased(FatalError):
    """The run's sensitive fields belong to a subject that was forgotten.

    Never retried: the key is gone for good, so no attempt can read them.
    Names the key id only, since the message is recorded on the log.
    """

    def __init__(self, kid: str) -> None:
        super().__init__(
            f"the sensitive fields of this run were erased (key {kid} was deleted by "
            f"`stepline forget`): the run cannot read its payload any more"
        )
        self.kid = kid

    def __reduce__(self) -> tuple[type[SubjectErased], tuple[str]]:
        return (type(self), (self.kid,))
