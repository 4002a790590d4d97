"""Retry policies: exponential (default), fixed, custom, and per-error rules.

A policy answers one question: after attempt N failed with error E, how long
until attempt N+1, or None to give up. Rules pick a policy by error type
(or a predicate), so timeouts, rate limits and auth failures can each get
their own treatment. Classification is explicit: matched on types or
attributes, never on message text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from pydantic import ValidationError

from stepline.errors import (
    FatalError,
    NonDeterminismError,
    PayloadValidationError,
    RetryAfter,
    TaskDefinitionError,
)

Seconds = float | int | timedelta


def _secs(value: Seconds) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class _Random(Protocol):
    """What jitter needs: a `random.Random`, or the `random` module itself."""

    def random(self) -> float: ...


class DelayFunction(Protocol):
    def __call__(self, attempt: int, error: BaseException) -> Seconds | None: ...


ErrorMatcher = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]

# Errors that re-running cannot fix: never retried, whatever the policy.
NEVER_RETRY: tuple[type[BaseException], ...] = (
    FatalError,
    NonDeterminismError,
    PayloadValidationError,
    ValidationError,
)


def retry_after_of(error: BaseException) -> float | None:
    """The server-requested delay carried by an error, if any.

    Honoured from `RetryAfter`, or any exception with a numeric
    `retry_after` attribute (seconds), as HTTP client errors often have.
    """
    if isinstance(error, RetryAfter):
        return error.retry_after
    value = getattr(error, "retry_after", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    return None


@dataclass(frozen=True)
class Rule:
    """Use `policy` for errors that `match` accepts."""

    match: ErrorMatcher
    policy: Retry

    def matches(self, error: BaseException) -> bool:
        m = self.match
        if isinstance(m, type) or isinstance(m, tuple):
            return isinstance(error, m)
        return bool(m(error))


def http_status(*codes: int) -> Callable[[BaseException], bool]:
    """Match errors carrying an HTTP status (`status_code`, `status` or `response.status_code`)."""

    wanted = frozenset(codes)

    def matcher(error: BaseException) -> bool:
        for holder in (error, getattr(error, "response", None)):
            for attr in ("status_code", "status"):
                value = getattr(holder, attr, None)
                if isinstance(value, int) and value in wanted:
                    return True
        return False

    matcher.__name__ = f"http_status{tuple(sorted(wanted))}"
    return matcher


@dataclass(frozen=True)
class Retry:
    """When to try again.

    Exponential by default, as Trigger.dev does it: the n-th retry waits
    min_timeout * factor**(n-1), capped at max_timeout, with jitter (a
    random factor in [1, 2)) unless `randomize=False`. `max_attempts`
    counts every attempt, the first one included. A `Retry-After` hint
    (`honor_retry_after`) replaces the computed delay, capped at
    max_timeout too (or at the fixed delay, when that is longer).
    """

    max_attempts: int = 3
    factor: float = 2.0
    min_timeout: Seconds = 1.0
    max_timeout: Seconds = 60.0
    randomize: bool = True
    fixed: Seconds | None = None
    honor_retry_after: bool = True
    custom: DelayFunction | None = None
    rules: Sequence[Rule] = field(default=())

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise TaskDefinitionError(f"Retry.max_attempts must be >= 1, got {self.max_attempts}")
        if self.factor < 1:
            raise TaskDefinitionError(f"Retry.factor must be >= 1, got {self.factor}")
        if _secs(self.min_timeout) < 0 or _secs(self.max_timeout) < _secs(self.min_timeout):
            raise TaskDefinitionError("Retry needs 0 <= min_timeout <= max_timeout")
        if self.fixed is not None and _secs(self.fixed) < 0:
            raise TaskDefinitionError(f"Retry fixed delay must be >= 0, got {self.fixed}")

    # --- constructors --------------------------------------------------

    @classmethod
    def exponential(cls, max_attempts: int = 3, *, factor: float = 2.0,
                    min_timeout: Seconds = 1.0, max_timeout: Seconds = 60.0,
                    randomize: bool = True) -> Retry:
        return cls(max_attempts, factor, min_timeout, max_timeout, randomize)

    @classmethod
    def fixed_delay(cls, delay: Seconds, max_attempts: int = 3, *,
                    honor_retry_after: bool = True) -> Retry:
        return cls(max_attempts=max_attempts, fixed=delay, honor_retry_after=honor_retry_after)

    @classmethod
    def with_function(cls, fn: DelayFunction, max_attempts: int = 1000) -> Retry:
        """`fn(attempt, error)` returns the delay, or None to stop retrying."""
        return cls(max_attempts=max_attempts, custom=fn)

    @classmethod
    def never(cls) -> Retry:
        return cls(max_attempts=1)

    def on(self, match: ErrorMatcher, policy: Retry) -> Retry:
        """A copy of this policy that uses `policy` for errors `match` accepts."""
        return Retry(
            self.max_attempts, self.factor, self.min_timeout, self.max_timeout,
            self.randomize, self.fixed, self.honor_retry_after, self.custom,
            tuple(self.rules) + (Rule(match, policy),),
        )

    # --- the decision ---------------------------------------------------

    def policy_for(self, error: BaseException) -> Retry:
        for rule in self.rules:
            if rule.matches(error):
                return rule.policy.policy_for(error)
        return self

    def next_delay(
        self, attempt: int, error: BaseException, rng: random.Random | None = None
    ) -> float | None:
        """Seconds before the next attempt after `attempt` failed, or None."""
        if isinstance(error, NEVER_RETRY):
            return None
        policy = self.policy_for(error)
        return policy._own_delay(attempt, error, rng or random)

    def _own_delay(
        self, attempt: int, error: BaseException, rng: _Random
    ) -> float | None:
        if attempt >= self.max_attempts:
            return None
        if self.custom is not None:
            d = self.custom(attempt, error)
            return None if d is None else max(0.0, _secs(d))
        if self.honor_retry_after:
            hinted = retry_after_of(error)
            if hinted is not None:
                # The server's hint, within the policy's ceiling: a hint of a
                # day must not park the run past what the task allows. A
                # fixed delay above max_timeout is that policy's ceiling.
                ceiling = max(_secs(self.max_timeout), _secs(self.fixed) if self.fixed is not None else 0.0)
                return min(max(0.0, hinted), ceiling)
        if self.fixed is not None:
            return _secs(self.fixed)
        base = _secs(self.min_timeout) * (self.factor ** (attempt - 1))
        if self.randomize:
            base *= 1.0 + rng.random()
        return min(base, _secs(self.max_timeout))


DEFAULT_RETRY = Retry()
