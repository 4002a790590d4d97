"""The codec: events survive the log, old bytes stay readable, bad bytes fail loudly."""

from __future__ import annotations

import copy
import dataclasses
import json
import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint as fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepline import schemas
from stepline.core import codec
from stepline.core.events import (
    BODY_TYPES,
    JSON,
    CopiedStep,
    DomainEvent,
    ErrorInfo,
    Event,
    LogRecorded,
    PartitionClaimed,
    PatchRecorded,
    PauseChanged,
    Payload,
    RetryScheduled,
    RunCancelled,
    RunCompleted,
    RunDeadLettered,
    RunExpired,
    RunFailed,
    RunResumed,
    RunRetriggered,
    RunStarted,
    RunSuspended,
    RunTriggered,
    SlotGranted,
    SlotReleased,
    SlotRequested,
    StepCompleted,
    StepFailed,
    StepStarted,
    WaitCompleted,
)
from stepline.errors import MalformedEvent, SchemaError, UnknownSchemaVersion

FIXTURES = Path(__file__).parent / "fixtures"
NS = "io.stepline"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

PAYLOAD = Payload(JSON, b'{"order": 17, "total": "9.90"}')
ERROR = ErrorInfo("builtins.ValueError", "card declined", "Traceback...", retriable=False)

EXAMPLES = [
    RunTriggered(PAYLOAD, "order-17", 1700000000000, 5, ("billing", "eu"), "payments", "c-3", None),
    RunTriggered(Payload("text/plain", b"")),
    RunTriggered(PAYLOAD, parent_run_id="run_p", parent_step=7),
    RunStarted(attempt=1, worker_id="worker-a"),
    StepStarted(step=0, name="charge", attempt=1),
    StepStarted(step=0, name="charge", attempt=1, input=PAYLOAD),
    StepCompleted(step=0, name="charge", attempt=1, output=PAYLOAD),
    StepFailed(attempt=2, error=ERROR, step=1, name="ship"),
    StepFailed(attempt=2, error=ErrorInfo("KeyError", "'x'")),
    RetryScheduled(attempt=3, retry_at=1700000005000, delay_ms=5000, reason="ValueError"),
    RunSuspended(step=2, reason="sleep", wake_at=1700003600000),
    RunSuspended(step=2, reason="event", condition='{"event": "user.created"}'),
    RunResumed(step=2, reason="timer"),
    RunCompleted(output=PAYLOAD, attempt=3),
    RunFailed(error=ERROR, attempt=3),
    RunDeadLettered(reason="retries exhausted"),
    RunCancelled(reason="duplicate", requested_by="cli"),
    RunRetriggered(),
    RunRetriggered(payload=PAYLOAD, requested_by="ops"),
    LogRecorded(level="INFO", message="charged ✓", attempt=1, fields='{"amount": 990}', step=0),
    SlotGranted(queue="payments"),
    SlotGranted(queue="payments", concurrency_key="customer-3"),
    PartitionClaimed(partition=7, worker_id="worker-b"),
    DomainEvent(name="user.created", data=PAYLOAD, key="user-42", source="webhook:auth"),
    DomainEvent(name="order.paid", data=Payload(JSON, b"{}")),
    WaitCompleted(step=3, reason="token", source="tok_abc", output=PAYLOAD),
    WaitCompleted(step=4, reason="child", source="run_c", error=ERROR),
    SlotRequested(queue="emails", concurrency_key="t-1", priority=2, created_at=17, limit=10, key_limit=1),
    SlotRequested(queue="q", created_at=1, rate_limit=5, rate_period_ms=1000),
    SlotReleased(queue="emails", concurrency_key="t-1", reason="completed"),
    RunExpired(expires_at=1700000009000),
    # schema v5: forks, task versions, patch decisions
    RunTriggered(PAYLOAD, forked_from="run-0", forked_at_step=2,
                 journal=(CopiedStep(0, "charge", PAYLOAD, PAYLOAD), CopiedStep(1, "child", error=ERROR)),
                 patches=(PatchRecorded("new-discount", True, 0),)),
    RunStarted(attempt=2, worker_id="worker-a", task_version="code:0123456789ab"),
    PatchRecorded(patch="new-discount", applied=False, step=3),
    PauseChanged(scope="queue", name="emails", paused=True, reason="outage", requested_by="cli"),
    PauseChanged(scope="task", name="charge", paused=False),
]


