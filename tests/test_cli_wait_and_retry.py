"""The CLI's --wait that runs out of time, and `dlq retry` after a failed run,
run as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_cli import APP, run_json, stepline, wait_for

# `stepline trigger/fork --wait --timeout` when the run has not ended in time
# (documented in the commands' help, docs/concepts.md and docs/fork-and-shadow.md).
STILL_PENDING = 124


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


def test_trigger_wait_with_no_worker_says_the_run_is_still_pending(url):
    proc = stepline("trigger", "times-ten", "--app", APP, "--payload", '{"n": 1}', "--wait",
                    "--timeout", "0.5", url=url, check=False)
    assert proc.returncode == STILL_PENDING, proc.stderr
    [run] = run_json("runs", "ls", url=url)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert any(run["run_id"] in line and "still pending" in line for line in lines), lines
    assert run["status"] == "pending"


def test_trigger_wait_with_no_worker_prints_json_under_json(url):
    proc = stepline("trigger", "times-ten", "--app", APP, "--payload", '{"n": 1}', "--wait",
                    "--timeout", "0.5", "--json", url=url, check=False)
    assert proc.returncode == STILL_PENDING, proc.stderr
    res = json.loads(proc.stdout)
    [run] = run_json("runs", "ls", url=url)
    assert res["run_id"] == run["run_id"] and res["status"] == "pending" and res["timed_out"] is True


def test_fork_wait_with_no_worker_says_the_fork_is_still_pending(url, worker):
    done = run_json("trigger", "times-ten", "--app", APP, "--payload", '{"n": 2}', "--wait",
                    "--timeout", "30", url=url)
    assert done["status"] == "completed"
    worker.terminate()
    worker.wait(10)
    proc = stepline("fork", done["run_id"], "--at-step", "1", "--app", APP, "--wait", "--timeout", "0.5",
                    "--json", url=url, check=False)
    assert proc.returncode == STILL_PENDING, proc.stderr
    res = json.loads(proc.stdout)
    assert res["forked_from"] == done["run_id"] and res["status"] == "pending" and res["timed_out"] is True
    plain = stepline("fork", done["run_id"], "--at-step", "1", "--app", APP, "--wait", "--timeout", "0.5",
                     url=url, check=False)
    assert plain.returncode == STILL_PENDING and "Traceback" not in plain.stderr
    assert "still pending" in plain.stdout + plain.stderr


def cancelled_run(url: str) -> str:
    """A run that `dlq retry` may retrigger, made without a worker."""
    run_id = run_json("trigger", "times-ten", "--app", APP, "--payload", '{"n": 1}', url=url)["run_id"]
    run_json("cancel", run_id, url=url)
    return run_id


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--payload", '{"n": 5}'], "stepline dlq retry --payload needs the app module"),
        (["--app", APP, "--payload", '{"order_id": 5}'], "n: Field required"),
        (["--app", APP, "--payload", '{"n": "many"}'], "n: Input should be a valid integer"),
    ],
)
def test_dlq_retry_refuses_a_payload_it_cannot_validate_and_appends_nothing(url, args, message):
    run_id = cancelled_run(url)
    before = run_json("history", run_id, url=url)
    proc = stepline("dlq", "retry", run_id, *args, url=url, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert run_json("history", run_id, url=url) == before
    assert run_json("runs", "show", run_id, url=url)["status"] == "cancelled"


def test_dlq_retry_with_the_app_appends_a_valid_payload(url):
    run_id = cancelled_run(url)
    res = run_json("dlq", "retry", run_id, "--app", APP, "--payload", '{"n": 5}', url=url)
    assert res["retriggered"] is True and res["new_payload"] is True
    last = run_json("history", run_id, url=url)[-1]
    assert last["type"] == "RunRetriggered"


def test_after_dlq_retry_runs_show_ls_history_and_steps_say_the_same_attempt(url, worker):
    proc = stepline("trigger", "times-ten", "--app", APP, "--payload", '{"n": 0}', "--wait",
                    "--timeout", "30", "--json", url=url, check=False)
    run_id = json.loads(proc.stdout)["run_id"]
    wait_for(lambda: run_json("dlq", "ls", url=url))  # failed attempts 1 and 2
    run_json("dlq", "retry", run_id, "--app", APP, "--payload", '{"n": 3}', url=url)
    shown = wait_for(lambda: (s := run_json("runs", "show", run_id, url=url))["status"] == "completed" and s)
    started = [h["body"]["attempt"] for h in run_json("history", run_id, url=url) if h["type"] == "RunStarted"]
    assert started == [1, 2, 3]
    assert shown["attempt"] == 3 == shown["steps"][-1]["attempt"]
    assert [r["attempt"] for r in run_json("runs", "ls", url=url)] == [3]
    assert "attempt 3" in stepline("runs", "show", run_id, url=url).stdout
