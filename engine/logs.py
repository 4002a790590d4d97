"""structlog set-up for the CLI: JSON lines for workers, console in dev."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(json_logs: bool = True, level: int = logging.INFO) -> None:
    """Called by the CLI entry points only: a library never configures logging."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_logs else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
