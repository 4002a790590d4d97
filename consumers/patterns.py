"""Event filters: which domain events a subscription receives.

Both kinds of pattern compile once, when the subscription is declared, and a
malformed one raises `PatternError` there, naming the JSON path of the mistake,
so a typo never becomes a subscription that silently matches nothing.

Event names (`compile_name`): `user.created` matches exactly; a `*` segment
matches one segment (`user.*` matches `user.created`, not `user`,
`users.created` or `user.created.v2`); `*` alone matches every name.

Event data (`compile_where`), in the style of Amazon EventBridge:

| pattern (value of a field)          | matches a field value that...                |
|-------------------------------------|----------------------------------------------|
| `"pro"`, `3`, `2.5`, `True`, `None` | equals it (bools are not numbers)            |
| `["pro", {"prefix": "x-"}]`         | matches any of the alternatives              |
| `{"country": "DE"}`                 | is an object matching the nested pattern     |
| `{"prefix": "ord-"}`                | is a string with that start (`suffix`: end)  |
| `{"equals-ignore-case": "Pro"}`     | is a string equal to it ignoring case        |
| `{"wildcard": "user-*-eu"}`         | is a string; `*` is any run, `\\*` a star     |
| `{"numeric": [">=", 10, "<", 20]}`  | is a number (not bool) meeting 1 or 2 bounds |
| `{"exists": True}` / `False`        | is present (even null) / is absent           |
| `{"anything-but": v}`               | is present and does not match `v`: a value,  |
|                                     | values, or prefix/suffix/ignore-case/wildcard|

All keys of a pattern object must match. A list-valued field matches if ANY
element does (nested lists flatten; a nested pattern must match one object
element whole). A missing field matches only `{"exists": False}`, so
`anything-but` does not match it, as in EventBridge; the fields of a non-object
are missing. A one-key object whose key is an operator is an operator, any
other object a nested pattern; within alternatives an object must be an
operator, so a misspelt one is caught there.

A callable `where(data)` has its result coerced to bool, and what it raises
propagates unchanged rather than being guessed to mean "no match": the consumer
catches it, skips that one subscription and reports it, so a broken predicate
never blocks the others. `where=None` matches every event.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from stepline.errors import SteplineError

__all__ = ["Matcher", "PatternError", "compile_name", "compile_where", "match_name"]

Matcher = Callable[[Mapping[str, Any]], bool]
# A field test receives the field's raw value, or _MISSING when it is absent.
FieldTest = Callable[[Any], bool]
# A value test receives one scalar (a single element of a list-valued field).
ValueTest = Callable[[Any], bool]


class PatternError(SteplineError, ValueError):
    """A subscription's event pattern is malformed; fix it where `path` points."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


_MISSING: Any = object()
_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, "=": operator.eq, ">": operator.gt, ">=": operator.ge,
}
_OPERATORS = (
    "anything-but", "equals-ignore-case", "exists", "numeric", "prefix", "suffix", "wildcard",
)
_STRING_OPERATORS = ("equals-ignore-case", "prefix", "suffix", "wildcard")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


# --- public entry points ---------------------------------------------------


def compile_where(where: Mapping[str, Any] | Callable[[Any], Any] | None) -> Matcher:
    """Compile a data filter once; raise PatternError now if it is malformed."""
    if where is None:
        return lambda data: True
    if isinstance(where, Mapping):
        return _compile_object(where, "where", top=True)
    if callable(where):
        predicate = where

        def call(data: Mapping[str, Any]) -> bool:
            return bool(predicate(data))  # exceptions propagate, see module doc

        return call
    raise PatternError("where", f"needs a pattern object, a callable or None, got {_show(where)}")


def compile_name(pattern: str) -> Callable[[str], bool]:
    """Compile an event-name pattern such as `user.created`, `user.*` or `*`."""
    if not isinstance(pattern, str) or not pattern:
        raise PatternError("event", f"needs a non-empty event name, got {_show(pattern)}")
    if any(ch.isspace() for ch in pattern):
        raise PatternError("event", f"event names have no spaces, got {_show(pattern)}")
    if pattern == "*":
        return lambda name: True
    segments = pattern.split(".")
    for segment in segments:
        if not segment or ("*" in segment and segment != "*"):
            raise PatternError(
                "event", f"segments are non-empty and '*' stands alone in one, got {_show(pattern)}"
            )

    def match(name: str) -> bool:
        parts = name.split(".")
        return len(parts) == len(segments) and all(
            seg == "*" and part != "" or seg == part for seg, part in zip(segments, parts)
        )

    return match


