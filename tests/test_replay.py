"""Looking back at recorded runs: `stepline history`, `runs show --as-of`, and
replay checking of changed task code against recorded journals.

One sqlite log for the module, written by a real worker process: a checkout
that failed once, retried, slept and completed, and a second one still
suspended in a long sleep. Every test only reads it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import stepline as sl
from stepline.history.replay import (
    DIVERGENCE,
    NON_DETERMINISTIC,
    PAYLOAD_INVALID,
    TASK_MISSING,
    check_runs,
    iso_ms,
    parse_point,
)

APP = Path(__file__).parent / "apps" / "replay_app.py"
ISO_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def stepline(*args: str, url: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STEPLINE_LOG=url, COLUMNS="200")
    env.pop("STEPLINE_APP", None)
    proc = subprocess.run([sys.executable, "-m", "stepline.cli", *args],
                          env=env, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"stepline {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def run_json(*args: str, url: str) -> Any:
    return json.loads(stepline(*args, "--json", url=url).stdout)


def wait_for(fn, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@dataclass(frozen=True)
class Recorded:
    url: str
    done: str  # completed after a retry and a short sleep
    done_ledger: Path
    asleep: str  # suspended in a long sleep
    asleep_ledger: Path


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    tmp = tmp_path_factory.mktemp("replay")
    url = f"sqlite:///{tmp}/stepline.db"
    with (tmp / "worker.log").open("w") as worker_log:
        worker = subprocess.Popen([sys.executable, "-m", "stepline.cli", "worker", str(APP), "--log", url],
                                  stdout=worker_log, stderr=subprocess.STDOUT)
        try:
            done_ledger, asleep_ledger = tmp / "done.ledger", tmp / "asleep.ledger"
            done = run_json("trigger", "checkout", "--app", str(APP), "--wait", "--timeout", "30", "--payload",
                            json.dumps({"ledger": str(done_ledger), "amount": 3}), url=url)
            assert done["status"] == "completed", done
            asleep = run_json("trigger", "checkout", "--app", str(APP), "--payload",
                              json.dumps({"ledger": str(asleep_ledger), "amount": 5, "nap": 600}), url=url)
            wait_for(lambda: run_json("runs", "show", asleep["run_id"], url=url)["status"] == "suspended")
        finally:
            worker.terminate()
            worker.wait(10)
    assert done_ledger.read_text().splitlines() == ["price 3", "charge 300", "charge 300", "receipt ch_300"]
    assert asleep_ledger.read_text().splitlines() == ["price 5", "charge 500", "charge 500"]
    yield Recorded(url, done["run_id"], done_ledger, asleep["run_id"], asleep_ledger)


def events_of(rec: Recorded, run_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = run_json("history", run_id, url=rec.url)
    return events


def first(events: list[dict[str, Any]], type_: str) -> dict[str, Any]:
    return next(e for e in events if e["type"] == type_)


# --- stepline history -----------------------------------------------------


def test_history_lists_every_event_of_a_run_in_offset_order_with_readable_bodies(recorded):
    events = events_of(recorded, recorded.done)
    types = [e["type"] for e in events]
    assert [e["offset"] for e in events] == sorted(e["offset"] for e in events)
    milestones = ["RunTriggered", "StepFailed", "RetryScheduled", "RunSuspended", "RunResumed", "RunCompleted"]
    assert [t for t in types if t in milestones] == milestones
    failed = first(events, "StepFailed")["body"]
    assert failed["name"] == "charge" and failed["error"]["type"] == "ConnectionError"
    assert "stack" not in failed["error"]  # only on request
    assert first(events, "RunCompleted")["body"]["output"] == {"charge": "ch_300", "receipt": "receipt for ch_300"}

    plain = stepline("history", recorded.done, url=recorded.url).stdout.splitlines()
    lines = [line for line in plain[1:] if line.strip()]
    assert len(lines) == len(events)
    for line, event in zip(lines, events):
        offset, at, type_ = line.split()[:3]
        assert (int(offset), type_) == (event["offset"], event["type"])
        assert ISO_MS.fullmatch(at) and at == iso_ms(event["time"])
    failed_line = next(line for line in lines if "StepFailed" in line)
    assert 'error="ConnectionError: card network timed out"' in failed_line
    assert 'name="charge"' in failed_line
    suspended_line = next(line for line in lines if "RunSuspended" in line)
    assert f'wake_at="{iso_ms(first(events, "RunSuspended")["body"]["wake_at"])}"' in suspended_line
    assert "Traceback" not in "\n".join(plain)


def test_history_shows_error_stacks_on_request(recorded):
    plain = stepline("history", recorded.done, "--stacks", url=recorded.url).stdout
    assert "Traceback (most recent call last)" in plain and "ConnectionError: card network timed out" in plain
    events = run_json("history", recorded.done, "--stacks", url=recorded.url)
    assert "Traceback" in first(events, "StepFailed")["body"]["error"]["stack"]


def test_history_of_an_unknown_run_is_one_clear_error(recorded):
    proc = stepline("history", "run_nope", url=recorded.url, check=False)
    assert proc.returncode == 1 and "no run with id 'run_nope'" in proc.stderr


# --- stepline runs show --as-of ------------------------------------------


def show_as_of(rec: Recorded, run_id: str, point: str | int) -> dict[str, Any]:
    shown: dict[str, Any] = run_json("runs", "show", run_id, "--as-of", str(point), url=rec.url)
    return shown


def test_as_of_an_offset_folds_the_events_up_to_it_inclusive(recorded):
    events = events_of(recorded, recorded.done)
    failed = first(events, "StepFailed")
    at_failure = show_as_of(recorded, recorded.done, failed["offset"])
    assert at_failure["status"] == "running"
    assert [(s["name"], s["status"]) for s in at_failure["steps"]] == [("price", "completed"), ("charge", "failed")]
    assert at_failure["steps"][1]["error"] == "ConnectionError: card network timed out"
    assert at_failure["as_of"]["offset"] == failed["offset"] and at_failure["as_of"]["event"] == "StepFailed"
    assert at_failure["output"] is None

    retry = first(events, "RetryScheduled")
    assert show_as_of(recorded, recorded.done, retry["offset"])["status"] == "retrying"

    suspended = first(events, "RunSuspended")
    asleep = show_as_of(recorded, recorded.done, suspended["offset"])
    assert asleep["status"] == "suspended"
    assert asleep["wake_at"] == suspended["body"]["wake_at"]
    assert [s["status"] for s in asleep["steps"]] == ["completed", "completed", "waiting"]

    plain = stepline("runs", "show", recorded.done, "--as-of", str(suspended["offset"]), url=recorded.url).stdout
    assert plain.startswith(f"as of offset {suspended['offset']} ({iso_ms(suspended['time'])})")
    assert "suspended" in plain and f"wakes at {iso_ms(suspended['body']['wake_at'])}" in plain


def test_as_of_a_time_between_two_events_gives_the_state_at_that_time(recorded):
    events = events_of(recorded, recorded.done)
    suspended, resumed = first(events, "RunSuspended"), first(events, "RunResumed")
    assert resumed["time"] - suspended["time"] >= 100  # the 0.2 s sleep
    between = iso_ms((suspended["time"] + resumed["time"]) // 2)
    at_time = show_as_of(recorded, recorded.done, between)
    at_offset = show_as_of(recorded, recorded.done, suspended["offset"])
    assert at_time["as_of"]["offset"] == suspended["offset"]
    assert {k: v for k, v in at_time.items() if k != "as_of"} == {
        k: v for k, v in at_offset.items() if k != "as_of"}
    # A zone other than UTC names the same instant.
    local = at_time["as_of"]["time"] + 1
    plus_two = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(local / 1000 + 7200)) + f".{local % 1000:03d}+02:00"
    assert show_as_of(recorded, recorded.done, plus_two)["as_of"]["offset"] == suspended["offset"]


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ("yesterday", "--as-of 'yesterday' is neither a log offset"),
        ("-5", "--as-of '-5' is neither a log offset"),
        ("2000-01-01T00:00:00Z", "did not exist yet as of 2000-01-01T00:00:00.000Z: its first event is at offset"),
        ("-1d", "did not exist yet as of"),
    ],
)
def test_a_bad_or_too_early_as_of_is_one_clear_error(recorded, point, message):
    proc = stepline("runs", "show", recorded.done, "--as-of", point, url=recorded.url, check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_as_of_parses_offsets_relative_and_iso_times():
    now = 1_700_000_000_000
    assert parse_point("42", now).offset == 42
    assert parse_point("-5m", now).time == now - 300_000
    assert parse_point("-1.5s", now).time == now - 1500
    assert parse_point("2023-11-14T22:13:20.250Z", now).time == now + 250
    assert parse_point("2023-11-14T22:13:20.250", now).time == now + 250  # no zone: UTC
    assert parse_point("2023-11-15T00:13:20+02:00", now).time == now
    with pytest.raises(ValueError, match="neither a log offset"):
        parse_point("soon", now)


# --- replay checking ------------------------------------------------------


def variant(tmp_path: Path, name: str, *edits: tuple[str, str]) -> sl.Registry:
    """A copy of the app with `edits` applied, loaded as a module of its own."""
    source = APP.read_text()
    for old, new in edits:
        assert old in source, old
        source = source.replace(old, new)
    path = tmp_path / f"replay_app_{name}.py"
    path.write_text(source)
    return sl.load_app(str(path))


def ledgers(rec: Recorded) -> tuple[str, str]:
    return rec.done_ledger.read_text(), rec.asleep_ledger.read_text()


async def test_the_unchanged_app_replays_every_recorded_run_ok(recorded):
    seen: list[tuple[int, int]] = []
    report = await check_runs(recorded.url, sl.load_app(str(APP)), progress=lambda d, t: seen.append((d, t)))
    assert report.problems == []
    assert (report.checked, report.ok, report.skipped) == (2, 2, 0)
    assert seen == [(1, 2), (2, 2)]
    assert report.to_dict() == {"checked": 2, "ok": 2, "skipped": 0, "problems": [], "totals": {
        NON_DETERMINISTIC: 0, TASK_MISSING: 0, PAYLOAD_INVALID: 0, DIVERGENCE: 0}}


async def test_a_replay_runs_no_step_body_not_even_past_the_end_of_a_run_in_flight(recorded):
    before = ledgers(recorded)
    # The sleeping run's history ends at its sleep: the receipt after it, which
    # would append to its ledger, must not run, and neither may any recorded step.
    report = await check_runs(recorded.url, sl.load_app(str(APP)), run_ids=[recorded.asleep, recorded.done])
    assert (report.checked, report.ok) == (2, 2)
    assert ledgers(recorded) == before
    assert "receipt" not in recorded.asleep_ledger.read_text()


async def test_a_renamed_second_step_is_non_deterministic_at_its_position_with_both_names(recorded, tmp_path):
    registry = variant(tmp_path, "renamed", ("async def charge(", "async def charge_card("),
                       ("await charge(", "await charge_card("))
    before = ledgers(recorded)
    report = await check_runs(recorded.url, registry)
    assert (report.checked, report.ok) == (2, 0)
    assert {p.run_id for p in report.problems} == {recorded.done, recorded.asleep}
    for p in report.problems:
        assert (p.kind, p.position, p.expected, p.got) == (NON_DETERMINISTIC, 1, "charge", "charge_card")
        assert "'charge_card' in the code but 'charge' in the journal" in p.message
    assert report.totals()[NON_DETERMINISTIC] == 2
    assert ledgers(recorded) == before


async def test_a_changed_final_computation_is_a_divergent_output(recorded, tmp_path):
    registry = variant(tmp_path, "louder", ('"receipt": text}', '"receipt": text.upper()}'))
    report = await check_runs(recorded.url, registry)
    # The sleeping run never got that far: nothing to contradict.
    assert (report.checked, report.ok) == (2, 1)
    [p] = report.problems
    assert (p.run_id, p.kind, p.status) == (recorded.done, DIVERGENCE, "completed")
    assert p.recorded_output == {"charge": "ch_300", "receipt": "receipt for ch_300"}
    assert p.replayed_output == {"charge": "ch_300", "receipt": "RECEIPT FOR CH_300"}
    assert report.to_dict()["problems"][0]["replayed_output"] == p.replayed_output


async def test_code_that_raises_before_a_step_the_history_completed_diverges(recorded, tmp_path):
    registry = variant(tmp_path, "guarded", (
        "    charge_id = await charge(",
        "    if cents > 0:\n        raise RuntimeError('charges are paused')\n    charge_id = await charge(",
    ))
    report = await check_runs(recorded.url, registry, run_ids=[recorded.done])
    [p] = report.problems
    assert (p.kind, p.position, p.expected) == (DIVERGENCE, 1, "charge")
    assert p.error == "RuntimeError: charges are paused"


async def test_a_payload_that_no_longer_validates_is_reported(recorded, tmp_path):
    registry = variant(tmp_path, "currency", ("    amount: int\n", "    amount: int\n    currency: str\n"))
    report = await check_runs(recorded.url, registry, task_ids=["checkout"])
    assert [p.kind for p in report.problems] == [PAYLOAD_INVALID, PAYLOAD_INVALID]
    assert all("currency: Field required" in p.message for p in report.problems)


async def test_a_run_whose_task_is_gone_is_reported_when_asked_for_and_skipped_otherwise(recorded):
    empty = sl.Registry()
    asked = await check_runs(recorded.url, empty, run_ids=[recorded.done])
    [p] = asked.problems
    assert (p.kind, p.task_id) == (TASK_MISSING, "checkout")
    by_task = await check_runs(recorded.url, empty, task_ids=["checkout"])
    assert by_task.totals()[TASK_MISSING] == 2
    everything = await check_runs(recorded.url, empty)
    assert (everything.checked, everything.skipped, everything.problems) == (0, 2, [])


async def test_an_unknown_run_id_is_an_error(recorded):
    with pytest.raises(sl.UnknownRun):
        await check_runs(recorded.url, sl.load_app(str(APP)), run_ids=["run_nope"])


def test_stepline_replay_check_passes_the_app_and_fails_a_renamed_step(recorded, tmp_path):
    ok = run_json("replay", "--check", str(APP), url=recorded.url)
    assert (ok["checked"], ok["ok"], ok["problems"]) == (2, 2, [])
    source = APP.read_text().replace("async def charge(", "async def charge_card(").replace(
        "await charge(", "await charge_card(")
    changed = tmp_path / "replay_app_changed.py"
    changed.write_text(source)
    proc = stepline("replay", "--check", str(changed), url=recorded.url, check=False)
    assert proc.returncode == 1
    assert "non-deterministic" in proc.stdout and "2 problem(s)" in proc.stdout