def envelope(body: Any, seq: int = 1, **overrides: Any) -> Event:
    fields: dict[str, Any] = dict(
        event_id="01J9ZK8Q3W6X7Y8Z9A0B1C2D3E",
        type=body.TYPE,
        run_id="run-17",
        task_id="billing.charge",
        seq=seq,
        time=1700000000000 + seq,
        epoch=4,
        body=body,
        traceparent=TRACEPARENT,
        extra={"origin": "test"},
    )
    return Event(**{**fields, **overrides})


def as_fastavro_record(obj: Any) -> Any:
    """The dict fastavro expects for a dataclass, built independently of the codec."""
    if dataclasses.is_dataclass(obj):
        record = {f.name: as_fastavro_record(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, Event):
            record["body"] = (f"{NS}.{type(obj.body).__name__}", record["body"])
        return record
    if isinstance(obj, tuple):
        return [as_fastavro_record(v) for v in obj]
    return obj


def fastavro_bytes(event: Event, schema: dict[str, Any] | None = None) -> bytes:
    buf = BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema or schemas.event_schema()),
                               as_fastavro_record(event))
    return buf.getvalue()


# --- round trips ---------------------------------------------------------------


def test_every_body_type_has_an_example() -> None:
    assert {type(b) for b in EXAMPLES} == set(BODY_TYPES)


@pytest.mark.parametrize("body", EXAMPLES, ids=lambda b: type(b).__name__)
def test_every_event_type_survives_a_round_trip(body: Any) -> None:
    event = envelope(body)
    assert codec.decode(codec.encode(event)) == event


@pytest.mark.parametrize("body", EXAMPLES, ids=lambda b: type(b).__name__)
def test_encoded_bytes_are_the_avro_binary_fastavro_writes(body: Any) -> None:
    event = envelope(body)
    assert codec.encode(event)[10:] == fastavro_bytes(event)


def test_decoded_collections_are_tuples_and_absent_values_none() -> None:
    written = envelope(RunTriggered(PAYLOAD, tags=("a",)), traceparent=None)
    event = codec.decode(codec.encode(written))
    assert isinstance(event.body, RunTriggered)
    assert event.body.tags == ("a",) and event.body.queue is None and event.traceparent is None


ints = st.integers(-(2**31), 2**31 - 1)
longs = st.integers(-(2**63), 2**63 - 1)
text = st.text(max_size=40)
opt_text = st.none() | text
payloads = st.builds(Payload, content_type=text, data=st.binary(max_size=200))
errors = st.builds(ErrorInfo, type=text, message=text, stack=text, retriable=st.booleans())

bodies = st.one_of(
    st.builds(RunTriggered, payload=payloads, idempotency_key=opt_text,
              not_before=st.none() | longs, priority=ints,
              tags=st.lists(text, max_size=5).map(tuple), queue=opt_text,
              concurrency_key=opt_text, parent_run_id=opt_text, parent_step=st.none() | ints,
              expires_at=st.none() | longs),
    st.builds(RunStarted, attempt=ints, worker_id=text),
    st.builds(WaitCompleted, step=ints, reason=text, source=text, output=st.none() | payloads,
              error=st.none() | errors),
    st.builds(StepStarted, step=ints, name=text, attempt=ints, input=st.none() | payloads),
    st.builds(StepCompleted, step=ints, name=text, attempt=ints, output=payloads),
    st.builds(StepFailed, attempt=ints, error=errors, step=st.none() | ints, name=opt_text),
    st.builds(RetryScheduled, attempt=ints, retry_at=longs, delay_ms=longs, reason=text),
    st.builds(RunSuspended, step=ints, reason=text, wake_at=st.none() | longs,
              condition=opt_text),
    st.builds(RunResumed, step=ints, reason=text),
    st.builds(RunCompleted, output=payloads, attempt=ints),
    st.builds(RunFailed, error=errors, attempt=ints),
    st.builds(RunDeadLettered, reason=text),
    st.builds(RunCancelled, reason=text, requested_by=text),
    st.builds(RunRetriggered, payload=st.none() | payloads, requested_by=text),
    st.builds(LogRecorded, level=text, message=text, attempt=ints, fields=text,
              step=st.none() | ints),
    st.builds(SlotGranted, queue=text, concurrency_key=opt_text),
    st.builds(PartitionClaimed, partition=ints, worker_id=text),
)

