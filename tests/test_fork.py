"""Forking a run: a new run whose journal starts as a copy of another's
prefix (with edits), then continues live, on every backend.

The app (tests/apps/history_app.py) notes every step body that runs, so
the tests see that copied steps answer from the journal without running
and that the steps from the fork point on run again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

import stepline as sl
from stepline.core.events import RunTriggered
from stepline.errors import InvalidFork
from stepline.server import ServeConfig, create_app
from tests.apps import history_app as app
from tests.apps.history_app import executed

from .conftest import eventually

REPO = Path(__file__).resolve().parent.parent


async def test_a_fork_copies_the_steps_before_the_fork_point_and_runs_the_rest_live(engine_factory):
    eng = await engine_factory(app.registry)
    original = await app.quote.trigger({"sku": "pear", "qty": 4}, client=eng.client)
    assert await original.result(timeout=30) == {"sku": "pear", "total": 22}  # 5*4 = 20, +10%
    assert executed(original.run_id) == ["fetch_price", "subtotal", "add_tax"]

    fork = await eng.client.fork(original.run_id, 2)
    assert fork.run_id != original.run_id
    assert await fork.result(timeout=30) == {"sku": "pear", "total": 22}
    # Positions 0 and 1 came from the copy; only add_tax ran in the fork.
    assert executed(fork.run_id) == ["add_tax"]

    state = await eng.client.get_run(fork.run_id)
    assert (state.forked_from, state.forked_at_step) == (original.run_id, 2)
    assert [(s.step, s.name, s.attempt) for s in sorted(state.steps.values(), key=lambda s: s.step)] == [
        (0, "fetch_price", 0), (1, "subtotal", 0), (2, "add_tax", 1)]  # attempt 0: copied, not executed
    assert state.steps[1].input == (await eng.client.get_run(original.run_id)).steps[1].input
    # The original is untouched.
    assert (await eng.client.get_run(original.run_id)).forked_from is None


async def test_an_edited_step_output_flows_into_the_live_steps_after_it(engine_factory):
    eng = await engine_factory(app.registry)
    original = await app.quote.trigger({"sku": "apple", "qty": 10}, client=eng.client)
    assert await original.result(timeout=30) == {"sku": "apple", "total": 33}

    # Pretend the price had been 7: keep step 0 with that output, run from step 1.
    fork = await eng.client.fork(original.run_id, 1, step_outputs={0: 7})
    assert await fork.result(timeout=30) == {"sku": "apple", "total": 77}
    assert executed(fork.run_id) == ["subtotal", "add_tax"]
    state = await eng.client.get_run(fork.run_id)
    assert json.loads(state.steps[0].output.data) == 7  # type: ignore[union-attr]


async def test_a_fork_with_a_new_payload_replays_the_copied_steps_with_it(engine_factory):
    eng = await engine_factory(app.registry)
    original = await app.quote.trigger({"sku": "pear", "qty": 1}, client=eng.client)
    await original.result(timeout=30)
    # A fork at 0 copies nothing: the whole run again, with the new payload.
    fork = await eng.client.fork(original.run_id, 0, payload={"sku": "apple", "qty": 2}, new_payload=True)
    assert await fork.result(timeout=30) == {"sku": "apple", "total": 6}
    assert executed(fork.run_id) == ["fetch_price", "subtotal", "add_tax"]
    with pytest.raises(sl.PayloadValidationError):
        await eng.client.fork(original.run_id, 0, payload={"sku": "apple"}, new_payload=True)


async def test_a_failed_run_forked_before_its_failure_with_an_edit_completes(engine_factory):
    eng = await engine_factory(app.registry)
    failed = await app.strict.trigger({"sku": "pear", "qty": 3}, client=eng.client)  # 15 is refused
    with pytest.raises(sl.RunFailedError, match="refusing 15"):
        await failed.result(timeout=30)
    # Step 1 failed: it has no result to copy, so a fork cannot start after it.
    with pytest.raises(InvalidFork, match=r"step 1 \(fail_on\) .* is failed"):
        await eng.client.fork(failed.run_id, 2)
    fork = await eng.client.fork(failed.run_id, 1, step_outputs={0: 4})
    assert await fork.result(timeout=30) == 12
    assert executed(fork.run_id) == ["fail_on"]


async def test_a_fork_of_a_run_in_flight_copies_its_completed_prefix_and_waits_on_its_own(engine_factory):
    eng = await engine_factory(app.registry)
    original = await app.approve.trigger({"sku": "pear", "qty": 2}, client=eng.client)
    await eventually(lambda: eng.client.get_run(original.run_id), what="the run")

    async def waiting(run_id: str) -> bool:
        return (await eng.client.get_run(run_id)).status == "suspended"

    await eventually(lambda: waiting(original.run_id), timeout=30, what="the original to wait for its token")
    fork = await eng.client.fork(original.run_id, 1)
    await eventually(lambda: waiting(fork.run_id), timeout=30, what="the fork to wait for a token of its own")
    assert executed(fork.run_id) == []  # the price came from the copy
    await eng.client.complete_token(f"tok_{fork.run_id}_1", {"by": "ops"})
    assert await fork.result(timeout=30) == {"sku": "pear", "total": 10, "approved_by": "ops"}
    assert (await eng.client.get_run(original.run_id)).status == "suspended"  # still waiting on its own token


async def test_forks_the_history_cannot_give_are_refused_and_append_nothing(engine_factory):
    eng = await engine_factory(app.registry)
    original = await app.quote.trigger({"sku": "pear", "qty": 1}, client=eng.client)
    await original.result(timeout=30)
    before = len(await eng.client.list_runs())
    with pytest.raises(InvalidFork, match="has positions 0 to 2: fork at a step from 0 to 3"):
        await eng.client.fork(original.run_id, 4)
    with pytest.raises(InvalidFork, match="at_step must be a journal position"):
        await eng.client.fork(original.run_id, -1)
    with pytest.raises(InvalidFork, match=r"cannot edit the output of step 2: a fork at step 1 copies only"):
        await eng.client.fork(original.run_id, 1, step_outputs={2: 5})
    with pytest.raises(sl.UnknownRun):
        await eng.client.fork("run_nope", 0)
    assert len(await eng.client.list_runs()) == before


async def test_an_idempotency_key_makes_a_repeated_fork_the_same_run(engine_factory):
    eng = await engine_factory(app.registry)
    original = await app.greet.trigger({"name": "Ada"}, client=eng.client)
    await original.result(timeout=30)
    key = f"replay-ada-{uuid.uuid4().hex}"  # run ids from keys repeat across backends in this process
    first = await eng.client.fork(original.run_id, 0, idempotency_key=key)
    again = await eng.client.fork(original.run_id, 0, idempotency_key=key)
    assert first.run_id == again.run_id
    assert await first.result(timeout=30) == {"message": "Hello, Ada"}
    assert executed(first.run_id) == ["compose"]


async def test_the_fork_survives_a_worker_restart_mid_run(engine_factory):
    """The copy lives in the fork's own RunTriggered: a new owner rebuilds it
    from the fork's partition alone."""
    eng = await engine_factory(app.registry)
    original = await app.approve.trigger({"sku": "apple", "qty": 5}, client=eng.client)

    async def waiting(run_id: str) -> bool:
        try:
            return (await eng.client.get_run(run_id)).status == "suspended"
        except sl.UnknownRun:
            return False

    await eventually(lambda: waiting(original.run_id), timeout=30, what="the original to wait")
    fork = await eng.client.fork(original.run_id, 1)
    await eventually(lambda: waiting(fork.run_id), timeout=30, what="the fork to wait")
    await eng.restart_worker()
    await eng.client.complete_token(f"tok_{fork.run_id}_1", {"by": "night shift"})
    assert await fork.result(timeout=30) == {"sku": "apple", "total": 15, "approved_by": "night shift"}
    assert executed(fork.run_id) == ["subtotal"]


