"""The queue, LLM-agent and FastAPI examples run, and show what they claim."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# The FastAPI example needs the `examples` extra; CI installs it, so there a missing one fails.
HAS_WEB = all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn"))


def example_env(tmp_path: Path, **env: str) -> dict[str, str]:
    return dict(os.environ, STEPLINE_LOG=f"sqlite:///{tmp_path}/stepline.db", **env)


def run_example(name: str, tmp_path: Path, **env: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        env=example_env(tmp_path, **env), capture_output=True, text=True, timeout=90, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def lines_after(prefix: str, lines: list[str]) -> list[str]:
    return [line[len(prefix):] for line in lines if line.startswith(prefix)]


def test_send_email_never_sends_more_than_ten_at_once_and_sends_each_email_once(tmp_path: Path) -> None:
    lines = run_example("send_email.py", tmp_path)
    # Exactly 10: the limit is reached (50 queued, a worker with room for 256) and never passed.
    assert lines_after("peak concurrency: ", lines) == ["10"]
    assert lines_after("sent exactly once: ", lines) == ["50 of 50"]
    assert lines_after("sends in all: ", lines) == ["50"]


RETRY = re.compile(r"^  retry -> attempt (\d+) after (\d+) ms \((.*)\)$")


def test_llm_agent_waits_as_retry_after_asks_backs_off_on_5xx_and_gives_up_at_once_on_401(
    tmp_path: Path,
) -> None:
    lines = run_example("llm_agent.py", tmp_path)
    retries = [(int(m[1]), int(m[2]), m[3]) for m in map(RETRY.match, lines) if m]
    assert [(attempt, reason.split(" ")[1]) for attempt, _, reason in retries] == [
        (2, "429"), (3, "429"), (4, "500"),
    ], lines
    # The 429 rule's own delay is 5 s: 1000 ms means the server's Retry-After: 1 won.
    assert [delay for _, delay, reason in retries if " 429 " in reason] == [1000, 1000]
    # The 5xx rule: exponential from 0.3 s without jitter, so attempt 3 failing waits 0.3 * 2**2 s.
    assert [delay for _, delay, reason in retries if " 500 " in reason] == [1200]
    # search ran once, before the first 429; the retries replayed it from the journal.
    assert json.loads(lines_after("API calls: ", lines)[0]) == {"/v1/search": 1, "/v1/chat": 4}
    assert sum(line.strip() == "search completed" for line in lines) == 1
    result = json.loads(lines_after("result: ", lines)[0])
    assert result["sources"] == 3
    assert result["answer"] == "3 sources agree: it resumes from its last checkpoint."
    assert lines_after("revoked key: ", lines) == [
        "failed after 1 attempt(s), 0 retries (APIError: 401 invalid API key)"
    ]


def post_json(url: str, body: object) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.status, json.loads(resp.read())


@pytest.mark.skipif(not (HAS_WEB or IN_CI), reason="needs fastapi and uvicorn (pip install -e '.[examples]')")
def test_fastapi_app_triggers_an_order_and_streams_its_statuses_until_it_completes(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "fastapi_app.py")],
        env=example_env(tmp_path, PORT="0", ORDER_STEP_SECONDS="0.5", ORDER_WAIT_SECONDS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        first = proc.stdout.readline() if proc.stdout else ""
        assert first.startswith("listening on http://127.0.0.1:"), first + proc.communicate(timeout=10)[1]
        base = first.split()[-1]
        status, body = post_json(f"{base}/orders", {"order_id": "42"})
        assert status == 202 and body["run_id"].startswith("run_")
        assert post_json(f"{base}/orders", {"order_id": "42"}) == (202, body)  # the same order, the same run

        with urllib.request.urlopen(f"{base}/orders/{body['run_id']}/status", timeout=60) as resp:
            assert resp.headers["content-type"] == "application/x-ndjson"
            seen = [json.loads(line) for line in resp]
        statuses = [s["status"] for s in seen]
        assert all(a != b for a, b in zip(statuses, statuses[1:])), statuses  # changes only
        # The steps take 0.5 s and the warehouse wait 1 s, against a 0.1 s poll: each is seen.
        assert "running" in statuses and "suspended" in statuses, statuses
        assert statuses.index("running") < statuses.index("suspended") < len(statuses) - 1
        assert statuses[-1] == "completed"
        assert seen[-1]["output"] == {"order_id": "42", "status": "shipped", "tracking": "trk_res_42"}

        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{base}/orders/run_nope/status", timeout=10)
        assert missing.value.code == 404
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn shuts down: the lifespan closes worker and client
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
