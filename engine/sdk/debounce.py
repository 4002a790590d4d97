"""Debounce: of the triggers of one key within a quiet period, only the last runs.

`@sl.task(..., debounce=sl.Debounce(timedelta(seconds=30), key=lambda p: p["account"]))`.
A trigger starts a run `period` from now, or, while the key's current run has
not started yet, replaces that run's payload and pushes its start back to
`period` from now. Once that run has started, the next trigger opens the
key's next generation.

On the log this is a repeated RunTriggered whose idempotency key carries
the `stepline/debounce/` prefix: the fold lets such a trigger replace the
payload and start time of a run that is still pending and never started,
and ignores it otherwise (see projections/runs.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from stepline.errors import TaskDefinitionError
from stepline.projections.runs import DEBOUNCE_PREFIX as PREFIX


@dataclass(frozen=True)
class Debounce:
    period: timedelta | float
    # The payload's debounce key; None debounces every trigger of the task together.
    key: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if self.period_ms <= 0:
            raise TaskDefinitionError(f"Debounce: period must be positive, got {self.period!r}")
        if self.key is not None and not callable(self.key):
            raise TaskDefinitionError("Debounce: key must be a callable of the payload, or None")

    @property
    def period_ms(self) -> int:
        seconds = self.period.total_seconds() if isinstance(self.period, timedelta) else float(self.period)
        return int(seconds * 1000)

    def key_of(self, payload: Any, generation: int) -> str:
        """The idempotency key of a generation. NEVER change this format:
        pending debounced runs are found by it."""
        value = "" if self.key is None else str(self.key(payload))
        return f"{PREFIX}{value}#{generation}"


def is_debounce_key(key: str | None) -> bool:
    return key is not None and key.startswith(PREFIX)