# --- the HTTP API and the CLI ---------------------------------------------------


async def test_the_http_api_forks_a_run_and_refuses_a_bad_fork_point(engine_factory):
    eng = await engine_factory(app.registry)
    original = await app.quote.trigger({"sku": "pear", "qty": 2}, client=eng.client)
    await original.result(timeout=30)
    config = ServeConfig("t0ken", {})
    auth = {"Authorization": "Bearer t0ken"}
    async with TestClient(TestServer(create_app(eng.client, config, app.registry))) as http:
        url = f"/v1/runs/{original.run_id}/fork"
        assert (await http.post(url, json={"at_step": 1})).status == 401
        resp = await http.post(url, json={"at_step": 1, "step_outputs": {"0": 1}}, headers=auth)
        assert resp.status == 202, await resp.text()
        body = await resp.json()
        assert body["forked_from"] == original.run_id and body["at_step"] == 1
        assert await eng.client.wait(body["run_id"], timeout=30)
        assert (await eng.client.get_run(body["run_id"])).output is not None
        state = await (await http.get(f"/v1/runs/{body['run_id']}", headers=auth)).json()
        assert state["output"] == {"sku": "pear", "total": 2}
        assert state["forked_from"] == original.run_id and state["forked_at_step"] == 1
        bad = await http.post(url, json={"at_step": 9}, headers=auth)
        assert bad.status == 400 and "fork at a step from 0 to 3" in (await bad.json())["error"]
        typo = await http.post(url, json={"at_stp": 1}, headers=auth)
        assert typo.status == 400 and "unknown field" in (await typo.json())["error"]
        wrong = await http.post(url, json={"at_step": 1, "step_outputs": {"zero": 1}}, headers=auth)
        assert wrong.status == 400 and "step_outputs" in (await wrong.json())["error"]
        invalid = await http.post(url, json={"at_step": 0, "payload": {"sku": 1}}, headers=auth)
        assert invalid.status == 422


