"""User values <-> Payload bytes, typed by the function's annotations.

Payloads, step outputs and run outputs travel as JSON bytes. When a
function declares a type (a pydantic model, a dataclass, `dict[str, int]`,
...) the value is validated against it on the way back, so a replayed step
returns what the code expects, not a bare dict.
"""

from __future__ import annotations

import inspect
import json
import typing
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError
from pydantic_core import to_json

from stepline.core.events import JSON, Payload
from stepline.errors import PayloadValidationError, TaskDefinitionError


class Codec:
    """Encodes and validates values of one declared type."""

    __slots__ = ("_adapter", "_plain", "type_name")

    def __init__(self, annotation: Any) -> None:
        self._plain = annotation is Any
        self._adapter: TypeAdapter[Any] = TypeAdapter(annotation)
        self.type_name = getattr(annotation, "__name__", repr(annotation))

    def dump(self, value: Any, where: str) -> Payload:
        try:
            if self._plain:
                data = to_json(value)
            else:
                data = self._adapter.dump_json(value)
        except Exception as exc:  # pydantic raises several kinds here
            raise PayloadValidationError(where, f"not JSON-serialisable: {exc}") from exc
        return Payload(JSON, data)

    def check_and_dump(self, value: Any, where: str) -> Payload:
        """Validate a value given by a caller (e.g. to trigger) and encode it."""
        if self._plain:
            return self.dump(value, where)
        return self.dump(self.validate(value, where), where)

    def validate(self, value: Any, where: str) -> Any:
        """Validate a Python value (e.g. a dict given to trigger)."""
        if self._plain:
            self.dump(value, where)  # must at least be serialisable
            return value
        try:
            return self._adapter.validate_python(value)
        except ValidationError as exc:
            raise PayloadValidationError(where, _describe(exc)) from exc

    def load(self, payload: Payload, where: str) -> Any:
        if payload.content_type != JSON:
            raise PayloadValidationError(
                where, f"unsupported content type {payload.content_type!r}"
            )
        try:
            if self._plain:
                return json.loads(payload.data)
            return self._adapter.validate_json(payload.data)
        except ValidationError as exc:
            raise PayloadValidationError(where, _describe(exc)) from exc
        except ValueError as exc:
            raise PayloadValidationError(where, f"malformed JSON: {exc}") from exc


ANY = Codec(Any)


def _describe(exc: ValidationError) -> str:
    """One line naming each failing field, e.g. `order_id: Field required`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def describe_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Payload | None:
    """Best-effort JSON of a step's arguments, for the dashboard only.

    Arguments are never replayed from here, so anything not serialisable is
    shown by its repr rather than failing the step.
    """
    if not args and not kwargs:
        return None
    value: Any = list(args) if not kwargs else {"args": list(args), "kwargs": kwargs}
    return Payload(JSON, to_json(value, fallback=repr))


def payload_json(p: Payload | None) -> Any:
    """A payload as JSON for people (CLI, API, dashboard); non-JSON bytes as
    their content type and size."""
    if p is None:
        return None
    try:
        return json.loads(p.data)
    except ValueError:
        return {"content_type": p.content_type, "bytes": len(p.data)}


def annotations_of(fn: Callable[..., Any]) -> tuple[Any, Any]:
    """The payload and return types a task or step function declares (Any when absent)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise TaskDefinitionError(f"cannot resolve the annotations of {fn.__qualname__}: {exc}") from exc
    params = list(inspect.signature(fn).parameters.values())
    payload_t: Any = Any
    if params:
        payload_t = hints.get(params[0].name, Any)
    ret: Any = hints.get("return", Any)
    if ret is type(None):
        ret = Any
    return payload_t, ret
