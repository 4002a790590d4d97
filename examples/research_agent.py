"""Trigger.dev's research agent, durable on Stepline's embedded log.

    .venv/bin/python examples/research_agent.py ["durable execution"]

The `research` task searches for a topic, browses the results in parallel
(one `browse` step per URL under `asyncio.gather`), then has an LLM analyze
the pages. The LLM call is flaky and fails the first time. The retry policy
runs the task again from the top, and journal replay hands back the
recorded search results and pages instead of fetching them again, so only
`analyze` runs twice: the execution counts printed at the end show it.

Search, browsing and the LLM are simulated with deterministic data: no
network. The log is `.stepline/stepline.db` unless STEPLINE_LOG says otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections import Counter

from pydantic import BaseModel

import stepline as sl

calls: Counter[str] = Counter()


class ResearchIn(BaseModel):
    topic: str


class Page(BaseModel):
    url: str
    title: str
    text: str


class LLMUnavailable(ConnectionError):
    """The model provider dropped the request: worth retrying."""


@sl.step
async def search(topic: str) -> list[str]:
    calls["search"] += 1
    slug = "-".join(topic.lower().split())
    return [f"https://example.org/{slug}/{n}" for n in (1, 2, 3)]


@sl.step
async def browse(url: str) -> Page:
    calls[f"browse {url}"] += 1
    await asyncio.sleep(0.05)  # a page load; the three overlap
    n = url.rsplit("/", 1)[-1]
    return Page(url=url, title=f"Source {n}", text=f"Finding {n}: it depends on the workload.")


@sl.step
async def analyze(topic: str, pages: list[Page]) -> str:
    calls["analyze"] += 1
    if calls["analyze"] == 1:
        raise LLMUnavailable("the LLM provider closed the connection (simulated, first call only)")
    return f"{topic}: {len(pages)} sources read; " + " ".join(p.text for p in pages)


@sl.task(id="research", retry=sl.Retry(max_attempts=3, min_timeout=0.1, max_timeout=1))
async def research(payload: ResearchIn) -> dict:
    urls = await search(payload.topic)
    pages = await asyncio.gather(*(browse(url) for url in urls))
    summary = await analyze(payload.topic, list(pages))
    return {"status": "completed", "topic": payload.topic, "sources": urls, "summary": summary}


async def main() -> int:
    sl.configure_logging(json_logs=False, level=logging.WARNING)
    url = os.environ.get("STEPLINE_LOG", sl.DEFAULT_LOG_URL)
    topic = sys.argv[1] if len(sys.argv) > 1 else "durable execution"
    async with sl.Client(url) as client:
        async with sl.Worker(sl.default_registry, client.log, client=client):
            handle = await research.trigger(ResearchIn(topic=topic))
            print(f"triggered research as {handle.run_id} on {url}")
            result = await handle.result(timeout=60)
            state = await handle.state()
    print()
    for st in sorted(state.steps.values(), key=lambda s: s.step):
        print(f"  step {st.step}  {st.name:<10} {st.status:<10} attempt {st.attempt}")
    for r in state.retries:
        print(f"  retry -> attempt {r.attempt} after {r.delay_ms} ms ({r.reason})")
    print(f"\nexecutions: {json.dumps(dict(calls))}")
    print(f"result: {json.dumps(result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
