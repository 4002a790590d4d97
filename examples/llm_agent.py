"""An LLM-style agent that waits out a rate limit as the API asks, durably.

    .venv/bin/python examples/llm_agent.py ["How does a durable task survive a crash?"]

The script starts a fake model API on 127.0.0.1 (aiohttp, a free port). Its
`/v1/search` answers at once; its `/v1/chat` is rate-limited: 429 with
`Retry-After: 1` to the first two calls (LLM_RATE_LIMITED_CALLS), then 500
once, then the answer. The `answer-question` task searches, then asks the
model, with one retry rule per kind of HTTP error:

    429  a fixed delay, but the server's Retry-After wins: the run waits 1 s
    5xx  exponential back-off without jitter: 0.3 s, 0.6 s, 1.2 s, ...
    401  never: a bad key does not get better by trying again

Each retry runs the task from the top, and the search step comes back from
the run's journal: the fake API counts one search however often chat is
retried. What it prints comes from the run's history (`client.history`):
each attempt, the failed call and the RetryScheduled delay and reason. A
second run, with a revoked key, fails after its first attempt.

The log is `.stepline/stepline.db` unless STEPLINE_LOG says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel

import stepline as sl

RATE_LIMITED_CALLS = int(os.environ.get("LLM_RATE_LIMITED_CALLS", "2"))

# Keys are looked up by name: a payload is recorded in the log, so it carries no secret.
API_KEYS = {"default": "sk-demo", "revoked": "sk-revoked"}


class AgentIn(BaseModel):
    question: str
    api: str  # the model API's base URL
    key_name: str = "default"


class APIError(Exception):
    """An HTTP error from the model API.

    `sl.http_status` matches on `status_code`; retry policies honour
    `retry_after` (seconds) unless told not to.
    """

    def __init__(self, status_code: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status_code} {message}")
        self.status_code = status_code
        self.retry_after = retry_after


async def call_api(payload: AgentIn, path: str, body: dict[str, Any]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {API_KEYS[payload.key_name]}"}
    async with aiohttp.ClientSession() as http, http.post(payload.api + path, json=body, headers=headers) as resp:
        if resp.status >= 400:
            hint = resp.headers.get("Retry-After")  # seconds; the HTTP-date form is left out here
            raise APIError(resp.status, await resp.text(), float(hint) if hint else None)
        result: dict[str, Any] = await resp.json()
        return result


@sl.step
async def search(payload: AgentIn) -> list[str]:
    return (await call_api(payload, "/v1/search", {"q": payload.question}))["results"]


@sl.step
async def ask_model(payload: AgentIn, sources: list[str]) -> str:
    reply = await call_api(payload, "/v1/chat", {"question": payload.question, "context": sources})
    return reply["answer"]


RETRY = (
    sl.Retry(max_attempts=3, min_timeout=0.1, max_timeout=1)                   # anything else
    .on(sl.http_status(429), sl.Retry.fixed_delay(5, max_attempts=10))        # Retry-After, when sent, wins
    .on(sl.http_status(500, 502, 503, 504), sl.Retry.exponential(6, min_timeout=0.3, randomize=False))
    .on(sl.http_status(401), sl.Retry.never())
)


@sl.task(id="answer-question", retry=RETRY)
async def answer_question(payload: AgentIn) -> dict:
    sources = await search(payload)                 # checkpoint: not searched again on a retry
    answer = await ask_model(payload, sources)      # rate-limited
    return {"question": payload.question, "sources": len(sources), "answer": answer}


class FakeModelAPI:
    """The model provider, on a free local port; counts the calls it gets."""

    def __init__(self, rate_limited_calls: int) -> None:
        self.rate_limited_calls = rate_limited_calls
        self.calls: Counter[str] = Counter()
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/v1/search", self._search)
        app.router.add_post("/v1/chat", self._chat)
        self._runner = web.AppRunner(app)
        self.url = ""

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {API_KEYS['default']}":
            return web.Response(status=401, text="invalid API key")
        self.calls[request.path] += 1
        return await handler(request)

    async def _search(self, request: web.Request) -> web.Response:
        q = (await request.json())["q"]
        return web.json_response({"results": [f"https://example.org/{n}?q={q[:20]}" for n in (1, 2, 3)]})

    async def _chat(self, request: web.Request) -> web.Response:
        n = self.calls["/v1/chat"]
        if n <= self.rate_limited_calls:
            return web.Response(status=429, text="rate limit reached", headers={"Retry-After": "1"})
        if n == self.rate_limited_calls + 1:
            return web.Response(status=500, text="the model is overloaded")
        context = (await request.json())["context"]
        return web.json_response({"answer": f"{len(context)} sources agree: it resumes from its last checkpoint."})

    async def __aenter__(self) -> FakeModelAPI:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


async def print_history(client: sl.Client, run_id: str) -> None:
    for _, ev in await client.history(run_id):
        b: Any = ev.body
        if ev.type == "RunStarted":
            print(f"  attempt {b.attempt}")
        elif ev.type == "StepCompleted":
            print(f"    {b.name} completed")
        elif ev.type == "StepFailed":
            print(f"    {b.name} failed: {b.error.type}: {b.error.message}")
        elif ev.type == "RetryScheduled":
            print(f"  retry -> attempt {b.attempt} after {b.delay_ms} ms ({b.reason})")


async def main() -> int:
    sl.configure_logging(json_logs=False, level=logging.WARNING)
    url = os.environ.get("STEPLINE_LOG", sl.DEFAULT_LOG_URL)
    question = sys.argv[1] if len(sys.argv) > 1 else "How does a durable task survive a crash?"
    async with FakeModelAPI(RATE_LIMITED_CALLS) as api, sl.Client(url) as client:
        async with sl.Worker(sl.default_registry, client.log, client=client):
            handle = await answer_question.trigger(AgentIn(question=question, api=api.url))
            print(f"triggered answer-question as {handle.run_id}; model API at {api.url}")
            result = await handle.result(timeout=60)
            calls = dict(api.calls)
            await print_history(client, handle.run_id)

            revoked = await answer_question.trigger(AgentIn(question=question, api=api.url, key_name="revoked"))
            with contextlib.suppress(sl.RunFailedError):
                await revoked.result(timeout=60)
            state = await revoked.state()
    print(f"\nAPI calls: {json.dumps(calls)}")
    print(f"result: {json.dumps(result)}")
    err = f"{state.error.type}: {state.error.message}" if state.error else "no error"
    print(f"revoked key: {state.status} after {state.attempt} attempt(s), {len(state.retries)} retries ({err})")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
