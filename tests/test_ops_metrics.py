"""A worker's HTTP port (`stepline worker --http-port`): probes and Prometheus metrics,
scraped from a real worker process over real HTTP, on sqlite and on the Kafka broker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import stepline as sl
from stepline.observability import metrics

from .conftest import eventually
from .ops_http import APP, free_port, get, read, scrape, stepline, total, until_status, value

PARTITIONS = 2


@pytest.fixture(params=["sqlite", "kafka"])
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/stepline.db"
    servers = request.getfixturevalue("kafka_bootstrap")
    return f"kafka://{servers}?namespace=ops-{uuid.uuid4().hex[:10]}&partitions={PARTITIONS}"


async def test_a_live_worker_serves_probes_and_metrics_that_move(
    log_url: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]],
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    errors = tmp_path / "worker.err"
    procs.append(stepline("worker", APP, "--log", log_url, "--http-port", str(port), "--http-host", "127.0.0.1",
                          state=tmp_path, log=errors))
    try:
        ready = json.loads(await until_status(f"{base}/readyz", 200, procs[0]))
    except AssertionError:
        raise AssertionError(read(errors)) from None
    nparts = PARTITIONS if log_url.startswith("kafka") else 4  # sqlite: the engine's default topics
    assert ready["ready"] is True and ready["partitions"] == list(range(nparts)), ready
    assert await get(f"{base}/healthz") == (200, '{"ok": true}')
    assert (await get(f"{base}/nope"))[0] == 404

    before = await scrape(f"{base}/metrics")
    assert value(before, "stepline_partitions_owned") == nparts
    assert value(before, "stepline_worker_concurrency") == 256
    assert value(before, "stepline_runs_completed_total", task="ok") == 0

    async with sl.Client(log_url) as client:
        handles = [await client.trigger("ok", {"n": i}) for i in range(3)]
        handles.append(await client.trigger("flaky", {"key": "k1"}))
        boom = await client.trigger("boom", {})
        await client.trigger("dozy", {})
        for h in handles:
            await h.result(timeout=60)
        assert (await client.wait(boom.run_id, timeout=60)).status == "failed"

        async def sleeping() -> bool:
            return value(await scrape(f"{base}/metrics"), "stepline_owned_runs", state="sleeping") == 1

        await eventually(sleeping, timeout=30, what="the dozy run to show as sleeping")
    after = await scrape(f"{base}/metrics")

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("stepline_runs_started_total", task="ok") == 3
    assert moved("stepline_runs_completed_total", task="ok") == 3
    assert moved("stepline_runs_completed_total", task="flaky") == 1
    assert moved("stepline_runs_failed_total", task="boom") == 1
    assert moved("stepline_runs_dead_lettered_total", task="boom") == 1
    assert moved("stepline_retries_total", task="flaky") == 1
    assert moved("stepline_attempts_total", task="flaky", outcome="retrying") == 1
    assert moved("stepline_attempts_total", task="dozy", outcome="suspended") == 1
    assert moved("stepline_step_duration_seconds_count", task="ok") == 6  # two steps each
    assert moved("stepline_run_duration_seconds_count", task="ok", outcome="completed") == 3
    assert moved("stepline_run_duration_seconds_sum", task="ok", outcome="completed") > 0
    # The flaky run waited 0.1 s between its attempts: its run took longer than its last attempt.
    assert value(after, "stepline_run_duration_seconds_sum", task="flaky", outcome="completed") >= 0.1
    # Six triggers, then at least a start and an end each.
    assert moved("stepline_events_folded_total", event="RunTriggered") == 6
    assert total(after, "stepline_events_folded_total") - total(before, "stepline_events_folded_total") >= 18
    assert moved("stepline_log_append_duration_seconds_count") > 0
    assert value(after, "stepline_owned_runs", state="completed") == 4
    assert value(after, "stepline_owned_runs", state="failed") == 1
    assert value(after, "stepline_attempts_running") == 0
    # Every name follows the conventions: counters end in _total, durations are in seconds.
    for name, _ in after:
        if name.startswith("stepline_") and "duration" in name:
            assert "_seconds" in name, name


async def test_liveness_and_readiness_tell_a_stuck_loop_and_a_standby(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]],
) -> None:
    url = f"sqlite:///{tmp_path}/stepline.db"
    active, standby = free_port(), free_port()
    procs.append(stepline("worker", APP, "--log", url, "--http-port", str(active), state=tmp_path))
    await until_status(f"http://127.0.0.1:{active}/readyz", 200, procs[0])
    # A second worker on the same file waits for the lock: alive, not ready, and says why.
    procs.append(stepline("worker", APP, "--log", url, "--http-port", str(standby), state=tmp_path))
    body = await until_status(f"http://127.0.0.1:{standby}/readyz", 503, procs[1])
    assert "not joined its group" in json.loads(body)["error"]
    assert (await get(f"http://127.0.0.1:{standby}/healthz"))[0] == 200

    async with sl.Client(url) as client:
        await client.trigger("hog", {})
        await eventually(lambda: (tmp_path / "hogging").exists(), timeout=30, what="the hog to block the loop")
        status, body = await get(f"http://127.0.0.1:{active}/healthz")
        assert status == 503, body
        assert f"did not answer within {metrics_bound():g} s" in json.loads(body)["error"]
    # The loop is free again once the task gives it back.
    await until_status(f"http://127.0.0.1:{active}/healthz", 200, procs[0], timeout=20)


def metrics_bound() -> float:
    from stepline.server.probes import DEFAULT_BOUND_S

    return DEFAULT_BOUND_S


def _worker_cli(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("STEPLINE_")}
    environ.update(env, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "stepline.cli", "worker", APP, "--log",
                           f"sqlite:///{tmp_path}/stepline.db", *args],
                          env=environ, capture_output=True, text=True, timeout=60)


def test_a_port_in_use_is_one_clear_line_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _worker_cli("--http-port", str(port), "--http-host", "127.0.0.1", tmp_path=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port} (--http-port)" in lines[0]
    assert "in use" in lines[0]
    assert not (tmp_path / "stepline.db").exists(), "the log was opened before the port was bound"


@pytest.mark.parametrize("args, env, message", [
    (["--http-port", "70000"], {}, "--http-port '70000' is not a TCP port"),
    (["--http-port", "nine"], {}, "--http-port 'nine' is not a TCP port"),
    ([], {"STEPLINE_HTTP_PORT": "-1"}, "setting 'http_port' (environment variable STEPLINE_HTTP_PORT='-1')"),
])
def test_a_bad_port_is_one_clear_line(tmp_path: Path, args: list[str], env: dict[str, str], message: str) -> None:
    proc = _worker_cli(*args, tmp_path=tmp_path, **env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]


def test_every_documented_metric_is_in_operations_md() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    names = {m._name for m in (metrics.TRIGGERED, metrics.STARTED, metrics.COMPLETED, metrics.FAILED,
                               metrics.DEAD_LETTERED, metrics.ATTEMPTS, metrics.RETRIES)}
    names = {f"{n}_total" for n in names}
    names |= {metrics.STEP_SECONDS._name, metrics.ATTEMPT_SECONDS._name, metrics.RUN_SECONDS._name,
              metrics.APPEND_SECONDS._name, f"{metrics.FOLDED._name}_total", *metrics.GAUGES}
    missing = sorted(n for n in names if f"`{n}`" not in doc)
    assert not missing, f"docs/operations.md does not list {missing}"