def match_name(pattern: str, name: str) -> bool:
    """One-off form of `compile_name`; subscriptions should compile once."""
    return compile_name(pattern)(name)


# --- objects, alternatives, values -----------------------------------------


def _compile_object(pattern: Mapping[Any, Any], path: str, top: bool = False) -> Matcher:
    # An empty nested object would have to guess between "exists" and "is an
    # object"; at the top it is simply AND over no conditions.
    if not pattern and not top:
        raise PatternError(path, 'empty nested pattern; say {"exists": true} to test presence')
    fields: list[tuple[str, FieldTest]] = []
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise PatternError(path, f"field names are non-empty strings, got {_show(key)}")
        fields.append((key, _compile_field(value, _join(path, key))))

    def match(data: Mapping[str, Any]) -> bool:
        return all(test(data.get(key, _MISSING)) for key, test in fields)

    return match


def _compile_field(value: Any, path: str) -> FieldTest:
    if _is_operator(value):
        return _compile_operator(value, path)
    if isinstance(value, Mapping):
        return _nested(_compile_object(value, path))
    if isinstance(value, list):
        return _compile_alternatives(value, path)
    return _each(_exact(value, path))


def _compile_alternatives(values: list[Any], path: str) -> FieldTest:
    if not values:
        raise PatternError(path, "empty list of alternatives would never match")
    tests: list[FieldTest] = []
    for i, value in enumerate(values):
        where = f"{path}[{i}]"
        if isinstance(value, Mapping):
            _check_operator_shape(value, where)
            tests.append(_compile_operator(value, where))
        elif isinstance(value, list):
            raise PatternError(where, "alternatives are values or operator objects, not lists")
        else:
            tests.append(_each(_exact(value, where)))
    return lambda raw: any(test(raw) for test in tests)


def _nested(match: Matcher) -> FieldTest:
    def test(raw: Any) -> bool:
        objects = [v for v in _flatten(raw) if isinstance(v, Mapping)]
        # Fields of something that is not an object are missing.
        return any(match(obj) for obj in objects) if objects else match({})

    return test


def _each(test: ValueTest) -> FieldTest:
    """Lift a scalar test to a field: absent never matches, lists match on ANY."""
    return lambda raw: raw is not _MISSING and any(test(v) for v in _flatten(raw))


def _exact(expected: Any, path: str) -> ValueTest:
    if expected is None:
        return lambda v: v is None
    if isinstance(expected, bool):
        return lambda v: isinstance(v, bool) and v == expected
    if _is_number(expected):
        _check_not_nan(expected, path)
        return lambda v: _is_number(v) and v == expected
    if isinstance(expected, str):
        return lambda v: isinstance(v, str) and v == expected
    raise PatternError(path, f"unsupported pattern value {_show(expected)}")


# --- operators -------------------------------------------------------------


def _compile_operator(spec: Mapping[str, Any], path: str) -> FieldTest:
    (name, arg), = spec.items()
    if name == "exists":
        if not isinstance(arg, bool):
            raise PatternError(path, f"exists needs true or false, got {_show(arg)}")
        return (lambda raw: raw is not _MISSING) if arg else (lambda raw: raw is _MISSING)
    if name == "anything-but":
        inner = _compile_anything_but(arg, _join(path, name))
        return _each(lambda v: not inner(v))
    if name == "numeric":
        return _each(_compile_numeric(arg, path))
    return _each(_compile_string_operator(name, arg, path))


