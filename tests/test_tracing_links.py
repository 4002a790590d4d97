"""OpenTelemetry as users expect it: runs started by an event or a schedule link
to their cause, spans crossing the log say so in messaging.* attributes,
durations in seconds, the OTEL_* switches honoured, isolated steps traced."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import stepline as sl
from stepline.observability import tracing
from stepline.sdk.interceptors import Interceptors

from .conftest import eventually
from .test_tracing import metric_points, metric_reader, named, span_id, spans, trace_id  # noqa: F401  # fixtures

pytestmark = pytest.mark.asyncio

ISOLATED_APP = Path(__file__).parent / "apps" / "isolated_app.py"


def system_of(url: str) -> str:
    scheme = url.partition(":")[0]
    return "kafka" if scheme == "kafka" else f"stepline.{scheme}"


# --- links to the cause --------------------------------------------------------------------


async def test_runs_of_a_published_event_link_to_the_span_that_published_it(engine_factory, spans):  # noqa: F811
    reg = sl.Registry()

    @sl.task(id="welcome", registry=reg, on=sl.Subscription("user.created"))
    async def welcome(data: dict) -> str:
        return f"hello {data['name']}"

    @sl.task(id="audit", registry=reg, on=sl.Subscription("user.*"))
    async def audit(data: dict) -> str:
        return "noted"

    e = await engine_factory(reg)
    provider = tracing.current_tracer_provider()
    with provider.get_tracer("web").start_as_current_span("POST /signup") as request:
        event_id = await e.client.publish("user.created", {"name": "ada"}, key="u1")

    runs = await eventually(lambda: len(named(spans, "stepline.run welcome") + named(spans, "stepline.run audit")) == 2
                            and named(spans, "stepline.run welcome") + named(spans, "stepline.run audit"),
                            timeout=30, what="both subscribers' attempt spans")
    [publish] = named(spans, "stepline.publish user.created")
    assert publish.kind == SpanKind.PRODUCER
    assert publish.parent is not None and publish.parent.span_id == request.get_span_context().span_id
    attrs = dict(publish.attributes or {})
    assert attrs["messaging.system"] == system_of(e.client.log.url)
    assert attrs["messaging.operation.type"] == "send"
    assert attrs["messaging.operation.name"] == "publish"
    assert attrs["messaging.destination.name"] == e.client.topics.events
    assert attrs["messaging.message.id"] == event_id
    assert ("messaging.kafka.offset" in attrs) == (attrs["messaging.system"] == "kafka")

    triggers = [s for s in named(spans, "stepline.trigger") if (s.attributes or {})["stepline.task_id"]
                in ("welcome", "audit")]
    assert len(triggers) == 2
    for span in [*runs, *triggers]:
        # A trace of its own per run, linked to the publisher's span.
        assert trace_id(span) != trace_id(publish)
        [link] = span.links
        assert link.context.span_id == span_id(publish) and link.context.trace_id == trace_id(publish)
    for trigger in triggers:
        assert trigger.parent is None
        [link] = trigger.links
        link_attrs = dict(link.attributes or {})
        assert link_attrs["messaging.message.id"] == event_id
        assert link_attrs["messaging.operation.type"] == "process"
        assert link_attrs["messaging.destination.name"] == e.client.topics.events
        assert link_attrs["messaging.destination.partition.id"] == attrs["messaging.destination.partition.id"]
    for run in runs:
        [trigger] = [t for t in triggers if span_id(t) == (run.parent.span_id if run.parent else None)]
        assert (run.attributes or {})["messaging.operation.type"] == "process"


async def test_an_event_published_untraced_starts_runs_linked_to_nothing(engine_factory, spans):  # noqa: F811
    reg = sl.Registry()

    @sl.task(id="welcome", registry=reg, on=sl.Subscription("user.created"))
    async def welcome(data: dict) -> str:
        return "hi"

    e = await engine_factory(reg)
    traced = e.client.interceptors
    e.client.interceptors = Interceptors([])  # as another service publishing without tracing
    try:
        await e.client.publish("user.created", {"name": "bob"})
    finally:
        e.client.interceptors = traced
    [run] = await eventually(lambda: named(spans, "stepline.run welcome"), timeout=30, what="the attempt span")
    assert not run.links
    assert named(spans, "stepline.publish user.created") == []


async def test_a_scheduled_run_links_to_its_tick_span(engine_factory, spans):  # noqa: F811
    reg = sl.Registry()

    @sl.task(id="tick", registry=reg, schedule=sl.Every(timedelta(seconds=1)))
    async def tick(p: dict) -> str:
        return p["scheduled_at"]

    await engine_factory(reg)
    run = (await eventually(lambda: named(spans, "stepline.run tick"), timeout=30, what="a tick's attempt"))[0]
    ticks = named(spans, "stepline.schedule tick")
    assert ticks, "the scheduler made no tick span"
    [link] = run.links
    [source] = [t for t in ticks if span_id(t) == link.context.span_id]
    assert source.kind == SpanKind.PRODUCER and source.parent is None
    assert trace_id(run) != trace_id(source)
    assert (source.attributes or {})["stepline.task_id"] == "tick"
    # The trigger's link says which tick (the attempt's link is the context alone).
    [trigger] = [t for t in named(spans, "stepline.trigger") if run.parent and span_id(t) == run.parent.span_id]
    [trigger_link] = trigger.links
    assert trigger_link.context.span_id == span_id(source)
    link_attrs, source_attrs = dict(trigger_link.attributes or {}), dict(source.attributes or {})
    assert link_attrs["stepline.schedule"] == source_attrs["stepline.schedule"] == "every 1s"
    assert link_attrs["stepline.scheduled_at"] == source_attrs["stepline.scheduled_at"]


# --- metrics ---------------------------------------------------------------------------------


async def test_step_durations_are_a_histogram_in_seconds_with_bucket_advice(engine_factory, metric_reader):  # noqa: F811
    reg = sl.Registry()

    @sl.step(name="nap")
    async def nap() -> None:
        await asyncio.sleep(0.05)

    @sl.task(id="napper", registry=reg)
    async def napper(p: None) -> None:
        await nap()

    await engine_factory(reg)
    await (await napper.trigger(None)).result(timeout=30)
    data = metric_reader.get_metrics_data()
    [metric] = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
                if m.name == "stepline.step.duration"]
    assert metric.unit == "s"
    [point] = metric.data.data_points
    assert tuple(point.explicit_bounds) == tracing.DURATION_BUCKETS
    # At least the nap, and nowhere near the 50 a millisecond unit would record.
    assert 0.05 <= point.sum < 10
    assert point.count == 1 and metric_points(metric_reader)


# --- OTEL_SDK_DISABLED and OTEL_PROPAGATORS ------------------------------------------------


async def test_otel_sdk_disabled_records_no_span_even_through_a_given_provider(engine_factory, monkeypatch):
    # The provider is made before the variable is set, so its own check
    # (the SDK's) cannot be what keeps it empty: Stepline's must.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    tracing.use_tracer_provider(provider)
    try:
        reg = sl.Registry()

        @sl.task(id="quiet", registry=reg)
        async def quiet(p: int) -> int:
            return p

        e = await engine_factory(reg)
        handle = await quiet.trigger(3)
        assert await handle.result(timeout=30) == 3
        assert exporter.get_finished_spans() == ()
        assert {ev.traceparent for _, ev in await e.client.history(handle.run_id)} == {None}
    finally:
        monkeypatch.delenv("OTEL_SDK_DISABLED")
        tracing.use_tracer_provider(None)
        provider.shutdown()


async def test_baggage_set_by_the_caller_reaches_the_steps(engine_factory, spans):  # noqa: F811
    # The default propagators (tracecontext,baggage) carry it in the envelope.
    reg = sl.Registry()

    @sl.step(name="whose")
    async def whose() -> str:
        return str(baggage.get_baggage("tenant"))

    @sl.task(id="tenanted", registry=reg)
    async def tenanted(p: None) -> str:
        return await whose()

    e = await engine_factory(reg)
    token = otel_context.attach(baggage.set_baggage("tenant", "acme"))
    try:
        handle = await tenanted.trigger(None)
    finally:
        otel_context.detach(token)
    assert await handle.result(timeout=30) == "acme"
    [(_, trigger)] = [(o, ev) for o, ev in await e.client.history(handle.run_id) if ev.type == "RunTriggered"]
    assert trigger.extra["propagation.baggage"] == "tenant=acme"


_B3 = """
import asyncio, json
from opentelemetry import baggage, context
from opentelemetry.sdk.trace import TracerProvider
import stepline as sl
from stepline.log.headers import event_headers
from stepline.observability import tracing
from stepline.testing import TestEngine

