"""Shadow runs: recorded runs re-executed against new code, every step
answered from the journal, and the diff of names, inputs and outputs.

Runs are recorded by a real worker on each backend with v1 of
tests/apps/history_app.py; the shadows load v2 (a safe, patched change)
and v3 (unsafe changes) beside it. Nothing a shadow does may reach the log
or run a step body.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import BaseModel

import stepline as sl
from stepline.history.shadow import (
    BEYOND,
    INPUT_CHANGED,
    MISSING_STEP,
    NAME_CHANGED,
    NEW_STEP,
    OPEN,
    OUTPUT_CHANGED,
    SAME,
    TASK_MISSING,
    shadow_run,
    shadow_runs,
    shadow_task,
)
from stepline.history.shadow_code import load_code, load_code_under
from stepline.security.sensitive import REDACTED
from stepline.server import ServeConfig, create_app
from tests.apps import history_app as v1
from tests.apps.history_app import EXECUTED

from .conftest import eventually

REPO = Path(__file__).resolve().parent.parent
APPS = REPO / "tests" / "apps"
V2 = str(APPS / "history_app_v2.py")
V3 = str(APPS / "history_app_v3.py")


async def _log_size(client: sl.Client) -> int:
    topics = client.topics
    total = 0
    for topic in (topics.runs, topics.events):
        for p in range(await client.log.partitions(topic)):
            total += await client.log.end_offset(topic, p)
    return total


async def _waiting(client: sl.Client, run_id: str) -> bool:
    try:
        return (await client.get_run(run_id)).status == "suspended"
    except sl.UnknownRun:
        return False


async def test_a_run_shadowed_against_unchanged_code_is_the_same_at_every_step(engine_factory):
    eng = await engine_factory(v1.registry)
    run = await v1.quote.trigger({"sku": "pear", "qty": 3}, client=eng.client)
    await run.result(timeout=30)
    [result] = await shadow_runs(eng.client, v1.registry, [run.run_id])
    assert not result.diverged and result.first_divergence() is None
    assert [(s.step, s.verdict, s.recorded_name, s.shadow_name) for s in result.steps] == [
        (0, SAME, "fetch_price", "fetch_price"), (1, SAME, "subtotal", "subtotal"), (2, SAME, "add_tax", "add_tax")]
    assert result.steps[1].recorded_input == result.steps[1].shadow_input == [5, 3]
    assert result.recorded_output == result.shadow_output == {"sku": "pear", "total": 16}
    assert (result.recorded_version, result.shadow_version, result.version_changed) == ("1", "1", False)



@pytest.mark.parametrize("edit", [{"payload": {"sku": "pear", "qty": 4}, "new_payload": True},
                                  {"step_outputs": {0: 7}}], ids=["new-payload", "edited-output"])
async def test_a_fork_shadowed_against_unchanged_code_is_the_same_at_every_step(engine_factory, edit):
    # A fork's copied positions keep the inputs of the run they were copied
    # from: with another payload or an edited output the code now calls them
    # with other arguments, which is the fork, not a change of code.
    eng = await engine_factory(v1.registry)
    run = await v1.quote.trigger({"sku": "pear", "qty": 3}, client=eng.client)
    await run.result(timeout=30)
    fork = await eng.client.fork(run.run_id, 2, **edit)
    await fork.result(timeout=30)
    [result] = await shadow_runs(eng.client, v1.registry, [fork.run_id])
    assert result.first_divergence() is None and not result.diverged
    assert [(s.step, s.verdict) for s in result.steps] == [(0, SAME), (1, SAME), (2, SAME)]
    # The step that ran live in the fork is still compared: its input is the fork's.
    assert result.steps[2].recorded_input == result.steps[2].shadow_input

async def test_a_shadow_runs_no_step_body_and_appends_nothing(engine_factory):
    eng = await engine_factory(v1.registry)
    done = await v1.quote.trigger({"sku": "apple", "qty": 12}, client=eng.client)
    await done.result(timeout=30)
    executed_before, size_before = list(EXECUTED), await _log_size(eng.client)
    for module in (V2, V3):
        await shadow_runs(eng.client, load_code(module), [done.run_id])
    assert EXECUTED == executed_before  # bulk_discount, reached by v3, did not run either
    assert await _log_size(eng.client) == size_before


async def test_a_patched_change_replays_old_runs_unchanged_and_reports_the_new_version(engine_factory):
    eng = await engine_factory(v1.registry)
    run = await v1.quote.trigger({"sku": "apple", "qty": 12}, client=eng.client)
    await run.result(timeout=30)
    result = await shadow_run(load_code(V2).find("quote"), await eng.client.get_run(run.run_id))
    # The run's history went past the patch point on code without it: the old path.
    assert not result.diverged
    assert [s.recorded_name for s in result.steps] == ["fetch_price", "subtotal", "add_tax"]
    assert (result.recorded_version, result.shadow_version, result.version_changed) == ("1", "2", True)


async def test_a_step_inserted_without_a_patch_is_a_divergence_and_is_not_executed(engine_factory):
    eng = await engine_factory(v1.registry)
    run = await v1.quote.trigger({"sku": "apple", "qty": 12}, client=eng.client)
    await run.result(timeout=30)
    result = await shadow_run(load_code(V3).find("quote"), await eng.client.get_run(run.run_id))
    assert result.diverged
    assert [(s.step, s.verdict) for s in result.steps] == [(0, SAME), (1, NAME_CHANGED)]
    changed = result.steps[1]
    assert (changed.recorded_name, changed.shadow_name, changed.shadow_input) == ("subtotal", "bulk_discount", [3, 12])
    assert result.first_divergence() == {
        "step": 1, "kind": NAME_CHANGED,
        "message": "step 1 is 'bulk_discount' in the new code but 'subtotal' in the history"}


async def test_changed_step_arguments_and_a_changed_result_are_reported(engine_factory):
    eng = await engine_factory(v1.registry)
    run = await v1.greet.trigger({"name": "Ada"}, client=eng.client)
    await run.result(timeout=30)
    result = await shadow_run(load_code(V3).find("greet"), await eng.client.get_run(run.run_id))
    assert [(s.step, s.verdict, s.recorded_input, s.shadow_input) for s in result.steps] == [
        (0, INPUT_CHANGED, ["Ada"], ["ADA"])]
    # The recorded output of compose was served; only the body's own change shows.
    assert result.steps[0].output == "Hello, Ada"
    assert (result.problem, result.recorded_output, result.shadow_output) == (
        OUTPUT_CHANGED, {"message": "Hello, Ada"}, {"message": "Hello, Ada!"})
    assert result.first_divergence()["kind"] == INPUT_CHANGED  # type: ignore[index]
    # The function's source is the same text in v2: so is its version.
    same = await shadow_run(load_code(V2).find("greet"), await eng.client.get_run(run.run_id))
    assert not same.diverged and not same.version_changed


async def test_new_and_missing_steps_against_a_completed_history(engine_factory, tmp_path):
    eng = await engine_factory(v1.registry)
    run = await v1.greet.trigger({"name": "Lin"}, client=eng.client)
    await run.result(timeout=30)
    state = await eng.client.get_run(run.run_id)
    more = tmp_path / "greet_more.py"
    more.write_text(
        "import stepline as sl\n"
        "from tests.apps.history_app import Greeting, add_tax, compose\n"
        "@sl.task(id='greet')\n"
        "async def greet(g: Greeting) -> dict:\n"
        "    message = await compose(g.name)\n"
        "    await add_tax(len(message))\n"
        "    return {'message': message}\n")
    less = tmp_path / "greet_less.py"
    less.write_text(
        "import stepline as sl\n"
        "from tests.apps.history_app import Greeting\n"
        "@sl.task(id='greet')\n"
        "async def greet(g: Greeting) -> dict:\n"
        "    return {'message': 'Hello, ' + g.name}\n")
    executed_before = list(EXECUTED)
    grown = await shadow_run(load_code(str(more)).find("greet"), state)
    assert [(s.step, s.verdict, s.shadow_name) for s in grown.steps] == [(0, SAME, "compose"), (1, NEW_STEP, "add_tax")]
    assert grown.first_divergence()["message"] == (  # type: ignore[index]
        "the new code reaches step 1 (add_tax), which the history never ran")
    shrunk = await shadow_run(load_code(str(less)).find("greet"), state)
    assert [(s.step, s.verdict) for s in shrunk.steps] == [(0, MISSING_STEP)]
    assert shrunk.shadow_output == shrunk.recorded_output  # same result, other path: still a divergence
    assert shrunk.diverged
    assert EXECUTED == executed_before
    # Both modules declare `greet` in the default registry, side by side with nothing clashing.
    assert load_code(str(less)).find("greet") is not load_code(str(less)).find("greet")


async def test_runs_in_flight_and_failed_runs_are_judged_as_far_as_their_history_goes(engine_factory):
    eng = await engine_factory(v1.registry)
    waiting = await v1.approve.trigger({"sku": "pear", "qty": 2}, client=eng.client)
    failed = await v1.strict.trigger({"sku": "pear", "qty": 3}, client=eng.client)
    await eventually(lambda: _waiting(eng.client, waiting.run_id), timeout=30, what="the run to wait")
    with pytest.raises(sl.RunFailedError):
        await failed.result(timeout=30)
    v2, v3 = load_code(V2), load_code(V3)

    in_flight = await eng.client.get_run(waiting.run_id)
    safe = await shadow_run(v2.find("approve"), in_flight)
    # patched() answers False (the history is past that point); the token wait is open: no verdict after it.
    assert not safe.diverged
    assert [(s.step, s.verdict) for s in safe.steps] == [(0, SAME), (1, OPEN)]
    unsafe = await shadow_run(v3.find("approve"), in_flight)
    assert unsafe.first_divergence()["kind"] == NAME_CHANGED  # type: ignore[index]

    dead = await shadow_run(v1.registry.find("strict"), await eng.client.get_run(failed.run_id))
    assert not dead.diverged and [(s.step, s.verdict) for s in dead.steps] == [(0, SAME), (1, OPEN)]

    # A live run whose code goes on past its history is unfinished, not different.
    cancelled_early = await v1.greet.trigger({"name": "Bo"}, delay=3600, client=eng.client)
    await eng.client.cancel(cancelled_early.run_id)
    early = await shadow_run(v1.registry.find("greet"), await eng.client.get_run(cancelled_early.run_id))
    assert [(s.step, s.verdict) for s in early.steps] == [(0, BEYOND)] and not early.diverged


async def test_a_task_the_new_code_lacks_is_a_divergence(engine_factory, tmp_path):
    eng = await engine_factory(v1.registry)
    run = await v1.greet.trigger({"name": "Al"}, client=eng.client)
    await run.result(timeout=30)
    empty = tmp_path / "nothing.py"
    empty.write_text("import stepline as sl\n")
    [result] = await shadow_runs(eng.client, load_code(str(empty)), [run.run_id])
    assert result.problem == TASK_MISSING and result.diverged
    assert [s.recorded_name for s in result.steps] == ["compose"]


async def test_every_recent_run_of_a_task_is_summarised(engine_factory):
    eng = await engine_factory(v1.registry)
    old = await v1.quote.trigger({"sku": "pear", "qty": 1}, client=eng.client)
    await old.result(timeout=30)
    recent = [await v1.quote.trigger({"sku": sku, "qty": 2}, client=eng.client) for sku in ("apple", "pear", "fig")]
    for h in recent:
        await h.result(timeout=30)
    await (await v1.greet.trigger({"name": "Ed"}, client=eng.client)).result(timeout=30)
    since = (await eng.client.get_run(recent[0].run_id)).created_at
    summary = await shadow_task(eng.client, load_code(V3), "quote", since)
    assert [r.run_id for r in summary.results] == [h.run_id for h in recent]  # oldest first, none older
    counts = summary.counts()
    assert counts == {"checked": 3, "same": 0, "diverged": 3, "version_changed": 3, NAME_CHANGED: 3}
    safe = await shadow_task(eng.client, load_code(V2), "quote", since)
    assert safe.counts() == {"checked": 3, "same": 3, "diverged": 0, "version_changed": 3}


# --- the CLI and the HTTP API ------------------------------------------------------


def _cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STEPLINE_LOG=url, COLUMNS="220")
    env.pop("STEPLINE_APP", None)
    return subprocess.run([sys.executable, "-m", "stepline.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


# The CLI runs in another process, and memory:// is per process.
@pytest.mark.parametrize("backend_url", ["sqlite", "kafka"], indirect=True)
async def test_stepline_shadow_prints_the_diff_and_fails_when_something_diverges(engine_factory, backend_url):
    eng = await engine_factory(v1.registry)
    run = await v1.greet.trigger({"name": "Ada"}, client=eng.client)
    await run.result(timeout=30)
    quotes = [await v1.quote.trigger({"sku": "pear", "qty": n}, client=eng.client) for n in (1, 2)]
    for h in quotes:
        await h.result(timeout=30)

    unsafe = _cli("shadow", run.run_id, "--module", V3, url=backend_url)
    assert unsafe.returncode == 1, unsafe.stderr
    assert "DIVERGES" in unsafe.stdout and "input-changed" in unsafe.stdout
    assert 'first divergence: step 0 (compose) is called with ["ADA"] where the history recorded ["Ada"]' in unsafe.stdout
    assert '"Hello, Ada"} → {"message": "Hello, Ada!"}' in unsafe.stdout

    safe = _cli("shadow", quotes[0].run_id, "--module", "tests.apps.history_app_v2", "--json", url=backend_url)
    assert safe.returncode == 0, safe.stderr + safe.stdout
    body = json.loads(safe.stdout)
    assert body["diverged"] is False and body["versions"] == {"recorded": "1", "shadow": "2", "changed": True}

    summary = _cli("shadow", "--task", "quote", "--since", "1h", "--module", V3, "--json", url=backend_url)
    assert summary.returncode == 1
    report = json.loads(summary.stdout)
    assert report["counts"] == {"checked": 2, "same": 0, "diverged": 2, "version_changed": 2, "name-changed": 2}
    assert {r["run_id"] for r in report["runs"]} == {h.run_id for h in quotes}
    assert all(r["first_divergence"]["step"] == 1 for r in report["runs"])
    plain = _cli("shadow", "--task", "quote", "--since", "1h", "--module", V2, url=backend_url)
    assert plain.returncode == 0 and "shadowed 2 run(s) of quote" in plain.stdout and "0 would diverge" in plain.stdout

    assert "pass run ids, or --task" in _cli("shadow", "--module", V2, url=backend_url).stderr
    assert "declares no task 'nope'" in _cli("shadow", "--task", "nope", "--module", V2, url=backend_url).stderr
    assert "--since 'soon'" in _cli("shadow", "--task", "quote", "--since", "soon", "--module", V2,
                                    url=backend_url).stderr


async def test_the_http_api_shadows_with_the_servers_code_or_an_allowed_module(engine_factory, tmp_path):
    eng = await engine_factory(v1.registry)
    run = await v1.quote.trigger({"sku": "pear", "qty": 2}, client=eng.client)
    await run.result(timeout=30)
    auth = {"Authorization": "Bearer t0ken"}
    url = f"/v1/runs/{run.run_id}/shadow"

    async def call(config: ServeConfig, registry: Any, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with TestClient(TestServer(create_app(eng.client, config, registry))) as http:
            resp = await http.request(method, path, **kw)
            return resp.status, await resp.json()

    locked = ServeConfig("t0ken", {}, shadow_path=str(APPS))
    status, body = await call(locked, v1.registry, "GET", url, headers=auth)
    assert status == 200 and body["diverged"] is False and body["code"] == "the server's app"
    status, body = await call(locked, v1.registry, "GET", url + "?module=history_app_v3", headers=auth)
    assert status == 200 and body["diverged"] is True and body["first_divergence"]["kind"] == NAME_CHANGED
    status, body = await call(locked, None, "POST", url, json={"module": "history_app_v2"}, headers=auth)
    assert status == 200 and body["versions"]["changed"] is True and body["code"] == "history_app_v2"
    assert (await call(locked, v1.registry, "GET", url))[0] == 401
    # Nothing outside the shadow path, and nothing but module names.
    for bad in ("os", "..history_app", "history_app_v2.py", "/etc/passwd"):
        status, body = await call(locked, v1.registry, "GET", url, params={"module": bad}, headers=auth)
        assert status == 400, (bad, body)
    (tmp_path / "outside.py").write_text("raise SystemExit('must never be imported')\n")
    status, _ = await call(ServeConfig("t0ken", {}, shadow_path=str(APPS)), None, "GET",
                           url, params={"module": "outside"}, headers=auth)
    assert status == 400
    # Modules need a token and a shadow path; the server's code needs an app.
    status, body = await call(ServeConfig("t0ken", {}), v1.registry, "GET", url + "?module=history_app_v3",
                              headers=auth)
    assert status == 403 and "--shadow-path" in body["error"]
    status, body = await call(ServeConfig(None, {}, auth_required=False, shadow_path=str(APPS)), v1.registry,
                              "GET", url + "?module=history_app_v3")
    assert status == 403 and "token" in body["error"]
    status, body = await call(locked, None, "GET", url, headers=auth)
    assert status == 409 and "--app" in body["error"]
    assert (await call(locked, v1.registry, "GET", "/v1/runs/run_nope/shadow", headers=auth))[0] == 404


def test_load_code_under_resolves_only_files_inside_the_root(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "tasks.py").write_text(
        "import stepline as sl\n@sl.task(id='t')\nasync def t(x: int) -> int:\n    return x\n")
    (tmp_path / "link.py").symlink_to(APPS / "history_app_v2.py")
    assert load_code_under(tmp_path, "pkg.tasks").ids() == ["t"]
    with pytest.raises(sl.TaskDefinitionError, match="no module 'link'"):
        load_code_under(tmp_path, "link")  # a symlink out of the root does not count
    with pytest.raises(sl.TaskDefinitionError, match="dotted module name"):
        load_code_under(tmp_path, "pkg/tasks")


class _SignUp(BaseModel):
    user_id: str
    email: Annotated[str, sl.Sensitive]


def _signup_app() -> sl.Registry:
    reg = sl.Registry()

    @sl.step
    async def send(address: str) -> str:
        return "sent"

    @sl.task(id="signup", subject="user_id", registry=reg)
    async def signup(p: _SignUp) -> dict[str, str]:
        return {"status": await send(p.email), "domain": p.email.rsplit("@", 1)[1]}

    return reg


@pytest.mark.parametrize("backend_url", ["memory", "sqlite"], indirect=True)
async def test_sensitive_fields_are_opened_for_the_shadow_and_an_erased_subject_leaves_the_journal(
        engine_factory, monkeypatch):
    monkeypatch.delenv("STEPLINE_KEYS", raising=False)
    reg = _signup_app()
    eng = await engine_factory(reg)
    run = await reg.get("signup").trigger({"user_id": "u-1", "email": "ada@example.com"}, client=eng.client)
    assert await run.result(timeout=30) == {"status": "sent", "domain": "example.com"}
    [clear] = await shadow_runs(eng.client, reg, [run.run_id])
    assert not clear.diverged and clear.shadow_output == {"status": "sent", "domain": "example.com"}
    assert await eng.client.forget("u-1")
    # "[erased]" reaches the code now: its output may differ, its steps must not.
    [erased] = await shadow_runs(eng.client, reg, [run.run_id])
    assert not erased.diverged
    assert [(s.verdict, s.recorded_input) for s in erased.steps] == [(SAME, [REDACTED])]
    assert erased.problem is None and erased.shadow_output is None  # the output is not judged
