"""Retry policies are pure functions: (attempt, error) -> seconds to wait, or None.

Every test that could draw jitter passes a seeded `random.Random`, so each
run of the suite sees the same numbers.
"""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from pydantic import BaseModel, ValidationError

from stepline import (
    FatalError,
    NonDeterminismError,
    PayloadValidationError,
    Retry,
    RetryAfter,
    Rule,
    TaskDefinitionError,
    http_status,
)
from stepline.sdk.retry import retry_after_of


def rng() -> random.Random:
    return random.Random(1234)


class Flaky(Exception):
    """Any error with no special treatment."""


class HTTPError(Exception):
    """Shaped like the errors of common HTTP clients."""

    def __init__(self, status_code: int, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code
        self.retry_after = retry_after


class WrappedHTTPError(Exception):
    """Status on a `response` object, as httpx.HTTPStatusError carries it."""

    class Response:
        def __init__(self, status_code: int) -> None:
            self.status_code = status_code

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.response = self.Response(status_code)


def a_pydantic_validation_error() -> ValidationError:
    class Order(BaseModel):
        quantity: int

    try:
        Order.model_validate({"quantity": "many"})
    except ValidationError as exc:
        return exc
    raise AssertionError("the model should have rejected the payload")


def delays(policy: Retry, error: BaseException, attempts: range, r: random.Random | None = None) -> list[float | None]:
    r = r or rng()
    return [policy.next_delay(n, error, r) for n in attempts]


# --- exponential ------------------------------------------------------------------------


def test_exponential_without_jitter_doubles_from_min_and_stops_at_max() -> None:
    policy = Retry.exponential(10, factor=2, min_timeout=1, max_timeout=20, randomize=False)

    assert delays(policy, Flaky(), range(1, 10)) == [1, 2, 4, 8, 16, 20, 20, 20, 20]


def test_exponential_uses_the_declared_factor() -> None:
    policy = Retry.exponential(5, factor=3, min_timeout=0.5, max_timeout=100, randomize=False)

    assert delays(policy, Flaky(), range(1, 5)) == [0.5, 1.5, 4.5, 13.5]


def test_timeouts_may_be_timedeltas() -> None:
    policy = Retry.exponential(
        5, min_timeout=timedelta(milliseconds=250), max_timeout=timedelta(seconds=1), randomize=False
    )

    assert delays(policy, Flaky(), range(1, 5)) == [0.25, 0.5, 1.0, 1.0]


def test_jitter_keeps_each_delay_between_the_base_and_twice_the_base_capped_at_max() -> None:
    policy = Retry.exponential(12, factor=2, min_timeout=1, max_timeout=30, randomize=True)
    r = rng()

    for attempt in range(1, 12):
        base = 1 * 2 ** (attempt - 1)
        for _ in range(50):
            d = policy.next_delay(attempt, Flaky(), r)
            assert d is not None
            assert min(base, 30) <= d <= min(2 * base, 30), (attempt, d)


def test_jitter_is_reproducible_with_a_seeded_random() -> None:
    policy = Retry.exponential(6)

    assert delays(policy, Flaky(), range(1, 6), rng()) == delays(policy, Flaky(), range(1, 6), rng())
    assert len(set(delays(policy, Flaky(), range(1, 2), random.Random(s))[0] for s in range(5))) > 1


def test_the_default_policy_is_exponential_with_three_attempts() -> None:
    policy = Retry()

    assert policy.next_delay(1, Flaky(), rng()) is not None
    assert policy.next_delay(2, Flaky(), rng()) is not None
    assert policy.next_delay(3, Flaky(), rng()) is None


# --- max_attempts -------------------------------------------------------------------------


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
def test_max_attempts_counts_the_first_attempt(max_attempts: int) -> None:
    policy = Retry.exponential(max_attempts, randomize=False)
    result = delays(policy, Flaky(), range(1, max_attempts + 2))

    # attempt N failed -> retry while N < max_attempts; the first try is attempt 1
    assert [d is not None for d in result] == [n < max_attempts for n in range(1, max_attempts + 2)]


def test_never_gives_up_after_the_first_attempt() -> None:
    assert Retry.never().next_delay(1, Flaky(), rng()) is None


# --- fixed ---------------------------------------------------------------------------------


def test_fixed_delay_waits_the_same_time_every_attempt() -> None:
    policy = Retry.fixed_delay(2.5, max_attempts=4)

    assert delays(policy, Flaky(), range(1, 5)) == [2.5, 2.5, 2.5, None]


def test_fixed_delay_accepts_a_timedelta() -> None:
    assert Retry.fixed_delay(timedelta(minutes=1)).next_delay(1, Flaky(), rng()) == 60.0


# --- Retry-After --------------------------------------------------------------------------


def test_a_retry_after_error_sets_the_delay() -> None:
    err = RetryAfter("rate limited", retry_after=42)

    assert retry_after_of(err) == 42
    assert Retry.exponential(5).next_delay(1, err, rng()) == 42
    assert Retry.fixed_delay(1, 5).next_delay(1, err, rng()) == 42



def test_a_retry_after_hint_is_capped_by_max_timeout() -> None:
    # A server asking for an hour must not park the run past the policy's own ceiling.
    hour = RetryAfter("rate limited", retry_after=3600)
    assert Retry.exponential(5, max_timeout=30).next_delay(1, hour, rng()) == 30
    assert Retry.exponential(5, max_timeout=30).next_delay(1, HTTPError(429, retry_after=3600), rng()) == 30
    assert Retry.exponential(5, max_timeout=30).next_delay(1, RetryAfter("soon", 12), rng()) == 12
    # A fixed delay longer than max_timeout is the policy's ceiling there: never cut below it.
    assert Retry.fixed_delay(120, 5).next_delay(1, hour, rng()) == 120

def test_a_numeric_retry_after_attribute_on_any_exception_is_honoured() -> None:
    assert Retry.exponential(5).next_delay(1, HTTPError(503, retry_after=7), rng()) == 7.0
    assert Retry.exponential(5).next_delay(1, HTTPError(503, retry_after=7.5), rng()) == 7.5


def test_a_non_numeric_retry_after_attribute_is_not_a_delay() -> None:
    err = HTTPError(503)
    err.retry_after = "soon"  # type: ignore[assignment]  # as a sloppy client might set it
    flag = HTTPError(503)
    flag.retry_after = True  # type: ignore[assignment]  # a bool is not a number of seconds

    assert retry_after_of(err) is None
    assert retry_after_of(flag) is None
    assert retry_after_of(HTTPError(503)) is None
    assert Retry.exponential(5, randomize=False).next_delay(1, err, rng()) == 1.0


def test_a_negative_retry_after_means_retry_now() -> None:
    assert Retry().next_delay(1, RetryAfter("clock skew", retry_after=-3), rng()) == 0.0


def test_retry_after_is_ignored_when_the_policy_says_so() -> None:
    err = RetryAfter("rate limited", retry_after=42)
    exponential = Retry(max_attempts=5, randomize=False, honor_retry_after=False)

    assert Retry.fixed_delay(3, 5, honor_retry_after=False).next_delay(1, err, rng()) == 3
    assert exponential.next_delay(1, err, rng()) == 1.0
    assert exponential.next_delay(1, HTTPError(429, retry_after=42), rng()) == 1.0


def test_retry_after_does_not_extend_max_attempts() -> None:
    err = RetryAfter("rate limited", retry_after=1)

    assert Retry.fixed_delay(5, max_attempts=2).next_delay(2, err, rng()) is None


# --- custom function ------------------------------------------------------------------------


def test_a_custom_function_decides_the_delay_from_attempt_and_error() -> None:
    seen: list[tuple[int, BaseException]] = []

    def linear(attempt: int, error: BaseException) -> float | None:
        seen.append((attempt, error))
        return None if attempt >= 3 else attempt * 10

    err = Flaky()
    policy = Retry.with_function(linear)

    assert delays(policy, err, range(1, 5)) == [10.0, 20.0, None, None]
    assert seen[0] == (1, err)


def test_a_custom_function_may_return_a_timedelta_and_negative_means_now() -> None:
    assert Retry.with_function(lambda n, e: timedelta(seconds=n)).next_delay(3, Flaky(), rng()) == 3.0
    assert Retry.with_function(lambda n, e: -5).next_delay(1, Flaky(), rng()) == 0.0


def test_a_custom_function_is_still_bounded_by_max_attempts() -> None:
    policy = Retry.with_function(lambda n, e: 1, max_attempts=2)

    assert delays(policy, Flaky(), range(1, 3)) == [1.0, None]


# --- per-error rules: the Trigger.dev table ---------------------------------------------------


def trigger_dev_table() -> Retry:
    """Timeouts back off 5 times; 429 waits as told, 10 times; 401 never; the rest 3 times."""
    return (
        Retry.exponential(3, min_timeout=1, max_timeout=60, randomize=False)
        .on(TimeoutError, Retry.exponential(5, min_timeout=2, max_timeout=60, randomize=False))
        .on(http_status(429), Retry.fixed_delay(30, max_attempts=10))
        .on(http_status(401), Retry.never())
    )


def test_timeouts_back_off_exponentially_for_five_attempts() -> None:
    assert delays(trigger_dev_table(), TimeoutError("slow"), range(1, 7)) == [2, 4, 8, 16, None, None]


def test_rate_limits_wait_as_long_as_the_server_asks_for_ten_attempts() -> None:
    table = trigger_dev_table()

    assert delays(table, HTTPError(429, retry_after=12), range(8, 12)) == [12, 12, None, None]
    assert table.next_delay(1, HTTPError(429), rng()) == 30  # no header: the fixed delay


def test_unauthorized_is_never_retried() -> None:
    assert trigger_dev_table().next_delay(1, HTTPError(401), rng()) is None


@pytest.mark.parametrize(
    "error",
    [
        a_pydantic_validation_error(),
        PayloadValidationError("payload of run run_X", "quantity: not an integer"),
    ],
    ids=["pydantic", "stepline"],
)
def test_validation_errors_are_never_retried(error: BaseException) -> None:
    assert trigger_dev_table().next_delay(1, error, rng()) is None
    assert Retry.with_function(lambda n, e: 1).next_delay(1, error, rng()) is None


def test_anything_else_gets_the_default_three_attempts() -> None:
    table = trigger_dev_table()

    assert delays(table, Flaky(), range(1, 5)) == [1, 2, None, None]
    assert delays(table, HTTPError(500), range(1, 4)) == [1, 2, None]


def test_http_status_reads_status_and_the_response_status_code() -> None:
    class Aio(Exception):
        status = 429

    match = http_status(429, 503)

    assert match(HTTPError(429)) and match(HTTPError(503))
    assert match(Aio())
    assert match(WrappedHTTPError(503))
    assert not match(HTTPError(500))
    assert not match(Flaky())


def test_rules_match_by_class_tuple_of_classes_or_predicate() -> None:
    slow = Retry.fixed_delay(11)
    net = Retry.fixed_delay(22)
    odd = Retry.fixed_delay(33)
    policy = (
        Retry.fixed_delay(1)
        .on(TimeoutError, slow)
        .on((ConnectionError, BrokenPipeError), net)
        .on(lambda e: "odd" in e.args, odd)
    )

    assert policy.next_delay(1, TimeoutError(), rng()) == 11
    assert policy.next_delay(1, ConnectionResetError(), rng()) == 22  # a subclass matches
    assert policy.next_delay(1, Flaky("odd"), rng()) == 33
    assert policy.next_delay(1, Flaky("even"), rng()) == 1
    assert Rule(TimeoutError, slow).matches(TimeoutError())
    assert Rule((KeyError, IndexError), net).matches(IndexError())
    assert not Rule(lambda e: False, odd).matches(Flaky())


def test_the_first_matching_rule_wins() -> None:
    policy = Retry.fixed_delay(1).on(OSError, Retry.fixed_delay(5)).on(TimeoutError, Retry.fixed_delay(9))

    assert policy.next_delay(1, TimeoutError(), rng()) == 5  # TimeoutError is an OSError


def test_adding_a_rule_leaves_the_original_policy_unchanged() -> None:
    base = Retry.fixed_delay(1)
    ruled = base.on(TimeoutError, Retry.never())

    assert base.next_delay(1, TimeoutError(), rng()) == 1
    assert ruled.next_delay(1, TimeoutError(), rng()) is None
    assert base.rules == ()


def test_a_rule_uses_its_own_max_attempts_not_the_outer_one() -> None:
    policy = Retry.never().on(TimeoutError, Retry.fixed_delay(1, max_attempts=4))

    assert delays(policy, TimeoutError(), range(1, 5)) == [1, 1, 1, None]
    assert policy.next_delay(1, Flaky(), rng()) is None


# --- errors that re-running cannot fix ----------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [FatalError("card stolen"), NonDeterminismError("run_X", 2, "charge", "refund")],
    ids=["FatalError", "NonDeterminismError"],
)
@pytest.mark.parametrize(
    "policy",
    [
        Retry(),
        Retry.exponential(100),
        Retry.fixed_delay(1, 100),
        Retry.with_function(lambda n, e: 1),
        Retry.never().on(lambda e: True, Retry.fixed_delay(1, 100)),
    ],
    ids=["default", "exponential", "fixed", "custom", "catch-all-rule"],
)
def test_fatal_and_non_determinism_errors_are_never_retried(error: BaseException, policy: Retry) -> None:
    assert policy.next_delay(1, error, rng()) is None