reg = sl.Registry()

@sl.step(name="whose")
async def whose() -> str:
    return str(baggage.get_baggage("tenant"))

@sl.task(id="b3", registry=reg)
async def b3(p: None) -> str:
    return await whose()

async def main():
    provider = TracerProvider()
    tracing.use_tracer_provider(provider)
    async with TestEngine(reg) as engine:
        context.attach(baggage.set_baggage("tenant", "acme"))
        with provider.get_tracer("web").start_as_current_span("request") as span:
            handle = await engine.client.trigger("b3", None)
        result = await handle.result(timeout=30)
        [trigger] = [ev for _, ev in await engine.client.history(handle.run_id) if ev.type == "RunTriggered"]
    print(json.dumps({"result": result, "extra": trigger.extra, "traceparent": trigger.traceparent,
                      "headers": [k for k, _ in event_headers(trigger)]}))

asyncio.run(main())
"""


@pytest.mark.parametrize(("propagators", "fields", "tenant"), [
    ("b3", {"propagation.b3"}, "None"),
    ("b3,baggage", {"propagation.b3", "propagation.baggage"}, "acme"),
    ("tracecontext", set(), "None"),
])
async def test_otel_propagators_picks_what_the_envelope_and_headers_carry(propagators, fields, tenant):
    pytest.importorskip("opentelemetry.propagators.b3")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    proc = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", _B3], env={**clean, "OTEL_PROPAGATORS": propagators},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["result"] == tenant
    assert {k for k in out["extra"] if k.startswith("propagation.")} == fields
    # W3C always, for the envelope's field; the configured fields also as Kafka headers.
    assert out["traceparent"].startswith("00-")
    assert {f"propagation.{h}" for h in out["headers"]} >= fields
    if "propagation.b3" in fields:
        trace_hex = out["traceparent"].split("-")[1]
        assert out["extra"]["propagation.b3"].startswith(trace_hex)


# --- isolated attempts -------------------------------------------------------------------


async def test_the_steps_of_an_isolated_attempt_are_spans_under_its_run_span(engine_factory, spans):  # noqa: F811
    app = sl.load_app(str(ISOLATED_APP))
    e = await engine_factory(app)
    handle = await e.client.trigger("iso-traced", 5)
    assert await handle.result(timeout=60) == 20
    [run] = await eventually(lambda: named(spans, "stepline.run iso-traced"), timeout=20, what="the attempt span")

    steps = named(spans, "stepline.step traced-inner")
    inner = named(spans, "inner work")
    assert len(steps) == 2 and len(inner) == 2
    for step in steps:
        assert step.parent is not None and step.parent.span_id == span_id(run)
        assert trace_id(step) == trace_id(run)
        assert step.status.status_code == StatusCode.UNSET
    # The task's own spans keep the ids the child gave them, under their steps.
    assert {s.parent.span_id for s in inner if s.parent} == {span_id(s) for s in steps}
    assert sorted((s.attributes or {})["stepline.step"] for s in steps) == [0, 1]
    history = [ev for _, ev in await e.client.history(handle.run_id)]
    assert {(ev.traceparent or "")[:52] for ev in history[1:]} == {f"00-{trace_id(run):032x}-{span_id(run):016x}"}
