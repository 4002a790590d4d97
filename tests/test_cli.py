"""The `stepline` command line, run as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stepline.log import open_log

APP = str(Path(__file__).parent / "apps" / "cli_app.py")


def stepline(*args: str, url: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STEPLINE_LOG=url, COLUMNS="200")
    env.pop("STEPLINE_APP", None)
    proc = subprocess.run(
        [sys.executable, "-m", "stepline.cli", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"stepline {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def run_json(*args: str, url: str) -> object:
    return json.loads(stepline(*args, "--json", url=url).stdout)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/stepline.db"


@pytest.fixture
def worker(url: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepline.cli", "worker", APP, "--log", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    yield proc
    proc.terminate()
    proc.wait(10)


def wait_for(fn, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_trigger_and_wait_prints_the_output_and_runs_show_the_steps(url, worker):
    res = run_json("trigger", "times-ten", "--app", APP, "--payload", '{"n": 4}', "--wait",
                   "--timeout", "30", url=url)
    assert res["status"] == "completed" and res["output"] == 40
    run_id = res["run_id"]
    shown = run_json("runs", "show", run_id, url=url)
    assert [s["name"] for s in shown["steps"]] == ["load", "check"]
    assert shown["steps"][1]["output"] == 40 and shown["payload"] == {"n": 4}
    history = run_json("history", run_id, url=url)
    assert history[0]["type"] == "RunTriggered" and history[-1]["type"] == "RunCompleted"
    assert [h["offset"] for h in history] == sorted(h["offset"] for h in history)
    listed = run_json("runs", "ls", url=url)
    assert [r["run_id"] for r in listed] == [run_id]
    plain = stepline("runs", "show", run_id, url=url).stdout
    assert "completed" in plain and "check" in plain


def test_a_dead_letter_is_listed_and_retried_with_a_new_payload(url, worker):
    proc = stepline("trigger", "times-ten", "--app", APP, "--payload", '{"n": 0}', "--wait",
                    "--timeout", "30", "--json", url=url, check=False)
    assert proc.returncode == 1  # --wait exits non-zero when the run did not complete
    res = json.loads(proc.stdout)
    assert res["status"] == "failed" and "n must be positive" in res["error"]
    run_id = res["run_id"]
    dead = wait_for(lambda: run_json("dlq", "ls", url=url))
    assert [d["run_id"] for d in dead] == [run_id]
    assert dead[0]["error"]["type"] == "ValueError" and dead[0]["attempt"] == 2
    run_json("dlq", "retry", run_id, "--app", APP, "--payload", '{"n": 3}', url=url)
    done = wait_for(lambda: (s := run_json("runs", "show", run_id, url=url))["status"] == "completed" and s)
    assert done["output"] == 30
    assert run_json("dlq", "ls", url=url) == []
    # `load` completed before the failures: its recorded output was reused.
    load_runs = [h for h in run_json("history", run_id, url=url)
                 if h["type"] == "StepStarted" and h["body"]["name"] == "load"]
    assert len(load_runs) == 1


def test_cancel_ends_a_sleeping_run(url, worker):
    res = run_json("trigger", "nap", "--app", APP, "--payload", '{"n": 600}', url=url)
    run_id = res["run_id"]
    wait_for(lambda: run_json("runs", "show", run_id, url=url)["status"] == "suspended")
    run_json("cancel", run_id, url=url)
    wait_for(lambda: run_json("runs", "show", run_id, url=url)["status"] == "cancelled")
    again = stepline("cancel", run_id, url=url, check=False)
    assert again.returncode == 1 and "already cancelled" in again.stderr


def create_log(url: str) -> None:
    async def go() -> None:
        async with open_log(url):
            pass

    asyncio.run(go())


def end_offsets(url: str) -> int:
    return sum(1 for _ in run_json("runs", "ls", url=url))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["trigger", "no-such-task", "--app", APP, "--payload", "{}"], "unknown task id 'no-such-task'"),
        (["trigger", "times-ten", "--app", APP, "--payload", '{"m": 1}'], "n: Field required"),
        (["trigger", "times-ten", "--app", APP, "--payload", '{"n": "many"}'], "n: Input should be a valid integer"),
        (["trigger", "times-ten", "--app", APP, "--payload", "{n: 1"], "--payload is not valid JSON"),
        (["trigger", "times-ten", "--payload", "{}"], "pass --app"),
        (["runs", "show", "run_nope"], "no run with id 'run_nope'"),
        (["dlq", "retry", "run_nope"], "no run with id 'run_nope'"),
    ],
)
def test_bad_input_is_one_clear_line_a_nonzero_exit_and_nothing_appended(url, args, message):
    create_log(url)  # the reads that count the runs refuse a log that does not exist
    before = end_offsets(url)
    proc = stepline(*args, url=url, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert end_offsets(url) == before


def test_an_unusable_log_url_is_reported_plainly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for bad, message in [
        (f"sqlite:///{blocker}/sub/stepline.db", "stepline.db"),
        ("postgres://localhost/x", "postgres://localhost/x"),
    ]:
        proc = stepline("runs", "ls", url=bad, check=False)
        assert proc.returncode == 1
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr
