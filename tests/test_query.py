"""The query projection and the read API over it, on every backend, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp

import stepline as sl
from stepline.log.topics import Topics
from stepline.projections import query_sql
from stepline.projections.query import QueryProjector, QueryStore, RunFilter, rebuild
from stepline.server import create_app

from .conftest import eventually
from .test_server import TOKEN, bearer, call, config, serving

TIMEOUT = 30


@asynccontextmanager
async def projection(e: Any, db: Path) -> AsyncIterator[tuple[QueryStore, QueryProjector]]:
    async with QueryStore(db) as store:
        async with QueryProjector(e.client.log, store, topics=e.topics) as projector:
            yield store, projector


@asynccontextmanager
async def read_api(e: Any, tmp_path: Path) -> AsyncIterator[tuple[aiohttp.ClientSession, str, QueryProjector]]:
    """The app with a live query projection, served on a free port."""
    async with projection(e, tmp_path / "query.db") as (store, projector):
        async with serving(create_app(e.client, config(), e.registry, query=store)) as base:
            async with aiohttp.ClientSession(headers=bearer()) as session:
                yield session, base, projector


async def get(session: aiohttp.ClientSession, url: str, **params: Any) -> tuple[int, Any]:
    async with session.get(url, params=params) as resp:
        return resp.status, await resp.json()


async def all_pages(session: aiohttp.ClientSession, url: str, **params: Any) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    cursor = None
    while True:
        status, body = await get(session, url, **params, **({"cursor": cursor} if cursor else {}))
        assert status == 200, body
        assert len(body["runs"]) <= int(params.get("limit", 50))
        runs += body["runs"]
        cursor = body["next_cursor"]
        if cursor is None:
            return runs


def ids(runs: list[dict[str, Any]]) -> list[str]:
    return [r["run_id"] for r in runs]


def newest_first(states: list[sl.RunState]) -> list[str]:
    return [s.run_id for s in sorted(states, key=lambda s: (s.created_at, s.run_id), reverse=True)]


async def stored_status(store: QueryStore, run_id: str) -> str | None:
    runs = [r for r in (await store.list_runs(RunFilter(), limit=500)).items if r["run_id"] == run_id]
    return runs[0]["status"] if runs else None


async def ended(e: Any, handles: list[Any]) -> None:
    for h in handles:
        await e.client.wait(h.run_id, timeout=TIMEOUT)


def shop_app(gate: asyncio.Event | None = None) -> sl.Registry:
    reg = sl.Registry()

    @sl.task(id="resize", registry=reg)
    async def resize(p: dict) -> dict:
        return {"thumb": p["file"].replace(".png", "-small.png")}

    @sl.task(id="email", registry=reg, on=sl.Subscription("user.created"))
    async def email(p: dict) -> str:
        return f"sent to {p.get('to') or p.get('name')}"

    @sl.task(id="audit", registry=reg, on=sl.Subscription("user.*", where={"plan": ["pro"]}))
    async def audit(p: dict) -> str:
        return "audited"

    @sl.task(id="doomed", registry=reg)
    async def doomed(p: dict) -> str:
        if not p.get("ok"):
            raise sl.FatalError(f"refused {p}")
        return "fixed"

    @sl.task(id="gated", registry=reg)
    async def gated(p: dict) -> str:
        if gate is not None:
            await gate.wait()
        return "opened"

    return reg


# --- the projection -----------------------------------------------------------------


async def test_runs_appear_in_the_store_with_their_status_as_they_progress(engine_factory, tmp_path):
    gate = asyncio.Event()
    e = await engine_factory(shop_app(gate))
    async with projection(e, tmp_path / "q.db") as (store, _):
        later = await e.client.trigger("resize", {"file": "a.png"}, delay=3600)
        h = await e.client.trigger("gated", {"n": 1})
        await eventually(lambda: _is(store, h.run_id, "running"), TIMEOUT, "the run to show as running")
        assert await stored_status(store, later.run_id) == "pending"
        gate.set()
        await eventually(lambda: _is(store, h.run_id, "completed"), TIMEOUT, "the run to show as completed")
        [row] = [r for r in (await store.list_runs(RunFilter())).items if r["run_id"] == h.run_id]
        assert row["started_at"] is not None and row["ended_at"] >= row["started_at"]
        assert row["task_id"] == "gated" and row["attempt"] == 1 and row["queue"] == "task/gated"
        assert await stored_status(store, later.run_id) == "pending"


async def _is(store: QueryStore, run_id: str, status: str) -> bool:
    return await stored_status(store, run_id) == status


async def test_filters_and_pages_return_exactly_the_matching_runs(engine_factory, tmp_path, monkeypatch):
    e = await engine_factory(shop_app())
    handles = []
    for i in range(10):
        handles.append(await e.client.trigger("resize", {"file": f"photo-{i}.png"}, tags=["img", f"size-{i % 2}"]))
        handles.append(await e.client.trigger("email", {"to": f"user{i}@example.com"}, tags=["mail"]))
        handles.append(await e.client.trigger("doomed", {"n": i}, tags=["mail", "bad"]))
        await asyncio.sleep(0.003)  # spread created_at, for the time range
    await ended(e, handles)
    states = [s for s in await e.client.list_runs()]
    assert len(states) == 30

    async with read_api(e, tmp_path) as (http, base, projector):
        runs_url = base + "/v1/runs"

        async def dead_lettered() -> bool:
            _, body = await get(http, runs_url, dead_letter="true", limit=50)
            return len(body["runs"]) == 10

        await eventually(dead_lettered, TIMEOUT, "the dead letters")
        await projector.wait_caught_up()

        paged = await all_pages(http, runs_url, limit=7)
        assert ids(paged) == newest_first(states)  # every run once, newest first
        _, first = await get(http, runs_url)
        assert first["total_estimate"] == 30 and first["next_cursor"] is None

        def expect(pred: Any) -> list[str]:
            return newest_first([s for s in states if pred(s)])

        times = sorted(s.created_at for s in states)
        t_from, t_to = times[8], times[21]
        assert t_from < t_to
        cases: list[tuple[dict[str, Any], list[str]]] = [
            ({"task": "resize"}, expect(lambda s: s.task_id == "resize")),
            ({"status": "failed"}, expect(lambda s: s.task_id == "doomed")),
            ({"status": "failed,completed"}, newest_first(states)),
            ({"dead_letter": "true"}, expect(lambda s: s.task_id == "doomed")),
            ({"dead_letter": "false"}, expect(lambda s: s.task_id != "doomed")),
            ({"tag": "mail"}, expect(lambda s: "mail" in s.tags)),
            ({"tag": ["mail", "bad"]}, expect(lambda s: s.task_id == "doomed")),
            ({"tag": "size-1"}, expect(lambda s: "size-1" in s.tags)),
            ({"task": "resize", "tag": "size-0"}, expect(lambda s: "size-0" in s.tags)),
            ({"from": t_from, "to": t_to}, expect(lambda s: t_from <= s.created_at < t_to)),
            ({"tag": "mail", "from": t_from}, expect(lambda s: "mail" in s.tags and s.created_at >= t_from)),
            ({"q": "photo-3."}, [h.run_id for h in handles if h.task_id == "resize"][3:4]),
            # The output is searched too: only email's outputs say "sent to".
            ({"q": "sent to user7@"}, [h.run_id for h in handles if h.task_id == "email"][7:8]),
            ({"q": "100%_"}, []),
            ({"q": "7@"}, [h.run_id for h in handles if h.task_id == "email"][7:8]),  # too short for trigrams
            ({"q": "EXAMPLE.com", "tag": "mail"}, expect(lambda s: s.task_id == "email")),
            ({"task": "nope"}, []),
        ]
        for params, expected in cases:
            query = [(k, str(x)) for k, v in params.items() for x in (v if isinstance(v, list) else [v])]
            got = await all_pages_q(http, runs_url, query + [("limit", "4")])
            assert ids(got) == expected, params
        # A term matching many runs is scanned for, not fetched through the index: same answers.
        monkeypatch.setattr(query_sql, "RARE_TEXT", 1)
        for params, expected in cases:
            if "q" in params:
                got = await all_pages_q(http, runs_url, [*((k, str(v)) for k, v in params.items()), ("limit", "4")])
                assert ids(got) == expected, params
        [doomed] = (await get(http, runs_url, task="doomed", limit=1))[1]["runs"]
        assert doomed["status"] == "failed" and doomed["dead_lettered"] is True
        assert doomed["error_type"] == "FatalError" and "refused" in doomed["error_message"]
        assert doomed["tags"] == ["mail", "bad"]

        for bad in ({"status": "finished"}, {"limit": "0"}, {"limit": "501"}, {"from": "yesterday"},
                    {"cursor": "not-a-cursor"}, {"dead_letter": "maybe"}):
            status, body = await get(http, runs_url, **bad)
            assert status == 400 and body["error"], bad
        async with aiohttp.ClientSession() as anonymous:
            status, _ = await get(anonymous, runs_url)
            assert status == 401


async def all_pages_q(http: aiohttp.ClientSession, url: str, query: list[tuple[str, str]]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = query + ([("cursor", cursor)] if cursor else [])
        async with http.get(url, params=params) as resp:
            body = await resp.json()
            assert resp.status == 200, body
        runs += body["runs"]
        cursor = body["next_cursor"]
        if cursor is None:
            return runs


async def test_the_projector_resumes_after_a_restart_without_duplicates_or_gaps(engine_factory, tmp_path):
    gate = asyncio.Event()
    e = await engine_factory(shop_app(gate))
    db = tmp_path / "q.db"
    published: list[str] = []
    async with QueryStore(db) as store:
        projector = QueryProjector(e.client.log, store, topics=e.topics)
        await projector.start()
        first = [await e.client.trigger("resize", {"file": f"{i}.png"}, tags=["before"]) for i in range(5)]
        published.append(await e.client.publish("user.created", {"name": "ada", "plan": "pro"}))
        held = await e.client.trigger("gated", {})
        await ended(e, first)
        await eventually(lambda: _is(store, held.run_id, "running"), TIMEOUT, "the held run to run")
        await projector.close()
        at_stop = {t: await store.offsets(t) for t in (e.topics.runs, e.topics.events)}

    # While no projector runs: new runs, new events, and an old run ends.
    second = [await e.client.trigger("resize", {"file": f"b{i}.png"}, tags=["after"]) for i in range(5)]
    published.append(await e.client.publish("user.created", {"name": "bob"}))
    gate.set()
    await ended(e, [*second, held])
    fanned = await eventually(lambda: _fanned_out(e, 3), TIMEOUT, "the fan-out runs")
    await ended(e, fanned)

    async with projection(e, db) as (store, projector):
        await projector.wait_caught_up(TIMEOUT)
        truth = {s.run_id: s for s in await e.client.list_runs()}
        rows = await store.table("runs")
        assert len(rows) == len(truth) == 5 + 1 + 5 + 3
        assert {r[0]: r[2] for r in rows} == {i: s.status for i, s in truth.items()}
        assert await stored_status(store, held.run_id) == "completed"  # resumed from its stored state
        assert sorted(r[0] for r in await store.table("domain_events")) == sorted(published)
        tags = sorted(tag for tag, _, _ in await store.table("run_tags"))
        assert tags == ["after"] * 5 + ["before"] * 5 + ["event:user.created"] * 3  # fan-outs are tagged
        # It read only what was appended after the first projector's last write.
        ends = 0
        for topic in (e.topics.runs, e.topics.events):
            for p in range(await e.client.log.partitions(topic)):
                ends += await e.client.log.end_offset(topic, p)
        stopped_at = sum(o for offsets in at_stop.values() for o, _ in offsets.values())
        assert ends - stopped_at > 0
        # The store's offsets are committed before the projector counts the
        # batch, so wait_caught_up can return a moment before the count does.
        await eventually(lambda: _settled(projector.applied, ends - stopped_at), TIMEOUT,
                         f"the projector to count {ends - stopped_at} records read after the restart")
        assert projector.applied == ends - stopped_at


async def _settled(applied: int, expected: int) -> bool | None:
    # More than expected is a re-read: fail at once rather than wait.
    assert applied <= expected, f"the projector read {applied} records, {applied - expected} twice"
    return True if applied == expected else None


async def _fanned_out(e: Any, n: int) -> list[sl.RunState] | None:
    runs = [r for r in await e.client.list_runs() if (r.idempotency_key or "").startswith("stepline/event/")]
    return runs if len(runs) >= n else None


async def test_a_rebuild_from_scratch_gives_the_rows_of_the_live_projection(engine_factory, tmp_path):
    e = await engine_factory(shop_app())
    handles = [await e.client.trigger("resize", {"file": f"{i}.png"}, tags=[f"t{i % 3}"]) for i in range(12)]
    handles += [await e.client.trigger("doomed", {"n": i}) for i in range(3)]
    await e.client.publish("user.created", {"name": "cy", "plan": "pro"})
    await e.client.publish("order.placed", {"id": 1})
    await ended(e, handles)
    fanned = await eventually(lambda: _fanned_out(e, 2), TIMEOUT, "the fan-out runs")
    await ended(e, fanned)
    await e.client.retry(handles[-1].run_id, {"ok": True}, new_payload=True)
    await eventually(lambda: _completed(e, handles[-1].run_id), TIMEOUT, "the retried run")

    async with projection(e, tmp_path / "live.db") as (live, projector):
        await projector.wait_caught_up(TIMEOUT)
        calls: list[tuple[int, int]] = []
        target = tmp_path / "rebuilt.db"
        for _ in range(2):  # the second time over an existing file
            calls.clear()
            n = await rebuild(e.url, str(target), lambda done, total: calls.append((done, total)),
                              namespace=e.topics.namespace)
            assert calls[-1] == (n, n) and n > 0
            assert [d for d, _ in calls] == sorted(d for d, _ in calls)
            await projector.wait_caught_up(TIMEOUT)
            async with QueryStore(target) as rebuilt:
                for table in ("runs", "run_tags", "domain_events", "offsets"):
                    assert await rebuilt.table(table) == await live.table(table), table
                assert len(await rebuilt.table("runs")) == 17
                assert len(await rebuilt.table("domain_events")) == 2
        assert not Path(str(target) + ".rebuild").exists()


async def _completed(e: Any, run_id: str) -> bool:
    return (await e.client.get_run(run_id)).status == "completed"


# --- the read API ---------------------------------------------------------------------


async def test_an_events_runs_are_listed_under_it(engine_factory, tmp_path):
    e = await engine_factory(shop_app())
    async with read_api(e, tmp_path) as (http, base, projector):
        signup = await e.client.publish("user.created", {"name": "dee", "plan": "pro"})
        other = await e.client.publish("order.placed", {"id": 7})
        fanned = await eventually(lambda: _fanned_out(e, 2), TIMEOUT, "the fan-out runs")
        await ended(e, fanned)

        async def listed() -> dict[str, Any] | None:
            status, body = await get(http, base + "/v1/events")
            assert status == 200
            events = {ev["event_id"]: ev for ev in body["events"]}
            runs = events.get(signup, {}).get("runs", [])
            done = len(runs) == 2 and all(r["status"] == "completed" for r in runs)
            return events if done and other in events else None

        events = await eventually(listed, TIMEOUT, "the event with its two runs")
        ev = events[signup]
        assert ev["name"] == "user.created" and ev["data"] == {"name": "dee", "plan": "pro"}
        assert ev["source"] == "api"
        assert sorted(r["task_id"] for r in ev["runs"]) == ["audit", "email"]
        assert events[other]["runs"] == []

        status, named = await get(http, base + "/v1/events", name="order.placed")
        assert status == 200 and [x["event_id"] for x in named["events"]] == [other]
        status, first = await get(http, base + "/v1/events", limit=1)
        assert len(first["events"]) == 1 and first["next_cursor"]
        status, rest = await get(http, base + "/v1/events", limit=1, cursor=first["next_cursor"])
        assert {first["events"][0]["event_id"], rest["events"][0]["event_id"]} == {signup, other}
        assert rest["next_cursor"] is None


async def test_a_dead_letter_retried_over_http_completes(engine_factory, tmp_path):
    e = await engine_factory(shop_app())
    async with read_api(e, tmp_path) as (http, base, projector):
        h = await e.client.trigger("doomed", {"ok": False})

        async def dead() -> list[dict[str, Any]]:
            return (await get(http, base + "/v1/runs", dead_letter="true"))[1]["runs"]

        [row] = await eventually(dead, TIMEOUT, "the dead letter")
        assert row["run_id"] == h.run_id and row["status"] == "failed"

        status, body = await call(http, "POST", base + f"/v1/runs/{h.run_id}/retry", {"payload": {"ok": True}})
        assert status == 202 and body == {"run_id": h.run_id, "retriggered": True, "was": "failed",
                                          "new_payload": True}

        async def completed() -> dict[str, Any] | None:
            runs = (await get(http, base + "/v1/runs", task="doomed"))[1]["runs"]
            return runs[0] if runs and runs[0]["status"] == "completed" else None

        done = await eventually(completed, TIMEOUT, "the retried run to complete")
        assert done["dead_lettered"] is False and done["error_type"] is None
        assert await dead() == []

        status, body = await call(http, "POST", base + f"/v1/runs/{h.run_id}/retry", {})
        assert status == 409 and "completed" in body["error"]
        status, body = await call(http, "POST", base + "/v1/runs/run_nope/retry", b"")
        assert status == 404
        status, body = await call(http, "POST", base + f"/v1/runs/{h.run_id}/retry", {"payload": 1, "x": 2})
        assert status == 400 and "unknown field" in body["error"]


async def test_the_stream_sends_a_run_message_for_a_new_run(engine_factory, tmp_path):
    e = await engine_factory(shop_app())
    async with read_api(e, tmp_path) as (http, base, projector):
        async with aiohttp.ClientSession() as browser:  # no Authorization header, as EventSource
            async with browser.get(base + "/v1/stream") as refused:
                assert refused.status == 401
            async with browser.get(base + "/v1/stream", params={"token": "wrong"}) as refused:
                assert refused.status == 401
            async with browser.get(base + "/v1/stream", params={"token": TOKEN}) as stream:
                assert stream.status == 200
                assert stream.headers["Content-Type"].startswith("text/event-stream")
                h = await e.client.trigger("resize", {"file": "live.png"}, tags=["sse"])
                seen = await asyncio.wait_for(_run_message(stream, h.run_id), 10)
                assert seen["task_id"] == "resize" and seen["tags"] == ["sse"]
                assert seen["status"] in ("pending", "running", "completed")


async def _run_message(stream: aiohttp.ClientResponse, run_id: str) -> dict[str, Any]:
    event = None
    async for raw in stream.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: ") and event == "run":
            data = json.loads(line[len("data: "):])
            if data["run_id"] == run_id:
                return dict(data)
        elif not line:
            event = None
    raise AssertionError("the stream ended")


def family_app(gate: asyncio.Event) -> sl.Registry:
    reg = sl.Registry()

    @sl.task(id="child", registry=reg)
    async def child(n: int) -> int:
        return n * 10

    @sl.task(id="parent", registry=reg)
    async def parent(ns: list[int]) -> list[int]:
        return await child.batch_trigger_and_wait(ns)

    @sl.task(id="mailer", registry=reg, queue=sl.Queue("mail", concurrency_limit=2, key_limit=5))
    async def mailer(p: dict) -> str:
        await gate.wait()
        return "sent"

    @sl.task(id="nightly", registry=reg, schedule=sl.Every(timedelta(hours=1)))
    async def nightly(tick: dict) -> None:
        return None

    return reg


async def test_children_history_queues_and_schedules(engine_factory, tmp_path):
    gate = asyncio.Event()
    e = await engine_factory(family_app(gate))
    async with read_api(e, tmp_path) as (http, base, projector):
        parent = await e.client.trigger("parent", [1, 2, 3])
        assert await parent.result(timeout=TIMEOUT) == [10, 20, 30]

        async def children() -> list[dict[str, Any]] | None:
            runs = (await get(http, base + f"/v1/runs/{parent.run_id}/children"))[1]["runs"]
            return runs if len(runs) == 3 and all(r["status"] == "completed" for r in runs) else None

        kids = await eventually(children, TIMEOUT, "the three children")
        assert {r["task_id"] for r in kids} == {"child"} and {r["parent_run_id"] for r in kids} == {parent.run_id}
        assert ids(kids) == newest_first([await e.client.get_run(r["run_id"]) for r in kids])

        status, history = await get(http, base + f"/v1/runs/{parent.run_id}/history")
        assert status == 200
        types = [ev["type"] for ev in history["events"]]
        assert types[0] == "RunTriggered" and types[-1] == "RunCompleted" and "RunSuspended" in types
        assert history["events"][0]["body"]["payload"] == [1, 2, 3]
        status, _ = await get(http, base + "/v1/runs/run_nope/history")
        assert status == 404

        mails = [await e.client.trigger("mailer", {"i": i}) for i in range(3)]

        async def held() -> dict[str, Any] | None:
            queues = {q["name"]: q for q in (await get(http, base + "/v1/queues"))[1]["queues"]}
            mail = queues.get("mail")
            return queues if mail and mail["running"] == 2 and mail["pending"] == 1 else None

        queues = await eventually(held, TIMEOUT, "two mails running and one waiting")
        assert queues["mail"]["limit"] == 2 and queues["mail"]["key_limit"] == 5
        assert queues["task/child"]["running"] == queues["task/child"]["pending"] == 0
        assert queues["task/child"]["limit"] is None
        gate.set()
        await ended(e, mails)

        status, body = await get(http, base + "/v1/schedules")
        assert status == 200
        [nightly] = body["schedules"]
        assert nightly["task_id"] == "nightly" and nightly["schedule"] == "every 3600s"
        assert nightly["next_tick_ms"] % 3_600_000 == 0 and nightly["next_tick"].endswith("+00:00")
        assert 0 < nightly["next_tick_ms"] - e.client.clock() <= 3_600_000


async def test_lists_answer_503_without_a_query_store(engine_factory):
    e = await engine_factory(shop_app())
    h = await e.client.trigger("resize", {"file": "x.png"})
    await ended(e, [h])
    async with serving(create_app(e.client, config(), e.registry)) as base:
        async with aiohttp.ClientSession(headers=bearer()) as http:
            for path in ("/v1/runs", "/v1/events", "/v1/queues", f"/v1/runs/{h.run_id}/children", "/v1/stream"):
                status, body = await get(http, base + path)
                assert status == 503 and "query projection" in body["error"], path
            status, body = await get(http, base + f"/v1/runs/{h.run_id}/history")
            assert status == 200 and body["events"][-1]["type"] == "RunCompleted"
            status, body = await get(http, base + "/v1/schedules")
            assert status == 200 and body == {"schedules": []}


async def test_a_projection_of_another_log_starts_over(tmp_path):
    # One database file pointed at another log (a fresh memory://, a deleted
    # and recreated sqlite file, a different URL): shorter, or longer.
    reg = shop_app()
    db = tmp_path / "q.db"
    topics = Topics(partitions=2)
    for name, files in (("first", ["a.png", "b.png", "c.png"]), ("shorter", ["z.png"]),
                        ("longer", [f"{i}.png" for i in range(6)])):
        async with sl.Client(f"memory://query-{name}-{uuid.uuid4().hex}", registry=reg, topics=topics) as client:
            handles = [await client.trigger("resize", {"file": f}) for f in files]
            async with QueryStore(db) as store, QueryProjector(client.log, store, topics=topics) as projector:
                await projector.wait_caught_up(TIMEOUT)
                assert sorted(r[0] for r in await store.table("runs")) == sorted(h.run_id for h in handles), name