def _compile_anything_but(arg: Any, path: str) -> ValueTest:
    if isinstance(arg, Mapping):
        if not (len(arg) == 1 and next(iter(arg)) in _STRING_OPERATORS):
            raise PatternError(
                path, f"anything-but takes a value, a list of values or one of "
                f"{', '.join(_STRING_OPERATORS)}; got {_show(arg)}"
            )
        (name, inner), = arg.items()
        return _compile_string_operator(name, inner, path)
    if isinstance(arg, list):
        if not arg:
            raise PatternError(path, "anything-but needs at least one value")
        tests = [_exact(_plain(v, f"{path}[{i}]"), f"{path}[{i}]") for i, v in enumerate(arg)]
        return lambda v: any(test(v) for test in tests)
    return _exact(arg, path)


def _compile_numeric(arg: Any, path: str) -> ValueTest:
    if not isinstance(arg, list) or len(arg) not in (2, 4):
        raise PatternError(path, f"numeric needs an operator and a number, got {_show(arg)}")
    conditions: list[tuple[str, Any]] = []
    for op, bound in zip(arg[::2], arg[1::2]):
        if not (isinstance(op, str) and op in _COMPARE):
            raise PatternError(path, f"numeric operators are {', '.join(_COMPARE)}; got {_show(op)}")
        if not _is_number(bound):
            raise PatternError(path, f"numeric needs a number after {op!r}, got {_show(bound)}")
        _check_not_nan(bound, path)
        conditions.append((op, bound))
    if len(conditions) == 2:
        _check_range(conditions, path)
    checks = [(_COMPARE[op], bound) for op, bound in conditions]
    return lambda v: _is_number(v) and all(cmp(v, bound) for cmp, bound in checks)


def _check_range(conditions: list[tuple[str, Any]], path: str) -> None:
    lower = [c for c in conditions if c[0] in (">", ">=")]
    upper = [c for c in conditions if c[0] in ("<", "<=")]
    if len(lower) != 1 or len(upper) != 1:
        raise PatternError(path, "a numeric range needs one of >, >= and one of <, <=")
    (lo_op, lo), (hi_op, hi) = lower[0], upper[0]
    if lo > hi or (lo == hi and (lo_op == ">" or hi_op == "<")):
        raise PatternError(path, f"numeric range {lo_op} {lo} and {hi_op} {hi} is empty")


def _compile_string_operator(name: str, arg: Any, path: str) -> ValueTest:
    if not isinstance(arg, str):
        raise PatternError(path, f"{name} needs a string, got {_show(arg)}")
    if name == "prefix":
        return lambda v: isinstance(v, str) and v.startswith(arg)
    if name == "suffix":
        return lambda v: isinstance(v, str) and v.endswith(arg)
    if name == "equals-ignore-case":
        folded = arg.casefold()
        return lambda v: isinstance(v, str) and v.casefold() == folded
    regex = re.compile(_wildcard_regex(arg), re.DOTALL)
    return lambda v: isinstance(v, str) and regex.fullmatch(v) is not None


def _wildcard_regex(pattern: str) -> str:
    tokens = re.split(r"(\\\\|\\\*|\*)", pattern)
    return "".join(
        ".*" if tok == "*" else re.escape(tok[1]) if tok in ("\\*", "\\\\") else re.escape(tok)
        for tok in tokens
    )


# --- helpers ---------------------------------------------------------------


def _is_operator(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) == 1 and next(iter(value)) in _OPERATORS


def _check_operator_shape(value: Mapping[Any, Any], path: str) -> None:
    if len(value) != 1:
        raise PatternError(path, f"an operator object has exactly one key, got {_show(value)}")
    name = next(iter(value))
    if name not in _OPERATORS:
        raise PatternError(path, f"unknown operator {_show(name)}; known: {', '.join(_OPERATORS)}")


def _plain(value: Any, path: str) -> Any:
    if isinstance(value, (Mapping, list)):
        raise PatternError(path, f"anything-but lists hold plain values, got {_show(value)}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_not_nan(value: Any, path: str) -> None:
    if isinstance(value, float) and math.isnan(value):
        raise PatternError(path, "NaN never equals or compares with anything")


def _flatten(raw: Any) -> Iterator[Any]:
    if isinstance(raw, list):
        for item in raw:
            yield from _flatten(item)
    else:
        yield raw


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if _PLAIN_KEY.match(key) else f"{path}[{json.dumps(key)}]"


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