events = bodies.flatmap(
    lambda body: st.builds(
        Event, event_id=text, type=st.just(body.TYPE), run_id=text, task_id=text,
        seq=longs, time=longs, epoch=longs, body=st.just(body), traceparent=opt_text,
        extra=st.dictionaries(text, text, max_size=4),
    )
)


@given(events)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_any_valid_event_round_trips_and_matches_fastavro(event: Event) -> None:
    data = codec.encode(event)
    assert codec.decode(data) == event
    assert data[10:] == fastavro_bytes(event)


# --- the single-object header ------------------------------------------------


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO (Rabin) exactly as the Avro spec's pseudo-code has it."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def test_header_is_the_spec_marker_and_little_endian_rabin_fingerprint() -> None:
    canonical = to_parsing_canonical_form(schemas.event_schema())
    expected_fp = crc64_avro(canonical.encode()).to_bytes(8, "little")
    assert expected_fp.hex() == fastavro_fingerprint(canonical, "CRC-64-AVRO")
    assert codec.fingerprint() == expected_fp
    data = codec.encode(envelope(EXAMPLES[0]))
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == expected_fp


# --- bad bytes ---------------------------------------------------------------


def valid_bytes() -> bytes:
    return codec.encode(envelope(StepCompleted(step=0, name="charge", attempt=1, output=PAYLOAD)))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc3", b"\xc3\x01\x00\x01", b"\x00\x01" + bytes(20), b"{\"json\": true}"],
    ids=["empty", "marker only", "short header", "wrong marker", "json"],
)
def test_bytes_that_are_not_a_single_object_encoding_are_malformed(data: bytes) -> None:
    with pytest.raises(MalformedEvent):
        codec.decode(data)


def test_every_truncation_of_an_event_is_malformed() -> None:
    data = valid_bytes()
    for cut in range(len(data)):
        with pytest.raises(MalformedEvent):
            codec.decode(data[:cut])


def test_trailing_bytes_after_an_event_are_malformed() -> None:
    with pytest.raises(MalformedEvent, match="trailing"):
        codec.decode(valid_bytes() + b"\x00")


def test_a_body_error_names_its_cause() -> None:
    data = valid_bytes()
    with pytest.raises(MalformedEvent) as info:
        codec.decode(data[:-5])
    assert info.value.__cause__ is not None


@given(st.binary(max_size=300))
@settings(max_examples=500)
def test_garbage_after_a_valid_header_never_leaks_a_raw_exception(garbage: bytes) -> None:
    try:
        codec.decode(b"\xc3\x01" + codec.fingerprint() + garbage)
    except MalformedEvent:
        pass


def test_an_unknown_fingerprint_names_the_version_it_cannot_read() -> None:
    data = bytearray(valid_bytes())
    data[2:10] = bytes.fromhex("0123456789abcdef")
    with pytest.raises(UnknownSchemaVersion, match="0123456789abcdef"):
        codec.decode(bytes(data))


def test_an_event_that_does_not_fit_the_schema_is_refused() -> None:
    too_big = envelope(RunStarted(attempt=2**31, worker_id="w"))
    # A wrong field type on purpose: the codec must refuse, not write garbage.
    wrong_type = envelope(RunStarted(attempt=1, worker_id=7))  # type: ignore[arg-type]
    not_a_body = dataclasses.replace(envelope(RunStarted(1, "w")), body=PAYLOAD)
    for event in (too_big, wrong_type, not_a_body):
        with pytest.raises(SchemaError):
            codec.encode(event)


# --- schema versions -----------------------------------------------------------


