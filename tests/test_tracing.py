"""Traces, metrics and run logs: a run is one trace wherever it runs, and its logs are on the log."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import stepline as sl
from stepline.observability import tracing
from stepline.sdk.logs import MAX_FIELDS_BYTES, MAX_MESSAGE_BYTES, MAX_RECORDS_PER_ATTEMPT

from .conftest import Engine, eventually

pytestmark = pytest.mark.asyncio

TRACED_WORKER = Path(__file__).parent / "apps" / "traced_worker.py"


class Declined(Exception):
    pass


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Stepline traced through a provider of this test's own; the global one is left alone."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_tracer_provider(provider)
    yield exporter
    tracing.use_tracer_provider(None)
    provider.shutdown()


@pytest.fixture
def metric_reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    tracing.use_meter_provider(provider)
    yield reader
    tracing.use_meter_provider(None)
    provider.shutdown()


@pytest.fixture
async def memory_engine() -> AsyncIterator[Any]:
    engines: list[Engine] = []

    async def make(registry: sl.Registry, concurrency: int = 64) -> Engine:
        import uuid

        e = Engine(f"memory://tracing-{uuid.uuid4().hex}", registry, concurrency)
        engines.append(e)
        return await e.start()

    yield make
    for e in engines:
        await e.close()


# --- helpers ---------------------------------------------------------------------------


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def w3c(span: ReadableSpan) -> str:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def span_id(span: ReadableSpan) -> int:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx.span_id


def trace_id(span: ReadableSpan) -> int:
    ctx = span.get_span_context()
    assert ctx is not None
    return ctx.trace_id


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                out.setdefault(m.name, []).extend(m.data.data_points)
    return out


def two_step_app() -> tuple[sl.Registry, sl.Task[int, int]]:
    reg = sl.Registry()

    @sl.step(name="reserve")
    async def reserve(x: int) -> int:
        return x + 1

    @sl.step(name="charge")
    async def charge(x: int) -> int:
        return x * 10

    @sl.task(id="checkout", registry=reg)
    async def checkout(p: int) -> int:
        return await charge(await reserve(p))

    return reg, checkout


# --- traces ----------------------------------------------------------------------------


async def test_a_run_is_one_trace_from_trigger_through_attempt_to_steps(engine_factory, spans):
    reg, checkout = two_step_app()
    e = await engine_factory(reg)

    handle = await checkout.trigger(4)
    assert await handle.result(timeout=30) == 50
    await eventually(lambda: named(spans, "stepline.run checkout"), timeout=10, what="the attempt span")

    [trigger] = named(spans, "stepline.trigger")
    [run] = named(spans, "stepline.run checkout")
    [reserve] = named(spans, "stepline.step reserve")
    [charge] = named(spans, "stepline.step charge")
    assert trigger.kind == SpanKind.PRODUCER and trigger.parent is None
    assert run.kind == SpanKind.CONSUMER
    assert run.parent is not None and run.parent.span_id == span_id(trigger)
    for step in (reserve, charge):
        assert step.parent is not None and step.parent.span_id == span_id(run)
    assert {trace_id(s) for s in (trigger, run, reserve, charge)} == {trace_id(trigger)}
    records = await e.client.history(handle.run_id)
    history = [ev for _, ev in records]
    trigger_offset, trigger_event = records[0]
    # Where the RunTriggered crossed the log, as the messaging conventions say it.
    system = e.client.log.url.partition(":")[0]
    crossing = {
        "messaging.system": "kafka" if system == "kafka" else f"stepline.{system}",
        "messaging.destination.name": e.client.topics.runs,
        "messaging.destination.partition.id": str(e.client.partition_of(handle.run_id)),
        "messaging.message.id": trigger_event.event_id,
        **({"messaging.kafka.offset": trigger_offset} if system == "kafka" else {}),
    }
    assert dict(trigger.attributes or {}) == {
        "stepline.run_id": handle.run_id, "stepline.task_id": "checkout", **crossing,
        "messaging.operation.type": "send", "messaging.operation.name": "trigger",
    }
    assert dict(run.attributes or {}) == {
        "stepline.run_id": handle.run_id, "stepline.task_id": "checkout",
        "stepline.attempt": 1, "stepline.outcome": "completed", **crossing,
        "messaging.operation.type": "process", "messaging.operation.name": "run",
    }
    assert (reserve.attributes or {})["stepline.step"] == 0
    assert (charge.attributes or {})["stepline.step"] == 1
    assert run.status.status_code == StatusCode.UNSET
    assert not run.links and not trigger.links  # a run triggered by code is a child, not a link

    # The trigger's context travels in RunTriggered; the attempt's in every event it wrote.
    assert history[0].type == "RunTriggered" and history[0].traceparent == w3c(trigger)
    assert [ev.type for ev in history[1:]] == [
        "RunStarted", "StepStarted", "StepCompleted", "StepStarted", "StepCompleted", "RunCompleted"]
    assert {ev.traceparent for ev in history[1:]} == {w3c(run)}


async def test_a_failing_step_is_an_error_span_and_each_attempt_a_child_of_the_trigger(engine_factory, spans):
    reg = sl.Registry()
    calls = {"n": 0}

    @sl.step(name="pay")
    async def pay() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Declined("card declined")
        return "paid"

    @sl.task(id="payment", registry=reg, retry=sl.Retry(max_attempts=2, min_timeout=0.01, randomize=False))
    async def payment(p: None) -> str:
        return await pay()

    await engine_factory(reg)
    handle = await payment.trigger(None)
    assert await handle.result(timeout=30) == "paid"
    runs = await eventually(lambda: len(named(spans, "stepline.run payment")) == 2 and
                            named(spans, "stepline.run payment"), timeout=10, what="two attempt spans")

    [trigger] = named(spans, "stepline.trigger")
    first, second = sorted(runs, key=lambda s: (s.attributes or {})["stepline.attempt"])
    for run in (first, second):
        assert run.parent is not None and run.parent.span_id == span_id(trigger)
        assert trace_id(run) == trace_id(trigger)
    assert (first.attributes or {})["stepline.outcome"] == "retrying"
    assert first.status.status_code == StatusCode.ERROR
    assert (second.attributes or {})["stepline.outcome"] == "completed"

    failed, succeeded = sorted(named(spans, "stepline.step pay"), key=lambda s: s.start_time or 0)
    assert failed.parent is not None and failed.parent.span_id == span_id(first)
    assert failed.status.status_code == StatusCode.ERROR
    assert "card declined" in (failed.status.description or "")
    [exc_event] = [ev for ev in failed.events if ev.name == "exception"]
    assert (exc_event.attributes or {})["exception.type"].endswith("Declined")
    assert succeeded.status.status_code == StatusCode.UNSET
    assert succeeded.parent is not None and succeeded.parent.span_id == span_id(second)


async def test_the_trigger_span_is_a_child_of_the_callers_span_and_child_runs_join_the_trace(memory_engine, spans):
    reg = sl.Registry()

    @sl.task(id="child", registry=reg)
    async def child(p: int) -> int:
        return p + 1

    @sl.task(id="parent", registry=reg)
    async def parent(p: int) -> int:
        return await child.trigger_and_wait(p) * 2

    await memory_engine(reg)
    provider = tracing.current_tracer_provider()  # the test's: the caller's span comes from the same SDK
    assert provider is not None
    request_tracer = provider.get_tracer("web")
    with request_tracer.start_as_current_span("POST /orders") as request:
        handle = await parent.trigger(1)
    assert await handle.result(timeout=20) == 4
    await eventually(lambda: len(named(spans, "stepline.run parent")) == 2 and named(spans, "stepline.run child"),
                     timeout=10, what="the attempt spans of parent and child")

    trigger = next(s for s in named(spans, "stepline.trigger")
                   if (s.attributes or {})["stepline.task_id"] == "parent")
    assert trigger.parent is not None and trigger.parent.span_id == request.get_span_context().span_id
    traces = {trace_id(s) for s in spans.get_finished_spans()}
    assert traces == {request.get_span_context().trace_id}


async def test_without_a_tracer_provider_nothing_is_traced(memory_engine):
    # The suite never installs a global provider (tests use use_tracer_provider).
    assert not tracing.tracing_on(), "a global tracer provider leaked into the test process"
    reg, checkout = two_step_app()
    e = await memory_engine(reg)

    handle = await checkout.trigger(1)
    assert await handle.result(timeout=10) == 20

    assert {ev.traceparent for _, ev in await e.client.history(handle.run_id)} == {None}


@pytest.mark.slow
async def test_a_run_triggered_here_and_executed_by_another_process_is_one_trace(tmp_path: Path, spans):
    url = f"sqlite:///{tmp_path}/stepline.db"
    out, stop = tmp_path / "spans.json", tmp_path / "stop"
    worker = subprocess.Popen(
        [sys.executable, str(TRACED_WORKER), url, str(out), str(stop)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        async with sl.Client(url) as client:
            handle = await client.trigger("traced", 4)
            assert await handle.result(timeout=60) == 50
        stop.touch()
        _, err = await asyncio.to_thread(worker.communicate, timeout=30)
        assert worker.returncode == 0, err.decode()[-2000:]
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)

    [trigger] = named(spans, "stepline.trigger")
    remote = json.loads(out.read_text())
    [run] = [s for s in remote if s["name"] == "stepline.run traced"]
    steps = [s for s in remote if s["name"].startswith("stepline.step ")]
    assert run["trace_id"] == trace.format_trace_id(trace_id(trigger))
    assert run["parent_span_id"] == trace.format_span_id(span_id(trigger))
    assert run["kind"] == "CONSUMER" and run["attributes"]["stepline.run_id"] == handle.run_id
    assert sorted(s["name"] for s in steps) == ["stepline.step first", "stepline.step second"]
    assert all(s["parent_span_id"] == run["span_id"] and s["trace_id"] == run["trace_id"] for s in steps)


# --- run logs --------------------------------------------------------------------------


async def test_sl_logger_records_lines_on_the_run_with_their_fields(memory_engine):
    reg = sl.Registry()

    @sl.step(name="charge")
    async def charge(amount: int) -> str:
        sl.logger.info("charged", amount=amount, currency="EUR")
        return "ch_1"

    @sl.task(id="order", registry=reg)
    async def order(p: int) -> str:
        sl.logger.debug("starting")
        charge_id = await charge(p)
        sl.logger.warning("done", charge=charge_id)
        return charge_id

    e = await memory_engine(reg)
    with structlog.testing.capture_logs() as captured:
        handle = await order.trigger(990)
        assert await handle.result(timeout=10) == "ch_1"
        state = await eventually(lambda: _with_logs(e, handle.run_id, 3), timeout=10, what="three log lines")

    assert [(ln.level, ln.message, ln.step, json.loads(ln.fields), ln.attempt) for ln in state.logs] == [
        ("debug", "starting", None, {}, 1),
        ("info", "charged", 0, {"amount": 990, "currency": "EUR"}, 1),
        ("warning", "done", None, {"charge": "ch_1"}, 1),
    ]
    charged = next(c for c in captured if c["event"] == "charged")
    assert charged["run_id"] == handle.run_id and charged["task_id"] == "order"
    assert charged["attempt"] == 1 and charged["step"] == 0 and charged["amount"] == 990
    assert charged["log_level"] == "info"


async def _with_logs(e: Engine, run_id: str, n: int) -> sl.RunState | None:
    state = await e.client.get_run(run_id)
    return state if len(state.logs) >= n else None


async def test_log_lines_carry_the_trace_of_the_step_they_were_written_in(memory_engine, spans):
    reg = sl.Registry()

    @sl.step(name="work")
    async def work() -> None:
        sl.logger.info("working")

    @sl.task(id="logged", registry=reg)
    async def logged(p: None) -> None:
        await work()

    await memory_engine(reg)
    with structlog.testing.capture_logs() as captured:
        handle = await logged.trigger(None)
        await handle.result(timeout=10)
    [step] = await eventually(lambda: named(spans, "stepline.step work"), timeout=10, what="the step span")

    [line] = [c for c in captured if c["event"] == "working"]
    assert line["trace_id"] == trace.format_trace_id(trace_id(step))
    assert line["span_id"] == trace.format_span_id(span_id(step))


async def test_the_log_cap_per_attempt_holds_and_a_final_line_says_how_many_were_dropped(memory_engine):
    reg = sl.Registry()

    @sl.task(id="chatty", registry=reg)
    async def chatty(p: int) -> int:
        for i in range(p):
            sl.logger.info("line", i=i)
        return p

    e = await memory_engine(reg)
    with structlog.testing.capture_logs() as captured:
        handle = await chatty.trigger(5000)
        assert await handle.result(timeout=30) == 5000

    assert sum(1 for c in captured if c["event"] == "line") == 5000  # structlog gets every line
    records = [ev.body for _, ev in await e.client.history(handle.run_id) if ev.type == "LogRecorded"]
    assert len(records) == MAX_RECORDS_PER_ATTEMPT
    kept, note = records[:-1], records[-1]
    assert [json.loads(r.fields)["i"] for r in kept] == list(range(MAX_RECORDS_PER_ATTEMPT - 1))
    dropped = 5000 - (MAX_RECORDS_PER_ATTEMPT - 1)
    assert note.level == "warning" and json.loads(note.fields) == {"dropped": dropped}
    assert str(dropped) in note.message
    # The run's projection keeps them all, the note included, and before the outcome.
    state = await e.client.get_run(handle.run_id)
    assert len(state.logs) == MAX_RECORDS_PER_ATTEMPT and state.logs[-1].message == note.message
    types = [ev.type for _, ev in await e.client.history(handle.run_id)]
    assert types.index("RunCompleted") > max(i for i, t in enumerate(types) if t == "LogRecorded")


async def test_oversized_messages_and_fields_are_cut_to_the_record_limit(memory_engine):
    reg = sl.Registry()

    @sl.task(id="verbose", registry=reg)
    async def verbose(p: None) -> None:
        sl.logger.error("é" * 10_000, blob="x" * 50_000)

    e = await memory_engine(reg)
    handle = await verbose.trigger(None)
    await handle.result(timeout=10)

    [rec] = [ev.body for _, ev in await e.client.history(handle.run_id) if ev.type == "LogRecorded"]
    assert len(rec.message.encode()) <= MAX_MESSAGE_BYTES and rec.message.startswith("éé")
    assert rec.message.endswith("[truncated]")
    assert len(rec.fields.encode()) <= MAX_FIELDS_BYTES
    fields = json.loads(rec.fields)
    assert fields["_truncated"] is True and fields["_preview"].startswith('{"blob":"xxx')


async def test_outside_a_run_sl_logger_only_logs() -> None:
    with structlog.testing.capture_logs() as captured:
        sl.logger.info("hello", who="world", event="not the message")

    assert captured == [{"event": "hello", "who": "world", "event_": "not the message", "log_level": "info"}]


# --- metrics ---------------------------------------------------------------------------


async def test_runs_and_step_durations_are_counted(memory_engine, metric_reader):
    reg, checkout = two_step_app()
    calls = {"n": 0}

    @sl.step(name="flaky")
    async def flaky() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Declined("once")

    @sl.task(id="retried", registry=reg, retry=sl.Retry(max_attempts=2, min_timeout=0.01, randomize=False))
    async def retried(p: None) -> None:
        await flaky()

    await memory_engine(reg)
    handles = [await checkout.trigger(i) for i in range(3)]
    handles.append(await retried.trigger(None))
    for h in handles:
        await h.result(timeout=10)

    def runs() -> dict[tuple[str, str], int]:
        return {(p.attributes["stepline.task_id"], p.attributes["stepline.outcome"]): p.value
                for p in metric_points(metric_reader).get("stepline.runs", [])}

    await eventually(lambda: runs().get(("retried", "completed")) == 1 and runs().get(("checkout", "completed")) == 3,
                     timeout=10, what="every attempt counted")
    assert runs() == {("checkout", "completed"): 3, ("retried", "retrying"): 1, ("retried", "completed"): 1}
    points = metric_points(metric_reader)
    durations = {(p.attributes["stepline.task_id"], p.attributes["stepline.step_name"]): p.count
                 for p in points["stepline.step.duration"]}
    assert durations == {("checkout", "reserve"): 3, ("checkout", "charge"): 3, ("retried", "flaky"): 2}
    states = {p.attributes["stepline.state"]: p.value for p in points["stepline.partition.runs"]}
    assert states == {"completed": 4}


async def test_the_queue_depth_gauge_counts_runs_waiting_for_a_slot(memory_engine, metric_reader):
    reg = sl.Registry()
    release = asyncio.Event()

    @sl.task(id="slow", registry=reg)
    async def slow(p: int) -> int:
        await release.wait()
        return p

    await memory_engine(reg, concurrency=1)
    handles = [await slow.trigger(i) for i in range(4)]

    def depth() -> dict[str, int]:
        return {p.attributes["stepline.queue"]: p.value
                for p in metric_points(metric_reader).get("stepline.queue.depth", [])}

    await eventually(lambda: depth() == {"task/slow": 3}, timeout=10, what="three runs waiting")
    states = {p.attributes["stepline.state"]: p.value
              for p in metric_points(metric_reader)["stepline.partition.runs"]}
    assert states == {"running": 1, "pending": 3}
    release.set()
    for h in handles:
        await h.result(timeout=10)
    await eventually(lambda: depth() == {}, timeout=10, what="an empty queue")


# --- exporters from the environment ------------------------------------------------------

_CONFIGURED = """
import asyncio, sys
from opentelemetry import trace
import stepline as sl

