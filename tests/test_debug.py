"""`stepline debug`: a recorded run's body re-executed locally, under a debugger.

A real pdb session driven with pexpect (sqlite): it stops at the failed step
with the recorded inputs, steps into the body, and the failure happens again;
only that step's body ran and nothing was appended to the log. A scripted
debugger (`PYTHONBREAKPOINT` naming a hook that records the locals it is
shown) on sqlite and Kafka: `--break-at` by name at a completed step, a
post-mortem for a failure outside steps, `--live-from` refused without
`--yes` and running the steps for real with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

from tests.apps import debug_app as app

REPO = Path(__file__).resolve().parent.parent
APP = "tests/apps/debug_app.py"


def _env(url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, STEPLINE_LOG=url, COLUMNS="200", DEBUG_CALLS=str(tmp_path / "calls"),
               DEBUG_BREAKS=str(tmp_path / "breaks"), **extra)
    env.pop("STEPLINE_APP", None)
    env.pop("PYTHONBREAKPOINT", None)
    env.update(extra)
    return env


def _calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().split() if path.exists() else []


def _breaks(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "breaks"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _debug(url: str, tmp_path: Path, *args: str, hook: str = "tests.apps.debug_app.record_break"
           ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stepline.cli", "debug", *args, "--module", APP], cwd=REPO,
                          env=_env(url, tmp_path, PYTHONBREAKPOINT=hook), capture_output=True, text=True,
                          timeout=120)


async def _failed_run(eng, task, payload):
    handle = await task.trigger(payload, client=eng.client)
    assert (await eng.client.wait(handle.run_id, timeout=30)).status == "failed"
    return handle.run_id, len(await eng.client.history(handle.run_id))


@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
async def test_pdb_stops_at_the_failed_step_with_its_inputs_and_steps_into_it(engine_factory, backend_url, tmp_path):
    eng = await engine_factory(app.registry)
    run_id, events = await _failed_run(eng, app.divide_task, {"n": 5, "by": 0})
    (tmp_path / "calls").unlink(missing_ok=True)  # the worker's own calls are not the session's

    child = pexpect.spawn(sys.executable, ["-m", "stepline.cli", "debug", run_id, "--module", APP], cwd=str(REPO),
                          env=_env(backend_url, tmp_path), encoding="utf-8", timeout=60)
    try:
        child.expect_exact("stopped before step 1 (divide)")
        child.expect_exact("it failed in the run with ZeroDivisionError: division by zero")
        child.expect_exact("(Pdb) ")
        child.sendline("p args")
        child.expect_exact("(10, 0)")  # load's recorded output, 10, and the payload's 0
        child.expect_exact("(Pdb) ")
        child.sendline("s")
        child.expect_exact("(Pdb) ")
        child.sendline("s")  # into the step's body
        child.expect_exact('-> _note("divide")')
        child.expect_exact("(Pdb) ")
        child.sendline("n")
        child.expect_exact("-> return total / by")
        child.expect_exact("(Pdb) ")
        child.sendline("p total, by")
        child.expect_exact("(10, 0)")
        child.expect_exact("(Pdb) ")
        child.sendline("c")
        child.expect_exact("the body raised ZeroDivisionError: division by zero")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 1
    assert _calls(tmp_path) == ["divide"]  # load answered from the journal; save never reached
    assert len(await eng.client.history(run_id)) == events  # nothing appended


@pytest.mark.parametrize("backend_url", ["sqlite", "kafka"], indirect=True)
async def test_any_debugger_through_breakpoint_at_a_named_step_a_post_mortem_and_live_steps(
    engine_factory, backend_url, tmp_path,
):
    eng = await engine_factory(app.registry)
    run_id, events = await _failed_run(eng, app.divide_task, {"n": 5, "by": 0})
    (tmp_path / "calls").unlink(missing_ok=True)

    named = _debug(backend_url, tmp_path, run_id, "--break-at", "load")
    assert named.returncode == 1, named.stderr  # divide fails again after the stop at load
    assert _breaks(tmp_path) == [{"name": "load", "position": 0, "inputs": [5], "recorded_output": 10,
                                  "function": "_at_recorded_step"}]
    assert _calls(tmp_path) == ["divide"]  # load's recorded output was handed back, its body did not run

    default = _debug(backend_url, tmp_path, run_id)
    assert default.returncode == 1
    assert _breaks(tmp_path)[-1] == {"name": "divide", "position": 1, "args": [10, 0], "kwargs": {},
                                     "error": "ZeroDivisionError: division by zero", "function": "_call_step"}

    refused = _debug(backend_url, tmp_path, run_id, "--live-from", "0")
    assert refused.returncode != 0 and "add --yes" in refused.stderr and "Traceback" not in refused.stderr
    assert len(_calls(tmp_path)) == 2  # nothing ran

    (tmp_path / "calls").unlink()
    live = _debug(backend_url, tmp_path, run_id, "--live-from", "0", "--yes", hook="0")
    assert live.returncode == 1 and "ZeroDivisionError" in live.stderr
    assert _calls(tmp_path) == ["load", "divide"]

    outside, _ = await _failed_run(eng, app.check, {"n": 6})  # fails after its only step
    breaks = len(_breaks(tmp_path))
    post = _debug(backend_url, tmp_path, outside)
    assert post.returncode == 1 and "post-mortem" in post.stderr
    assert _breaks(tmp_path)[breaks:] == [{"error": "ValueError('12 is too much')", "function": "_post_mortem"}]

    done = await app.divide_task.trigger({"n": 5, "by": 2}, client=eng.client)
    assert await done.result(timeout=30) == "saved 5.0"
    unnamed = _debug(backend_url, tmp_path, done.run_id)
    assert unnamed.returncode != 0 and "not failed: name the step to stop at with --break-at" in unnamed.stderr
    whole = _debug(backend_url, tmp_path, done.run_id, "--break-at", "2")
    assert whole.returncode == 0 and "the body returned \"saved 5.0\"" in whole.stderr
    assert _breaks(tmp_path)[-1]["name"] == "save"

    assert len(await eng.client.history(run_id)) == events  # no session appended anything