def test_a_fatal_error_with_a_retry_after_is_still_not_retried() -> None:
    err = FatalError("gone")
    err.retry_after = 5  # type: ignore[attr-defined]  # a hint must not override "fatal"

    assert Retry.fixed_delay(1, 10).next_delay(1, err, rng()) is None


# --- invalid definitions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": -1}, "max_attempts"),
        ({"factor": 0.5}, "factor"),
        ({"min_timeout": 10, "max_timeout": 5}, "min_timeout"),
        ({"min_timeout": 10, "max_timeout": 5}, "max_timeout"),
        ({"min_timeout": -1}, "min_timeout"),
        ({"min_timeout": timedelta(minutes=2), "max_timeout": timedelta(minutes=1)}, "max_timeout"),
    ],
)
def test_an_invalid_policy_is_a_definition_error_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(TaskDefinitionError, match=field):
        Retry(**kwargs)  # type: ignore[arg-type]  # the values are wrong on purpose


def test_invalid_constructor_arguments_are_definition_errors_too() -> None:
    with pytest.raises(TaskDefinitionError, match="max_attempts"):
        Retry.fixed_delay(1, max_attempts=0)
    with pytest.raises(TaskDefinitionError, match="factor"):
        Retry.exponential(3, factor=0.9)
    with pytest.raises(TaskDefinitionError, match="max_attempts"):
        Retry.with_function(lambda n, e: 1, max_attempts=0)


def test_a_definition_error_is_a_type_error_for_callers_that_catch_those() -> None:
    with pytest.raises(TypeError):
        Retry(max_attempts=0)
