"""What the HTTP API accepts, as pydantic models: request bodies, query strings and path parameters.

Every model refuses unknown names (`extra="forbid"`): a misspelt option
silently ignored would trigger the wrong thing, and a misspelt filter would
list everything. Types are strict (a JSON string is never a number), except
that an integral number such as 5.0 is the integer 5, as it is to JSON Schema.
A query string is text, so its numbers and booleans are read by our own
checks, which also name the parameter in their message.

The OpenAPI document (openapi.py) is generated from these models: where a
check is ours rather than pydantic's (an event name, a status list, a
duration), the schema the document shows is attached beside it, and
tests/test_openapi.py pins the two together.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from stepline.core.ids import parse_token
from stepline.errors import InvalidToken
from stepline.history.replay import not_a_point, parse_point

PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1  # RunTriggered.priority is an Avro int
# Far beyond any sensible delay, and far inside the 64-bit millisecond
# timestamp RunTriggered.not_before stores.
MAX_DELAY_S = 100 * 365 * 24 * 3600
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_MS = 2**63 - 1
RunStatus = Literal["pending", "running", "suspended", "retrying", "completed", "failed", "cancelled", "expired"]
STATUSES: tuple[str, ...] = get_args(RunStatus)

# Python's str.isspace(), spelled out: `\s` means less in JSON Schema's regex dialect.
SPACE = r"\t\n\v\f\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# What client.check_event_name accepts: no whitespace, no leading or trailing dot.
EVENT_NAME_PATTERN = f"^[^{SPACE}.](?:[^{SPACE}]*[^{SPACE}.])?$"
# A status, or several separated by commas; empty is no filter.
STATUS_LIST_PATTERN = f"^$|^({'|'.join(STATUSES)})(,({'|'.join(STATUSES)}))*$"
# Far more digits than any bound here, and far fewer than int()'s 4300-digit limit.
_INTEGER = re.compile(r"-?[0-9]{1,40}")
# A point in a run's history (engine/history/replay.py parse_point): a log
# offset, a time back from now, or an ISO-8601 time. Narrower than what
# parse_point reads (no spaces, bounded digits), so that the description and
# the check agree on every string; each is matched whole.
_POINT_FORMS = (
    r"[0-9]{1,19}",
    r"-[0-9]{1,12}(\.[0-9]{1,6})?(ms|s|m|h|d|w)",
    r"(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,9})?)?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?",
)
_POINT = re.compile("|".join(f"(?:{form})" for form in _POINT_FORMS))


def refuse(message: str) -> PydanticCustomError:
    """A validation error whose message is ours, whole (it names its field itself)."""
    return PydanticCustomError("stepline", "{message}", {"message": message})


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _integral(value: Any) -> Any:
    # JSON has one number type: 5.0 is the integer 5, to JSON Schema and so to us.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _blank_is_none(value: Any) -> Any:
    return None if value == "" else value


def _strings(name: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        items = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(v, str) for v in items):
            raise refuse(f"{name} must be a string or a list of strings")
        return value
    return check


def _query_int(name: str, lo: int, hi: int) -> Callable[[Any], Any]:
    def parse(raw: Any) -> Any:
        # ASCII digits only: int() also takes " 7", "1_000" and "٣", which no client means.
        value = int(raw) if isinstance(raw, str) and _INTEGER.fullmatch(raw) else lo - 1
        if not lo <= value <= hi:
            raise refuse(f"{name} must be an integer from {lo} to {hi}, got {raw!r}")
        return value
    return parse


def _query_bool(name: str) -> Callable[[Any], Any]:
    def parse(raw: Any) -> Any:
        if isinstance(raw, str) and raw.lower() in ("true", "1", "yes"):
            return True
        if isinstance(raw, str) and raw.lower() in ("false", "0", "no"):
            return False
        raise refuse(f"{name} must be true or false, got {raw!r}")
    return parse


def _statuses(raw: Any) -> Any:
    # An empty value is no filter; inside a list, every item must be a status.
    given = [s for item in raw if item for s in item.split(",")]
    unknown = sorted(set(given) - set(STATUSES))
    if unknown:
        raise refuse(f"unknown status {', '.join(map(repr, unknown))}; one of {', '.join(sorted(STATUSES))}")
    return list(dict.fromkeys(given))


def _wait_token(value: Any) -> Any:
    try:
        parse_token(value)
    except InvalidToken as exc:
        raise refuse(str(exc)) from None
    return value


def _point(name: str) -> Callable[[Any], Any]:
    def check(raw: Any) -> Any:
        if raw is None or raw == "":
            return None
        if not (isinstance(raw, str) and _POINT.fullmatch(raw)):
            raise refuse(not_a_point(str(raw), name))
        try:
            parse_point(raw, 0, name=name)  # the clock only moves relative points: any will do to check
        except ValueError as exc:  # a date the calendar has not (month 13)
            raise refuse(str(exc)) from None
        return raw
    return check


Integer = Annotated[int, BeforeValidator(_integral)]
Seconds = Annotated[float, Field(ge=0, le=MAX_DELAY_S)]
Key = Annotated[str, Field(min_length=1)]
Status = Annotated[str, WithJsonSchema({"type": "string", "pattern": STATUS_LIST_PATTERN})]
# A point in time as engine/client/backfill.py parses it; checked there.
When = Annotated[str, WithJsonSchema({"anyOf": [
    {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*[smhdw]\s*$"},
    {"type": "string", "format": "date-time"}]})]
Millis = Annotated[int, Field(ge=0, le=MAX_MS), BeforeValidator(_integral)]


# --- request bodies ------------------------------------------------------------------


class TriggerRequest(Input):
    payload: Any = Field(None, description="the task's input; checked against its model (422)")
    idempotency_key: Key | None = Field(
        None, description="a repeated trigger with the same key and payload is the same run; "
                          "the key with another payload is refused (409)")
    delay: Seconds | None = Field(None, description="seconds before the run may start")
    ttl: Seconds | None = Field(None, description="seconds the run may wait to start before it expires")
    priority: Annotated[int, Field(ge=PRIORITY_MIN, le=PRIORITY_MAX), BeforeValidator(_integral)] = 0
    tags: list[str] = []
    concurrency_key: Key | None = None


class PublishRequest(Input):
    name: str = Field(json_schema_extra={"pattern": EVENT_NAME_PATTERN}, examples=["user.created"],
                      description="the event's name; checked as client.check_event_name does")
    data: Any = None
    key: Key | None = Field(None, description="partitioning key: events with one key stay in order")


class CompleteTokenRequest(Input):
    data: Any = Field(None, description="what wait_for_token returns")


class RetryRequest(Input):
    payload: Any = Field(None, description="replaces the run's payload (when given, even as null)")


def _step_outputs(value: Any) -> Any:
    if value is not None and (not isinstance(value, dict) or not all(
            isinstance(k, str) and k.isascii() and k.isdigit() for k in value)):
        raise refuse('step_outputs must be an object from step positions to outputs, e.g. {"2": 10}')
    return value


class ForkRequest(Input):
    at_step: Integer = Field(description="the first journal position to run live")
    payload: Any = Field(None, description="replaces the payload (when given, even as null)")
    step_outputs: Annotated[dict[str, Any] | None, BeforeValidator(_step_outputs)] = Field(
        None, json_schema_extra={"propertyNames": {"pattern": "^[0-9]+$"}},
        description="recorded outputs to replace, by step position")
    idempotency_key: Key | None = None


class PauseRequest(Input):
    reason: str = Field("", description="shown with the pause")


class BulkFilter(Input):
    """The runs list's filter (`GET /v1/runs` parameter names); since/until take a
    duration (24h) or an ISO 8601 time, from/to milliseconds. Read by ops_api.parse_filter."""

    task: str | None = None
    status: Annotated[Status | list[Status] | None, BeforeValidator(_strings("filter.status"))] = None
    tag: Annotated[str | list[str] | None, BeforeValidator(_strings("filter.tag"))] = None
    from_: Millis | None = Field(None, alias="from")
    to: Millis | None = None
    since: When | None = None
    until: When | None = None
    q: str | None = None
    dead_letter: bool | None = None
    parent: str | None = None
    error_type: str | None = None


class BulkRequest(Input):
    filter: BulkFilter | None = None
    dry_run: bool = Field(False, description="count, act on nothing")
    request_id: str | None = Field(None, max_length=200, json_schema_extra={"pattern": r"\S"},
                                   description="repeat it to repeat the request: no run is acted on twice")


class ShadowRequest(Input):
    module: Key | None = Field(None, description="as ?module=")


class BackfillRequest(Input):
    since: When = Field(examples=["30d", "2025-01-01T00:00:00Z"],
                        description="a duration back from now (30d, 12h, 15m, 90s, 2w), or an ISO 8601 time")
    until: When | None = Field(None, description="as since; default now")
    dry_run: bool = Field(False, description="count, start nothing")


# --- query strings: text, read by our own checks ---------------------------------------


def _text(description: str) -> Any:
    return Field(None, description=description)


Text = Annotated[str | None, BeforeValidator(_blank_is_none)]


class PageQuery(Input):
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT), BeforeValidator(_query_int("limit", 1, MAX_LIMIT))] = Field(
        DEFAULT_LIMIT, description="items per page")
    cursor: Annotated[Text, WithJsonSchema({"type": "string", "pattern": "^[A-Za-z0-9_-]*$"})] = Field(
        None, description="`next_cursor` of the previous page (opaque); an empty value is the first page")


class RunQuery(PageQuery):
    task: Text = _text("only runs of this task")
    status: Annotated[list[Status], BeforeValidator(_statuses)] = Field(
        [], description="only runs in these states (repeat it, or separate them by commas)")
    tag: Annotated[list[str], BeforeValidator(lambda v: list(dict.fromkeys(t for t in v if t)))] = Field(
        [], description="only runs with every one of these tags")
    from_: Annotated[int, Field(ge=0, le=MAX_MS), BeforeValidator(_query_int("from", 0, MAX_MS))] | None = Field(
        None, alias="from", description="created at or after (ms)")
    to: Annotated[int, Field(ge=0, le=MAX_MS), BeforeValidator(_query_int("to", 0, MAX_MS))] | None = Field(
        None, description="created before (ms)")
    q: Text = _text("text in the payload or output")
    dead_letter: Annotated[bool | None, BeforeValidator(_query_bool("dead_letter"))] = Field(
        None, description="only dead-lettered runs (true) or only others (false)")
    parent: Text = _text("only runs started by this run")
    error_type: Text = _text("only runs whose last error has this type, e.g. TimeoutError")


class EventQuery(PageQuery):
    name: Text = _text("only events of this name")


class ShadowQuery(Input):
    module: Text = _text("a dotted module name under --shadow-path")


_POINT_SCHEMA = WithJsonSchema(
    {"anyOf": [*({"type": "string", "pattern": f"^{form}$"} for form in _POINT_FORMS),
               {"type": "string", "maxLength": 0}, {"type": "null"}]})  # empty: no point


class AsOfQuery(Input):
    as_of: Annotated[str | None, BeforeValidator(_point("as_of")), _POINT_SCHEMA] = Field(
        None, description="the run as it stood at a past point: a log offset (inclusive), an ISO-8601 time "
                          "(UTC unless it names a zone) or a time back from now (-5m, -90s, -2h)")


class HistoryQuery(Input):
    from_: Annotated[str | None, BeforeValidator(_point("from")), _POINT_SCHEMA] = Field(
        None, alias="from", description="only events after this point (exclusive): a log offset, an ISO-8601 "
                                        "time or a time back from now (-5m)")
    to: Annotated[str | None, BeforeValidator(_point("to")), _POINT_SCHEMA] = Field(
        None, description="only events up to this point (inclusive), read as `from` is")


# --- path parameters ------------------------------------------------------------------


class RunPath(Input):
    run_id: str = Field(description="a run id, e.g. from a trigger's answer", examples=["run_0123456789abcdef"])


class DiffPath(Input):
    run_id: str = Field(description="run A, e.g. the original or yesterday's good run",
                        examples=["run_0123456789abcdef"])
    other_run_id: str = Field(description="run B, e.g. its fork or today's failed run",
                              examples=["run_fedcba9876543210"])


class TaskPath(Input):
    task_id: str = Field(description="the task's id", examples=["charge"])


class QueuePath(Input):
    name: str = Field(description="the queue's name")


class TokenPath(Input):
    token: Annotated[str, BeforeValidator(_wait_token), WithJsonSchema(
        {"type": "string", "pattern": r"^tok_run_[\s\S]*_[0-9]+$"})] = Field(
        description="tok_<run id>_<step>, as wait_for_token gave it", examples=["tok_run_0123456789abcdef_2"])


class SourcePath(Input):
    source: str = Field(description="the source's name, as configured", examples=["payments"])


class SubjectPath(Input):
    subject: str = Field(description="the subject id the fields were marked with")


class FilePath(Input):
    name: str = Field(description="file name", examples=["app.js"])


__all__ = [
    "DEFAULT_LIMIT", "MAX_DELAY_S", "MAX_LIMIT", "MAX_MS", "PRIORITY_MAX", "PRIORITY_MIN", "STATUSES", "RunStatus",
    "AsOfQuery", "BackfillRequest", "BulkFilter", "BulkRequest", "CompleteTokenRequest", "DiffPath", "EventQuery", "FilePath",
    "ForkRequest", "HistoryQuery", "Input", "PageQuery", "PauseRequest", "PublishRequest", "QueuePath", "RetryRequest",
    "RunPath", "RunQuery", "ShadowQuery", "ShadowRequest", "SourcePath", "SubjectPath", "TaskPath",
    "TokenPath", "TriggerRequest",
]
