"""Time travel over HTTP: `GET /v1/runs/{id}?as_of=POINT` is the run as it
stood at a past point of its history (the CLI's `runs show --as-of`), and
`GET /v1/runs/{id}/history?from=&to=` the events between two points, on
SQLite and on the real Kafka broker.
"""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient, TestServer

from stepline.core.events import StepCompleted
from stepline.history.replay import iso_ms, parse_point, state_at
from stepline.projections.views import state_dict
from stepline.server import ServeConfig, create_app
from tests.apps import history_app as app

TOKEN = "travel-t0ken"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize("backend_url", ["sqlite", "kafka"], indirect=True)
async def test_a_run_as_of_a_checkpoint_and_the_events_between_two_points(engine_factory, backend_url):
    eng = await engine_factory(app.registry)
    run = await app.quote.trigger({"sku": "pear", "qty": 4}, client=eng.client)
    assert await run.result(timeout=30) == {"sku": "pear", "total": 22}
    events = await eng.client.history(run.run_id)
    done = {ev.body.step: off for off, ev in events if isinstance(ev.body, StepCompleted)}
    async with TestClient(TestServer(create_app(eng.client, ServeConfig(TOKEN, {}), app.registry))) as http:
        async def get(url: str) -> tuple[int, dict]:
            resp = await http.get(url, headers=AUTH)
            return resp.status, await resp.json()

        # After step 1 (subtotal): running, two steps done, no output yet.
        status, then = await get(f"/v1/runs/{run.run_id}?as_of={done[1]}")
        assert status == 200, then
        assert then["status"] == "running" and then["output"] is None
        assert [(s["step"], s["name"], s["output"]) for s in then["steps"]] == [(0, "fetch_price", 5),
                                                                              (1, "subtotal", 20)]
        folded = sum(1 for off, _ in events if off <= done[1])
        assert then["as_of"] == {"offset": done[1], "time": events[folded - 1][1].time,
                                 "iso_time": iso_ms(events[folded - 1][1].time), "event": "StepCompleted",
                                 "events": folded, "of": len(events), "requested": str(done[1])}
        # The same state the CLI folds, and live is what it became.
        expected = state_dict(state_at(run.run_id, events, parse_point(str(done[1]), 0)).state)
        assert {k: v for k, v in then.items() if k != "as_of"} == expected
        status, live = await get(f"/v1/runs/{run.run_id}")
        assert live["status"] == "completed" and len(live["steps"]) == 3 and "as_of" not in live

        # A time reads the same as the offset of the last event at or before it.
        status, by_time = await get(f"/v1/runs/{run.run_id}?as_of={iso_ms(events[folded - 1][1].time)}")
        assert status == 200 and by_time["as_of"]["offset"] >= done[1]

        # Between the checkpoints after step 0 and after step 2: step 1 and step 2's events.
        status, between = await get(f"/v1/runs/{run.run_id}/history?from={done[0]}&to={done[2]}")
        assert status == 200
        assert [e["offset"] for e in between["events"]] == [off for off, _ in events if done[0] < off <= done[2]]
        assert [(e["type"], e["body"]["step"]) for e in between["events"]] == [
            ("StepStarted", 1), ("StepCompleted", 1), ("StepStarted", 2), ("StepCompleted", 2)]
        status, tail = await get(f"/v1/runs/{run.run_id}/history?from={done[2]}")
        assert [e["type"] for e in tail["events"]] == ["RunCompleted"]
        status, whole = await get(f"/v1/runs/{run.run_id}/history")
        assert len(whole["events"]) == len(events)

        # Before the run existed, an unknown run, a point that is none: one clear error each.
        status, before = await get(f"/v1/runs/{run.run_id}?as_of=-3650d")
        assert status == 404 and "did not exist yet" in before["error"]
        status, missing = await get("/v1/runs/run_nope?as_of=5")
        assert (status, missing) == (404, {"error": "no run with id 'run_nope' on this log"})
        status, bad = await get(f"/v1/runs/{run.run_id}?as_of=yesterday")
        assert status == 400 and bad["error"].startswith("as_of 'yesterday' is neither a log offset")
        status, bad = await get(f"/v1/runs/{run.run_id}/history?to=2025-02-30T00:00")
        assert status == 400 and bad["error"].startswith("to '2025-02-30T00:00' is neither")