async def main():
    sl.configure_logging()
    async with sl.Client("memory://env") as client:
        await client.trigger("anything", 1)
    print("PROVIDER", type(trace.get_tracer_provider()).__name__, flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize(("env", "expect_out"), [
    ({}, ["PROVIDER ProxyTracerProvider"]),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "shop"},
     ["PROVIDER TracerProvider", '"name": "stepline.trigger"', '"service.name": "shop"']),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, ["PROVIDER"]),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, ["PROVIDER ProxyTracerProvider"]),
], ids=["no-variables", "console", "otlp-endpoint", "sdk-disabled"])
async def test_the_cli_set_up_installs_exporters_only_when_otel_variables_ask(env, expect_out):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", _CONFIGURED], env={**clean, **env},
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for text in expect_out:
        assert text in proc.stdout
    if env.get("OTEL_SDK_DISABLED"):
        assert "stepline.trigger" not in proc.stdout  # nothing exported, to the console or anywhere
    if "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
        try:
            import opentelemetry.exporter.otlp.proto.http  # noqa: F401
        except ImportError:  # the package is optional: then a warning, and no exporter
            assert "opentelemetry-exporter-otlp-proto-http is not installed" in proc.stderr
            assert "PROVIDER ProxyTracerProvider" in proc.stdout
        else:
            assert "PROVIDER TracerProvider" in proc.stdout
