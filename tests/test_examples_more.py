"""The fan-out, schedule and research-agent examples run, and show what they claim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, tmp_path: Path, **env: str) -> list[str]:
    full_env = dict(os.environ, STEPLINE_LOG=f"sqlite:///{tmp_path}/stepline.db", **env)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        env=full_env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def lines_after(prefix: str, lines: list[str]) -> list[str]:
    return [line[len(prefix):] for line in lines if line.startswith(prefix)]


def test_user_signup_runs_onboard_pro_only_for_pro_users_and_welcomes_everyone(tmp_path: Path) -> None:
    lines = run_example("user_signup.py", tmp_path)
    ran = [line.split() for line in lines_after("ran: ", lines)]  # task, email, plan=..., status
    assert all(status == "completed" for *_, status in ran), ran
    welcomed = sorted(email for task, email, _, _ in ran if task == "send-welcome")
    onboarded = sorted(email for task, email, _, _ in ran if task == "onboard-pro")
    assert welcomed == ["ada@example.com", "bob@example.com", "cyd@example.com", "dee@example.com"]
    # "team" is not "pro": the filter matches exact values only.
    assert onboarded == ["ada@example.com", "cyd@example.com"]
    assert {task for task, *_ in ran} == {"send-welcome", "onboard-pro"}


def test_nightly_report_runs_each_tick_once_and_shows_the_berlin_cron_times(tmp_path: Path) -> None:
    lines = run_example("nightly_report.py", tmp_path, REPORT_EVERY_SECONDS="0.3", REPORT_TICKS="3")
    cron = lines_after("  cron: ", lines)
    assert len(cron) == 3 and all(" 03:00 CE" in line for line in cron), cron  # CET or CEST
    ticks = [line.split() for line in lines_after("tick: ", lines)]  # at, run id, report built Nx
    assert len(ticks) == 3, lines
    times = [datetime.fromisoformat(t[0]) for t in ticks]
    assert len(set(times)) == 3 and len({t[1] for t in ticks}) == 3
    assert all(int(at.timestamp() * 1000) % 300 == 0 for at in times)  # on the interval's grid
    assert all(t[-1] == "1x" for t in ticks), ticks


def test_research_agent_retries_analyze_without_searching_or_browsing_again(tmp_path: Path) -> None:
    lines = run_example("research_agent.py", tmp_path)
    executions = json.loads(lines_after("executions: ", lines)[0])
    result = json.loads(lines_after("result: ", lines)[0])
    assert result["status"] == "completed" and len(result["sources"]) == 3
    assert executions == {"search": 1, "analyze": 2, **{f"browse {url}": 1 for url in result["sources"]}}
    assert any(line.strip().startswith("retry -> attempt 2") and "LLMUnavailable" in line for line in lines)


def test_payment_webhook_refuses_a_forged_delivery_and_a_signed_one_resumes_the_order(tmp_path: Path) -> None:
    lines = run_example("payment_webhook.py", tmp_path)
    assert lines_after("forged delivery: ", lines)[0].startswith("401 ")
    assert lines_after("signed delivery: ", lines)[0].startswith("202 event ")
    assert lines_after("fulfil-order: ", lines) == ["order-81: paid by pay_123, shipping"]
    assert lines_after("record-payment: ", lines) == ["recorded pay_123: 4200 EUR for order-81"]