def expected_v1_events() -> list[Event]:
    """What tests/fixtures/events-v1.bin holds; see make_events_v1.py."""
    error = ErrorInfo("builtins.ValueError", "card declined", "Traceback...", False)
    bodies = [
        RunTriggered(PAYLOAD, "order-17", 1700000000000, 5, ("billing", "eu"), "payments",
                     "customer-3", None),
        RunStarted(1, "worker-a"),
        StepStarted(0, "charge", 1, None),
        StepCompleted(0, "charge", 1, PAYLOAD),
        StepFailed(2, error, 1, "ship"),
        RetryScheduled(3, 1700000005000, 5000, "ValueError"),
        RunSuspended(2, "sleep", 1700003600000, None),
        RunResumed(2, "timer"),
        RunCompleted(PAYLOAD, 3),
        RunFailed(error, 3),
        RunDeadLettered("retries exhausted"),
        RunCancelled("duplicate", "cli"),
        RunRetriggered(PAYLOAD, "api"),
        LogRecorded("INFO", "charged", 1, '{"amount": 990}', 0),
        SlotGranted("payments", None),
        PartitionClaimed(7, "worker-b"),
    ]
    return [
        Event(
            event_id=f"evt-{seq:03d}", type=body.TYPE, run_id="run-17", task_id="billing.charge",
            seq=seq, time=1700000000000 + seq, epoch=4, body=body,
            traceparent=TRACEPARENT if seq % 2 else None,
            extra={"origin": "fixture"} if seq == 0 else {},
        )
        for seq, body in enumerate(bodies)
    ]


def read_length_prefixed(path: Path) -> list[bytes]:
    data = path.read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return out


def test_an_event_written_by_schema_v1_stays_readable() -> None:
    """The golden log: must keep passing for every future schema version."""
    records = read_length_prefixed(FIXTURES / "events-v1.bin")
    v1 = json.loads((schemas.HISTORY_DIR / "Event.v1.avsc").read_text())
    v1_fp = bytes.fromhex(fastavro_fingerprint(to_parsing_canonical_form(v1), "CRC-64-AVRO"))
    assert all(r[2:10] == v1_fp for r in records)
    assert [codec.decode(r) for r in records] == expected_v1_events()


def test_an_older_schema_version_resolves_into_the_current_one() -> None:
    current = schemas.event_schema()
    older = copy.deepcopy(current)  # as if `extra` and RunTriggered.tags were added later
    older["fields"] = [f for f in older["fields"] if f["name"] != "extra"]
    body_union = next(f for f in older["fields"] if f["name"] == "body")["type"]
    run_triggered = next(b for b in body_union if b["name"] == "RunTriggered")
    run_triggered["fields"] = [f for f in run_triggered["fields"] if f["name"] != "tags"]

    event = envelope(RunTriggered(PAYLOAD, queue="payments"), extra={})
    record = as_fastavro_record(event)
    del record["extra"]
    del record["body"][1]["tags"]
    buf = BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(older), record)
    older_fp = codec.schema_fingerprint(fastavro.parse_schema(older))
    data = b"\xc3\x01" + older_fp + buf.getvalue()

    reader = codec.Codec(history=[older])
    assert older_fp in reader.known_fingerprints() and older_fp != reader.fingerprint
    assert reader.decode(data) == event
    with pytest.raises(UnknownSchemaVersion):
        codec.Codec(history=[]).decode(data)


def test_a_schema_that_drifts_from_the_dataclasses_is_refused() -> None:
    drifted = schemas.event_schema()
    drifted["fields"].insert(0, {"name": "tenant", "type": "string", "default": ""})
    with pytest.raises(SchemaError, match="tenant"):
        codec.Codec(schema=drifted, history=[])


def test_every_schema_file_parses() -> None:
    named: dict[str, Any] = {}
    # Event.current.avsc is generated from these (tests/test_schema_files.py).
    paths = sorted(p for p in schemas.SCHEMA_DIR.glob("*.avsc") if p != schemas.CURRENT_FILE)
    first = [p for p in paths if p.stem in ("Payload", "ErrorInfo")]
    last = [p for p in paths if p.stem == "Event"]
    middle = [p for p in paths if p not in first and p not in last]
    for path in first + middle + last:
        fastavro.parse_schema(json.loads(path.read_text()), named)
    for schema in schemas.history_schemas().values():
        fastavro.parse_schema(schema)
    # Payload, ErrorInfo and CopiedStep (v5), the bodies, the envelope.
    assert len(paths) == 3 + len(BODY_TYPES) + 1