def _cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STEPLINE_LOG=url, COLUMNS="200")
    env.pop("STEPLINE_APP", None)
    return subprocess.run([sys.executable, "-m", "stepline.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


# The CLI runs in another process, and memory:// is per process.
@pytest.mark.parametrize("backend_url", ["sqlite", "kafka"], indirect=True)
async def test_stepline_fork_on_the_command_line(engine_factory, backend_url):
    eng = await engine_factory(app.registry)
    original = await app.quote.trigger({"sku": "pear", "qty": 10}, client=eng.client)
    await original.result(timeout=30)
    proc = _cli("fork", original.run_id, "--at-step", "2", "--step-output", "1=40", "--json", url=backend_url)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["forked_from"] == original.run_id and res["at_step"] == 2
    state = await eng.client.wait(res["run_id"], timeout=30)
    assert state.status == "completed"
    assert executed(res["run_id"]) == ["add_tax"]
    assert json.loads((await eng.client.get_run(res["run_id"])).output.data) == {"sku": "pear", "total": 44}  # type: ignore[union-attr]

    bad = _cli("fork", original.run_id, "--at-step", "1", "--step-output", "x=1", url=backend_url)
    assert bad.returncode == 1 and "--step-output must be N=JSON" in bad.stderr
    past = _cli("fork", original.run_id, "--at-step", "7", url=backend_url)
    assert past.returncode == 1 and "fork at a step from 0 to 3" in past.stderr


def test_a_fork_trigger_is_one_event_carrying_the_copy() -> None:
    """The copy is in the RunTriggered itself: no read of the original later."""
    from stepline.client.fork import fork_trigger
    from stepline.core.events import JSON, Payload
    from stepline.projections.runs import RunState, StepState

    def p(v: object) -> Payload:
        return Payload(JSON, json.dumps(v).encode())

    steps = {0: StepState(0, "a", "completed", 1, 1, 2, p([1]), p(10)),
             1: StepState(1, "sleep", "completed", 1, 3, 4),
             2: StepState(2, "b", "running", 2, 5)}
    state = RunState("run_o", "t", "running", p({"x": 1}), 0, 5, tags=("vip",), steps=steps,
                     parent_run_id="run_parent", parent_step=3)
    body = fork_trigger(state, 2, step_outputs={0: p(11)})
    assert isinstance(body, RunTriggered)
    assert body.forked_from == "run_o" and body.forked_at_step == 2 and body.tags == ("vip",)
    assert [(c.step, c.name, c.output) for c in body.journal] == [(0, "a", p(11)), (1, "sleep", None)]
    # A fork is nobody's child: the parent waits for the original only.
    assert body.parent_run_id is None and body.parent_step is None
    with pytest.raises(InvalidFork, match="step 2 .* is running"):
        fork_trigger(state, 3)
