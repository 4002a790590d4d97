"""Logging: structlog set-up for the CLI, and `sl.logger` for task code.

Inside a run, `sl.logger.info("charged", amount=990)` does two things:

1. logs through structlog with run_id, task_id, attempt and step (the
   journal position, inside a step) bound, plus trace_id/span_id when the
   attempt is traced;
2. records a LogRecorded event on the run (level, message, fields as JSON,
   attempt, step), so the line is part of the run's history on any worker.

A line is recorded once per journal position. A run resumed after a wait
(a sleep, an event, a token, a child) runs its body again from the top,
through the positions its journal holds; lines the body logs on the way
(outside steps, which do not run again) were recorded by the attempt that
first ran that code, so they go to structlog only, marked `replayed=True`.
A retry after a failure is different: the code leading to the failed step
and the step itself run again for real, and their lines are recorded again,
with the new attempt's number.

What is written to the log is bounded, since one chatty loop must not
flood the run's partition: at most MAX_RECORDS_PER_ATTEMPT LogRecorded
events per attempt, the last of them (when lines were dropped) saying how
many; messages are cut at MAX_MESSAGE_BYTES and fields at MAX_FIELDS_BYTES
of JSON, so one record stays within 8 KiB. structlog gets every line in
full. Outside a run, `sl.logger` logs through structlog only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import traceback
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import structlog

from stepline.core.events import LogRecorded
from stepline.observability import otel_env, tracing
from stepline.sdk.context import RunContext, _step_position, current_run
from stepline.sdk.sealing import scrub_line
from stepline.security.sensitive import redact_secret_fields, redact_secrets

# LogRecorded events one attempt may write, the note about dropped lines
# included: the run's projection keeps 1,000 lines (MAX_LOGS_PER_RUN), so a
# first attempt's lines and its note all stay visible there.
MAX_RECORDS_PER_ATTEMPT = 1000
# Per record: a message of at most 2 KiB and fields of at most 6 KiB of
# JSON (UTF-8 bytes), 8 KiB in all.
MAX_MESSAGE_BYTES = 2 * 1024
MAX_FIELDS_BYTES = 6 * 1024

_TRUNCATED = "…[truncated]"


def configure_logging(json_logs: bool = True, level: int = logging.INFO) -> None:
    """Called by the CLI entry points only: a library never configures logging.

    Lines go to stderr, as JSON or for a console (colours only on a
    terminal, never into a file or a pipe). Records of the standard
    `logging` module (aiokafka, asyncio...) at WARNING and above are
    rendered the same way, so under JSON every line of the process is JSON.

    Also installs OpenTelemetry exporters when the standard OTEL_* variables
    ask for them (see `stepline.tracing.configure_from_env`), since every
    long-running `stepline` command sets itself up here.
    """
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        redact_secrets,  # no API token, webhook secret or Kafka password in a line
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_logs
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _bridge_stdlib_logging(shared, renderer, json_logs, max(level, logging.WARNING))
    otel_env.configure_from_env()


def _bridge_stdlib_logging(shared: list[structlog.typing.Processor], renderer: structlog.typing.Processor,
                           json_logs: bool, level: int) -> None:
    """The root logger's handler, rendering other libraries' records as structlog lines.

    Replaces the one an earlier call installed, so configuring twice (tests,
    an app that switches format) does not print every record twice.
    """
    # The logger's name says whose line it is; an exception becomes a field
    # (JSON) or a printed traceback (console).
    last: list[structlog.typing.Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if json_logs:
        last.append(structlog.processors.format_exc_info)
    handler = _StderrHandler()
    handler.setLevel(level)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[*last, renderer],
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is when a record comes (a test's capture
    may have replaced and closed the one there was at configuration)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


@dataclass(slots=True)
class _Budget:
    written: int = 0
    dropped: int = 0


# Per attempt (a RunContext is one attempt, in a worker or an isolated child).
_budgets: WeakKeyDictionary[RunContext, _Budget] = WeakKeyDictionary()


def _cut(text: str, limit: int) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    keep = limit - len(_TRUNCATED.encode())
    return data[:keep].decode(errors="ignore") + _TRUNCATED


def _fields_json(fields: dict[str, Any]) -> str:
    if not fields:
        return "{}"
    text = json.dumps(fields, default=str, ensure_ascii=False, separators=(",", ":"))
    if len(text.encode()) <= MAX_FIELDS_BYTES:
        return text
    # Still a JSON object, so readers can parse it: the start of the original as a preview.
    preview = _cut(text, MAX_FIELDS_BYTES - 64)
    return json.dumps({"_truncated": True, "_preview": preview}, ensure_ascii=False, separators=(",", ":"))


def _retrieve(fut: asyncio.Future[int]) -> None:
    # A log line that could not be written is not worth an unhandled-error
    # report at garbage collection: the attempt's own events fail louder.
    if not fut.cancelled():
        fut.exception()


def _record(ctx: RunContext, level: str, message: str, fields: dict[str, Any], step: int | None) -> None:
    budget = _budgets.get(ctx)
    if budget is None:
        budget = _budgets[ctx] = _Budget()
    if budget.written >= MAX_RECORDS_PER_ATTEMPT - 1:
        budget.dropped += 1  # the last record of the attempt is kept for note_dropped
        return
    budget.written += 1
    body = LogRecorded(level, _cut(message, MAX_MESSAGE_BYTES), ctx.attempt, _fields_json(fields), step)
    ctx.emit(body).add_done_callback(_retrieve)


def note_dropped(ctx: RunContext) -> None:
    """At the end of an attempt's body: say how many lines the cap dropped, if any.

    Called by the runner before the attempt's outcome is recorded.
    """
    if not _budgets:  # nothing logged anywhere: skip the weak mapping's slower pop
        return
    budget = _budgets.pop(ctx, None)
    if budget is None or not budget.dropped:
        return
    message = (f"{budget.dropped} more log line(s) of attempt {ctx.attempt} were not recorded "
               f"(at most {MAX_RECORDS_PER_ATTEMPT} per attempt)")
    body = LogRecorded("warning", message, ctx.attempt, json.dumps({"dropped": budget.dropped}), None)
    ctx.emit(body).add_done_callback(_retrieve)


class RunLogger:
    """`sl.logger`: structured logs that, inside a run, are also recorded on it."""

    def __init__(self, name: str = "stepline.task") -> None:
        self.name = name

    def debug(self, message: str, **fields: Any) -> None:
        self._log("debug", message, fields)

    def info(self, message: str, **fields: Any) -> None:
        self._log("info", message, fields)

    def warning(self, message: str, **fields: Any) -> None:
        self._log("warning", message, fields)

    def error(self, message: str, **fields: Any) -> None:
        self._log("error", message, fields)

    def exception(self, message: str, **fields: Any) -> None:
        """An error with the exception being handled (its traceback as field `exception`)."""
        exc = sys.exc_info()[1]
        if exc is not None:
            fields = {**fields, "exception": "".join(traceback.format_exception(exc))}
        self._log("error", message, fields)

    def _log(self, level: str, message: str, fields: dict[str, Any]) -> None:
        ctx = current_run()
        fields = redact_secret_fields(fields)
        if ctx is not None:  # the run's sensitive values, cut out of both destinations
            message, fields = scrub_line(ctx, message, fields)
        bound: dict[str, Any] = dict(fields)
        if "event" in bound:  # structlog's name for the message itself
            bound["event_"] = bound.pop("event")
        step: int | None = None
        if ctx is not None:
            step = _step_position.get()
            bound.update(run_id=ctx.run_id, task_id=ctx.task_id, attempt=ctx.attempt)
            if step is not None:
                bound["step"] = step
            ids = tracing.current_ids()
            if ids is not None:
                bound["trace_id"], bound["span_id"] = ids
            if step is None and ctx.resuming():
                bound["replayed"] = True
            else:
                _record(ctx, level, message, fields, step)
        # A fresh lazy proxy per line, so the configuration in force now applies
        # (and a test's capture_logs sees it), whatever was cached before.
        getattr(structlog.get_logger(self.name), level)(message, **bound)


logger = RunLogger()

__all__ = ["MAX_RECORDS_PER_ATTEMPT", "RunLogger", "configure_logging", "logger", "note_dropped"]