def test_the_current_schema_is_frozen_in_history() -> None:
    history = schemas.history_schemas()
    newest = max(history, key=lambda stem: int(stem.rsplit(".v", 1)[1]))
    assert schemas.event_schema() == history[newest], (
        f"schemas/*.avsc no longer match schemas/history/{newest}.avsc. Never edit a released "
        f"history file: freeze the new schema as schemas/history/Event.v<N+1>.avsc, add a golden "
        f"fixture tests/fixtures/events-v<N+1>.bin and a test reading it (schemas/README.md)."
    )


def test_a_domain_event_written_by_schema_v2_stays_readable() -> None:
    """tests/fixtures/events-v2.bin: a DomainEvent as v2 first wrote it (make_events_v2.py)."""
    records = read_length_prefixed(FIXTURES / "events-v2.bin")
    v2 = json.loads((schemas.HISTORY_DIR / "Event.v2.avsc").read_text())
    v2_fp = bytes.fromhex(fastavro_fingerprint(to_parsing_canonical_form(v2), "CRC-64-AVRO"))
    assert all(r[2:10] == v2_fp for r in records)
    [event] = [codec.decode(r) for r in records]
    assert event.type == "DomainEvent" and event.run_id == ""
    assert event.body == DomainEvent("user.created", Payload(JSON, b'{"plan": "pro"}'), "user-42", "api")


def test_what_schema_v3_added_stays_readable() -> None:
    """tests/fixtures/events-v3.bin: WaitCompleted and RunTriggered.parent_step as v3 wrote them."""
    records = read_length_prefixed(FIXTURES / "events-v3.bin")
    v3 = json.loads((schemas.HISTORY_DIR / "Event.v3.avsc").read_text())
    v3_fp = bytes.fromhex(fastavro_fingerprint(to_parsing_canonical_form(v3), "CRC-64-AVRO"))
    assert all(r[2:10] == v3_fp for r in records)
    trigger, resolved, failed = [codec.decode(r) for r in records]
    assert trigger.body.parent_run_id == "run_01KA0000000000000000000000"
    assert trigger.body.parent_step == 4
    assert resolved.body == WaitCompleted(2, "event", "evt-9", Payload(JSON, b'{"approved": true}'))
    assert failed.body == WaitCompleted(
        5, "child", "run_01KC0000000000000000000000", None, ErrorInfo("ValueError", "bad", "", False)
    )


def test_a_v2_trigger_reads_with_no_parent_step() -> None:
    v2 = json.loads((schemas.HISTORY_DIR / "Event.v2.avsc").read_text())
    header = b"\xc3\x01" + bytes.fromhex(fastavro_fingerprint(to_parsing_canonical_form(v2), "CRC-64-AVRO"))
    buf = BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(v2), {
        "event_id": "e", "type": "RunTriggered", "run_id": "run_x", "task_id": "t", "seq": 1,
        "time": 5, "epoch": 0, "traceparent": None, "extra": {},
        "body": ("io.stepline.RunTriggered", {
            "payload": {"content_type": JSON, "data": b"1"}, "idempotency_key": None,
            "not_before": None, "priority": 0, "tags": [], "queue": None,
            "concurrency_key": None, "parent_run_id": "run_p",
        }),
    })
    body = codec.decode(header + buf.getvalue()).body
    assert body == RunTriggered(Payload(JSON, b"1"), parent_run_id="run_p", parent_step=None)


def test_what_schema_v4_added_stays_readable() -> None:
    """tests/fixtures/events-v4.bin: admission events, RunExpired and RunTriggered.expires_at."""
    records = read_length_prefixed(FIXTURES / "events-v4.bin")
    v4 = json.loads((schemas.HISTORY_DIR / "Event.v4.avsc").read_text())
    v4_fp = bytes.fromhex(fastavro_fingerprint(to_parsing_canonical_form(v4), "CRC-64-AVRO"))
    assert all(r[2:10] == v4_fp for r in records)
    trigger, requested, released, expired = [codec.decode(r).body for r in records]
    assert (trigger.queue, trigger.concurrency_key, trigger.expires_at) == ("emails", "tenant-1", 1795700060000)
    assert requested == SlotRequested("emails", "tenant-1", 3, 1795700000001, 10, 2, 100, 60000)
    assert released == SlotReleased("emails", "tenant-1", "completed")
    assert expired == RunExpired(1795700060000)
