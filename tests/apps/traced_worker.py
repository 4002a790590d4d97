"""A traced worker process for tests/test_tracing.py.

    python tests/apps/traced_worker.py LOG_URL SPANS_JSON STOP_FILE

Installs a global SDK tracer provider (this process is its own), runs the
task `traced` from LOG_URL until STOP_FILE exists, then writes the spans it
finished to SPANS_JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import stepline as sl

registry = sl.Registry()


@sl.step(name="first")
async def first(x: int) -> int:
    return x + 1


@sl.step(name="second")
async def second(x: int) -> int:
    return x * 10


@sl.task(id="traced", registry=registry)
async def traced(p: int) -> int:
    return await second(await first(p))


def as_json(span: ReadableSpan) -> dict[str, Any]:
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": trace.format_trace_id(ctx.trace_id),
        "span_id": trace.format_span_id(ctx.span_id),
        "parent_span_id": trace.format_span_id(span.parent.span_id) if span.parent else None,
        "attributes": dict(span.attributes or {}),
    }


async def main(url: str, out: Path, stop: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    async with sl.Client(url, registry=registry) as client:
        async with sl.Worker(registry, client.log, topics=client.topics, client=client):
            while not stop.exists():
                await asyncio.sleep(0.02)
    out.write_text(json.dumps([as_json(s) for s in exporter.get_finished_spans()]))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])))
