"""The public surface is a promise: names stay, decorators keep shapes, ids keep their format."""

from __future__ import annotations

import inspect
import random
import re
import time

import pytest

import stepline
from stepline import errors
from stepline.core.ids import idempotent_run_id, new_run_id

# Today's public names. Removing one breaks users' imports: deprecate it
# (keep it working, warn on use) for at least one release instead.
EXPECTED_PUBLIC_NAMES = frozenset({
    # declaring tasks
    "task", "step", "sleep", "idempotency_key", "Task", "Queue", "Retry", "Rule",
    "http_status", "Registry", "default_registry", "load_app", "logger", "wait_for_event",
    "wait_for_token", "create_token", "WaitToken", "RateLimit", "Debounce",
    "Sensitive", "SubjectErased", "KeyStoreError",  # docs/sensitive-data.md
    "wait_for_any", "EventWait", "Timer", "ChildRun", "AnyResult", "backfill", "BackfillReport",
    "emit", "EmitUnsupported",  # docs/emit.md
    # triggering and inspecting runs
    "Client", "RunHandle", "RunState", "StepState",
    "SyncClient", "SyncRunHandle",  # docs/sync-client.md
    # running
    "Worker", "open_log", "DEFAULT_LOG_URL",
    # errors
    "SteplineError", "FatalError", "RetryAfter", "RunFailedError", "NonDeterminismError",
    "PayloadValidationError", "TaskDefinitionError", "UnknownTask", "UnknownRun",
    "InvalidRunState", "NoClient", "NotInRunContext", "LogError", "LogUnavailable",
    "SchemaError", "StepRetriesExhausted",  # docs/concepts.md, "A step's own retries"
    "__version__",
})

RUN_ID_FORMAT = re.compile(r"^run_[0-9A-HJKMNP-TV-Z]{26}$")  # Crockford base32: no I, L, O, U


# --- names ------------------------------------------------------------------------------


def test_every_name_in_all_is_importable_from_stepline() -> None:
    missing = [name for name in stepline.__all__ if not hasattr(stepline, name)]

    assert not missing, f"stepline.__all__ lists names the package does not define: {missing}"


def test_all_has_no_duplicates() -> None:
    assert len(stepline.__all__) == len(set(stepline.__all__))


def test_no_public_name_disappears() -> None:
    gone = sorted(EXPECTED_PUBLIC_NAMES - set(stepline.__all__))

    assert not gone, (
        f"public names removed from stepline.__all__: {gone}. Users import these: "
        "deprecate them (keep them working and warn) instead of removing them. "
        "New names are fine; add them to EXPECTED_PUBLIC_NAMES."
    )


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from stepline import *", namespace)  # noqa: S102  # the way users spell it

    assert set(namespace) - {"__builtins__"} == set(stepline.__all__)


def test_the_version_is_a_string() -> None:
    assert isinstance(stepline.__version__, str) and stepline.__version__


# --- the error tree ------------------------------------------------------------------------


def _error_classes(namespace: object) -> list[type[BaseException]]:
    return [
        value
        for value in vars(namespace).values()
        if isinstance(value, type) and issubclass(value, BaseException)
    ]


@pytest.mark.parametrize(
    "cls",
    [getattr(stepline, n) for n in stepline.__all__ if isinstance(getattr(stepline, n), type)
     and issubclass(getattr(stepline, n), BaseException)],
    ids=lambda c: c.__name__,
)
def test_every_public_error_derives_from_stepline_error(cls: type[BaseException]) -> None:
    assert issubclass(cls, stepline.SteplineError)


def test_every_error_the_package_defines_derives_from_stepline_error() -> None:
    strays = [
        c.__name__ for c in _error_classes(errors)
        if c.__module__ == errors.__name__ and not issubclass(c, errors.SteplineError)
    ]

    assert not strays
    assert len(_error_classes(errors)) > 10  # the tree is really there


