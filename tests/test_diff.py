"""`stepline diff`: two runs step by step, the first divergence marked.

A fork with one edited step output against its original (every backend,
through the projection), a run against itself, a failed run against a good
one, and the CLI and the HTTP API on sqlite and Kafka (text, `--json`, the
exit code, an unknown run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from stepline.projections.diff import diff_runs
from stepline.server import ServeConfig, create_app
from tests.apps import history_app as app

REPO = Path(__file__).resolve().parent.parent


async def test_a_fork_with_an_edited_output_diverges_at_that_step(engine_factory):
    eng = await engine_factory(app.registry)
    original = await app.quote.trigger({"sku": "pear", "qty": 4}, client=eng.client)
    assert await original.result(timeout=30) == {"sku": "pear", "total": 22}
    fork = await eng.client.fork(original.run_id, 1, step_outputs={0: 7})
    assert await fork.result(timeout=30) == {"sku": "pear", "total": 30}

    d = diff_runs(await eng.client.get_run(original.run_id), await eng.client.get_run(fork.run_id))
    assert not d.same
    assert d.first_divergence == 0
    assert [(p.step, p.differs) for p in d.steps] == [(0, ("output",)), (1, ("input", "output")),
                                                      (2, ("input", "output"))]
    assert (d.steps[0].a["output"], d.steps[0].b["output"]) == (5, 7)
    assert d.run_differs == ("output",)
    assert d.b["forked_from"] == original.run_id and d.b["forked_at_step"] == 1
    body = json.loads(json.dumps(d.to_dict()))  # the JSON the CLI and API give
    assert body["first_divergence"] == 0 and body["steps"][1]["differs"] == ["input", "output"]

    itself = diff_runs(*[await eng.client.get_run(original.run_id)] * 2)
    assert itself.same and itself.first_divergence is None
    assert all(p.a is not None and p.a["duration_ms"] is not None for p in itself.steps)


async def test_a_different_payload_is_the_first_divergence_and_a_failed_step_shows_its_error(engine_factory):
    eng = await engine_factory(app.registry)
    good = await app.quote.trigger({"sku": "pear", "qty": 1}, client=eng.client)
    other = await app.quote.trigger({"sku": "apple", "qty": 1}, client=eng.client)
    await good.result(timeout=30)
    await other.result(timeout=30)
    d = diff_runs(await eng.client.get_run(good.run_id), await eng.client.get_run(other.run_id))
    assert d.first_divergence == "payload" and "payload" in d.run_differs

    failed = await app.strict.trigger({"sku": "pear", "qty": 3}, client=eng.client)  # 15 is refused
    await eng.client.wait(failed.run_id, timeout=30)
    fixed = await eng.client.fork(failed.run_id, 1, step_outputs={0: 4})
    assert await fixed.result(timeout=30) == 12
    d = diff_runs(await eng.client.get_run(failed.run_id), await eng.client.get_run(fixed.run_id))
    assert d.first_divergence == 0
    assert set(d.run_differs) == {"status", "output", "error"}
    refused = d.steps[1]
    assert refused.a is not None and refused.b is not None
    assert refused.a["status"] == "failed" and refused.a["error"] == "ValueError: refusing 15"
    assert refused.b["status"] == "completed" and refused.b["error"] is None
    assert {"input", "output", "error", "status"} <= set(refused.differs)


def _cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STEPLINE_LOG=url, COLUMNS="220")
    env.pop("STEPLINE_APP", None)
    return subprocess.run([sys.executable, "-m", "stepline.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("backend_url", ["sqlite", "kafka"], indirect=True)
async def test_stepline_diff_marks_the_first_divergence_and_exits_1_when_runs_differ(engine_factory, backend_url):
    eng = await engine_factory(app.registry)
    original = await app.quote.trigger({"sku": "pear", "qty": 4}, client=eng.client)
    await original.result(timeout=30)
    fork = await eng.client.fork(original.run_id, 2)
    await fork.result(timeout=30)

    text = _cli("diff", original.run_id, fork.run_id, url=backend_url)
    assert text.returncode == 0, text.stdout + text.stderr  # a fork at 2 with no edit does the same
    assert "no divergence" in text.stdout

    edited = await eng.client.fork(original.run_id, 2, step_outputs={1: 100})
    await edited.result(timeout=30)
    differ = _cli("diff", original.run_id, edited.run_id, url=backend_url)
    assert differ.returncode == 1, differ.stderr
    assert "first divergence: step 1 (output)" in differ.stdout
    marked = [line for line in differ.stdout.splitlines() if line.lstrip().startswith("▶")]
    assert len(marked) == 1 and "subtotal" in marked[0]

    as_json = _cli("diff", original.run_id, edited.run_id, "--json", url=backend_url)
    body = json.loads(as_json.stdout)
    assert body["first_divergence"] == 1 and body["a"]["run_id"] == original.run_id
    assert body["steps"][1]["a"]["output"] == 20 and body["steps"][1]["b"]["output"] == 100

    missing = _cli("diff", original.run_id, "run_nope", url=backend_url)
    assert missing.returncode != 0 and "run_nope" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.parametrize("backend_url", ["sqlite", "kafka"], indirect=True)
async def test_the_http_api_answers_the_diff_the_cli_prints(engine_factory, backend_url):
    eng = await engine_factory(app.registry)
    original = await app.quote.trigger({"sku": "pear", "qty": 4}, client=eng.client)
    await original.result(timeout=30)
    edited = await eng.client.fork(original.run_id, 2, step_outputs={1: 100})
    await edited.result(timeout=30)
    auth = {"Authorization": "Bearer t0ken"}
    async with TestClient(TestServer(create_app(eng.client, ServeConfig("t0ken", {}), app.registry))) as http:
        url = f"/v1/runs/{original.run_id}/diff/{edited.run_id}"
        assert (await http.get(url)).status == 401
        resp = await http.get(url, headers=auth)
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        expected = diff_runs(await eng.client.get_run(original.run_id), await eng.client.get_run(edited.run_id))
        assert body == json.loads(json.dumps(expected.to_dict()))
        assert body["first_divergence"] == 1 and body["same"] is False
        assert [p["differs"] for p in body["steps"]] == [[], ["output"], ["input", "output"]]
        same = await (await http.get(f"/v1/runs/{original.run_id}/diff/{original.run_id}", headers=auth)).json()
        assert same["same"] is True and same["first_divergence"] is None
        for a, b in ((original.run_id, "run_nope"), ("run_nope", edited.run_id)):
            missing = await http.get(f"/v1/runs/{a}/diff/{b}", headers=auth)
            assert (missing.status, await missing.json()) == (404, {"error": "no run with id 'run_nope' on this log"})
