"""`stepline.frozen.fast_init`: a faster __init__ for frozen slotted
dataclasses must build exactly what the one @dataclass wrote builds, and
must leave alone every class where it could not promise that."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import InitVar, dataclass, field

import pytest

import stepline.core.events as events
from stepline.core.frozen import fast_init
from stepline.projections.runs import RunState, StepState


def twins() -> tuple[type, type]:
    """The same class twice: one keeps @dataclass's __init__, one gets fast_init."""

    def make() -> type:
        @dataclass(frozen=True, slots=True)
        class Thing:
            a: int
            b: str = "b"
            c: tuple[int, ...] = ()
            d: dict[str, str] = field(default_factory=dict)
            e: int | None = None

        return Thing

    plain, fast = make(), make()
    assert fast_init(fast)
    return plain, fast


@pytest.mark.parametrize(("args", "kwargs"), [
    ((1,), {}),
    ((1, "x", (2, 3), {"k": "v"}, 5), {}),
    ((), {"a": 1, "e": 7}),
    ((1,), {"d": {"given": "yes"}, "b": "y"}),
])
def test_it_builds_what_the_dataclass_init_builds(args: tuple[object, ...],
                                                  kwargs: dict[str, object]) -> None:
    plain, fast = twins()
    want, got = plain(*args, **kwargs), fast(*args, **kwargs)
    assert dataclasses.asdict(got) == dataclasses.asdict(want)
    assert repr(got).replace(fast.__qualname__, "X") == repr(want).replace(plain.__qualname__, "X")


def test_defaults_factories_and_frozenness_behave_as_before() -> None:
    _, fast = twins()
    one, two = fast(1), fast(2)
    assert one.d == {} and one.d is not two.d  # a fresh dict per object
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.a = 3
    with pytest.raises(TypeError):
        fast()  # a is required
    with pytest.raises(TypeError):
        fast(1, nonsense=2)
    assert list(inspect.signature(fast).parameters) == ["a", "b", "c", "d", "e"]
    assert "<factory>" in str(inspect.signature(fast))


def test_classes_it_cannot_vouch_for_are_left_alone() -> None:
    @dataclass(frozen=True, slots=True)
    class WithPostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class WithInitVar:
        a: int
        b: InitVar[int] = 0

    @dataclass(frozen=True, slots=True, kw_only=True)
    class KeywordOnly:
        a: int

    @dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(frozen=True, slots=True)
    class NotInInit:
        a: int
        b: int = field(default=0, init=False)

    class HandWritten:
        def __init__(self, a: int) -> None:
            self.a = a

    for cls in (WithPostInit, WithInitVar, KeywordOnly, NotFrozen, NoSlots, NotInInit, HandWritten):
        before = cls.__init__
        assert fast_init(cls) is False, cls.__name__
        assert cls.__init__ is before


def test_the_engine_s_events_and_run_states_use_it() -> None:
    classes = [events.Event, events.Payload, events.StepCompleted, events.RunTriggered,
               StepState, RunState]
    for cls in classes:
        assert "_set_" in " ".join(cls.__init__.__code__.co_names), cls.__name__
    payload = events.Payload("application/json", b"1")
    event = events.Event("e1", "StepCompleted", "r1", "t", 3, 1000, 2,
                         events.StepCompleted(1, "a", 1, payload))
    assert event.extra == {} and event.traceparent is None
    assert dataclasses.replace(event, seq=4).seq == 4