def test_the_public_error_names_are_the_classes_the_error_module_defines() -> None:
    for name in stepline.__all__:
        value = getattr(stepline, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert getattr(errors, name) is value


# --- decorators keep the shape of what they wrap ---------------------------------------------


async def process_order(payload: dict[str, int]) -> str:
    """Charge and ship one order."""
    return "ok"


async def charge(order_id: str, amount: int, *, currency: str = "EUR") -> dict[str, str]:
    """Charge a card."""
    return {"order_id": order_id}


def test_task_keeps_the_function_it_wraps() -> None:
    registry = stepline.Registry()

    declared = stepline.task(id="process-order", registry=registry)(process_order)

    assert isinstance(declared, stepline.Task)
    assert declared.__wrapped__ is process_order
    assert inspect.unwrap(declared) is process_order
    assert declared.__doc__ == process_order.__doc__
    assert declared.id == "process-order"
    assert registry.get("process-order") is declared


def test_task_without_an_id_is_named_after_the_function() -> None:
    registry = stepline.Registry()

    declared = stepline.task(registry=registry)(process_order)

    assert declared.id == "process-order"


def test_step_keeps_the_function_name_and_signature() -> None:
    bare = stepline.step(charge)
    named = stepline.step(name="charge-card")(charge)

    for wrapped in (bare, named):
        assert wrapped.__name__ == "charge"
        assert wrapped.__qualname__ == charge.__qualname__
        assert wrapped.__doc__ == charge.__doc__
        assert inspect.signature(wrapped) == inspect.signature(charge)
        assert inspect.iscoroutinefunction(wrapped)
        assert inspect.unwrap(wrapped) is charge


async def test_a_step_outside_a_run_is_a_plain_call() -> None:
    assert await stepline.step(charge)("o-1", 5) == {"order_id": "o-1"}


# --- ids ---------------------------------------------------------------------------------------


def test_idempotent_run_ids_are_deterministic() -> None:
    assert idempotent_run_id("process-order", "order-42") == idempotent_run_id("process-order", "order-42")


def test_idempotent_run_ids_differ_across_tasks_and_keys() -> None:
    ids = {
        idempotent_run_id("process-order", "order-42"),
        idempotent_run_id("process-order", "order-43"),
        idempotent_run_id("refund-order", "order-42"),
        # the separator keeps the task id and key apart: "a"+"bc" is not "ab"+"c"
        idempotent_run_id("a", "bc"),
        idempotent_run_id("ab", "c"),
    }

    assert len(ids) == 5
    assert all(RUN_ID_FORMAT.match(i) for i in ids)


def test_the_idempotent_run_id_format_is_frozen() -> None:
    # NEVER change this value: logs hold runs under ids derived this way, and a
    # repeated trigger with the same key must land on the same run forever.
    # If this fails, the derivation in stepline/ids.py changed: revert it.
    assert idempotent_run_id("process-order", "order-42") == "run_19C5YV2GDBRBPSQEXX9KPQ8TGD"


def test_new_run_ids_have_the_documented_format() -> None:
    assert RUN_ID_FORMAT.match(new_run_id())
    assert RUN_ID_FORMAT.match(new_run_id(0))
    assert RUN_ID_FORMAT.match(new_run_id(2**48 - 1))


def test_new_run_ids_sort_by_creation_time() -> None:
    # Milliseconds spanning small values, a bit-boundary and today's clock.
    times = [0, 1, 2, 31, 32, 1023, 1024, 2**32 - 1, 2**32, 1_700_000_000_000, 1_700_000_000_001, 2**48 - 1]
    ids = [new_run_id(t) for t in times]
    shuffled = ids[:]
    random.Random(7).shuffle(shuffled)

    assert sorted(shuffled) == ids


def test_a_new_run_id_is_stamped_with_the_current_time_and_is_unique() -> None:
    before = int(time.time() * 1000)
    ids = [new_run_id() for _ in range(200)]
    after = int(time.time() * 1000)

    assert all(before <= ids_ms(i) <= after for i in ids)
    assert len(set(ids)) == len(ids)  # 80 random bits apart within one millisecond


def ids_ms(run_id: str) -> int:
    """The millisecond timestamp a run id carries (its first 10 characters)."""
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    value = 0
    for ch in run_id[4:]:
        value = value * 32 + alphabet.index(ch)
    return value >> 80


def test_a_run_id_carries_the_time_it_was_made() -> None:
    assert ids_ms(new_run_id(1_700_000_000_123)) == 1_700_000_000_123


def test_run_ids_made_in_one_millisecond_sort_in_the_order_they_were_made() -> None:
    ids = [new_run_id(now_ms=1_800_000_000_000) for _ in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50


def test_a_forked_child_gets_its_own_event_id_prefix() -> None:
    import os

    from stepline.core.ids import new_event_id

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports its id and leaves at once
        os.write(write, new_event_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    assert child[:16] != new_event_id()[:16]
