"""Graceful drain: a stopping worker lets its running steps finish, then hands the runs over.

In process (`Worker.close(grace=...)`, every backend): the step running when
the drain starts finishes and is checkpointed, the attempt stops before the
next step, and a second worker resumes the run from there; the step never
runs twice. The same for an isolated task (the child is told over its
socket) and for steps running side by side.

Real processes (`stepline worker`, `stepline dev`): SIGTERM half a second
into a 2 s step, with a second worker waiting (a standby on sqlite, a group
member on Kafka): the step runs once, and the run completes on the second
worker from the next step. A second signal cancels at once. A standby
waiting for the sqlite group lock says so and obeys SIGTERM and SIGINT at
once. A bad `--grace` is one clear line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import stepline as sl
from stepline.core.events import RunStarted, StepCompleted, StepStarted
from stepline.log.topics import Topics
from stepline.settings import DEFAULT_SHUTDOWN_GRACE

from .cli_procs import CliProcs
from .conftest import eventually

APP = Path(__file__).parent / "apps" / "drain_app.py"
ROOT = Path(__file__).resolve().parent.parent


def calls(state: Path) -> list[tuple[str, str, int]]:
    """(run, step, pid) for every step execution, in order."""
    path = state / "calls.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(run, step, int(pid)) for run, step, pid in (line.split() for line in lines)]


def executions(state: Path, run_id: str, step: str) -> list[int]:
    """The pids that executed `step` of `run_id`."""
    return [pid for run, name, pid in calls(state) if run == run_id and name == step]


async def step_events(client: sl.Client, run_id: str) -> tuple[list[int], list[int], list[str]]:
    """The steps started and completed in the run's history, and its attempts' workers."""
    history = [ev for _, ev in await client.history(run_id)]
    started = [ev.body.step for ev in history if isinstance(ev.body, StepStarted)]
    completed = [ev.body.step for ev in history if isinstance(ev.body, StepCompleted)]
    workers = [ev.body.worker_id for ev in history if isinstance(ev.body, RunStarted)]
    return started, completed, workers


# --- in process: Worker.close(grace=...) ------------------------------------------


class Pair:
    """A client and workers on one log, each worker with its own connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.registry = sl.load_app(str(APP))
        self.topics = Topics(partitions=2)
        self.client = sl.Client(url, registry=self.registry, topics=self.topics)
        self.logs: list[sl.Log] = []
        self.workers: list[sl.Worker] = []

    async def worker(self, worker_id: str) -> sl.Worker:
        log = sl.open_log(self.url)
        await log.start()
        self.logs.append(log)
        w = sl.Worker(self.registry, log, topics=self.topics, client=self.client, worker_id=worker_id)
        await w.start()
        self.workers.append(w)
        return w

    async def close(self) -> None:
        for w in self.workers:
            await w.close()
        for log in self.logs:
            await log.close()
        await self.client.__aexit__(None, None, None)


@pytest.fixture
async def pair(backend_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Pair]:
    monkeypatch.setenv("DRAIN_DIR", str(tmp_path))  # read by drain_app's steps, also in a child process
    monkeypatch.setenv("DRAIN_STEP_SECONDS", "2")
    p = Pair(backend_url)
    await p.client.__aenter__()
    yield p
    await p.close()


async def drain_and_hand_over(pair: Pair, state: Path, task: str, steps_before: int) -> None:
    first = await pair.worker("worker-a")
    handle = await pair.client.trigger(task, {"n": 1})
    await eventually(lambda: executions(state, handle.run_id, "slow"), timeout=30, what="the slow step to start")
    await asyncio.sleep(0.5)
    await first.close(grace=30)

    # The running step finished and is durable; the attempt stopped before the next one.
    run = await pair.client.get_run(handle.run_id)
    assert run.status == "running"
    started, completed, workers = await step_events(pair.client, handle.run_id)
    assert sorted(completed) == list(range(steps_before)) and sorted(started) == sorted(completed)
    assert workers == ["worker-a"]

    await pair.worker("worker-b")
    result = await handle.result(timeout=30)
    assert result["result"] == ((1 + 1) + (1 + 2)) * 10 if task == "drain-gather" else (1 + 1) * 10
    assert len(executions(state, handle.run_id, "slow")) == 1
    assert len(executions(state, handle.run_id, "after")) == 1
    started, completed, workers = await step_events(pair.client, handle.run_id)
    assert sorted(started) == sorted(completed) == list(range(steps_before + 1))  # each step started once
    assert workers == ["worker-a", "worker-b"]


async def test_a_drained_worker_checkpoints_the_running_step_and_the_next_owner_resumes_after_it(
    pair: Pair, tmp_path: Path,
) -> None:
    await drain_and_hand_over(pair, tmp_path, "drain", steps_before=1)


@pytest.mark.parametrize("backend_url", ["sqlite"], indirect=True)
async def test_an_isolated_attempt_is_told_to_stop_at_its_next_step(pair: Pair, tmp_path: Path) -> None:
    await drain_and_hand_over(pair, tmp_path, "drain-isolated", steps_before=1)


@pytest.mark.parametrize("backend_url", ["memory"], indirect=True)
async def test_steps_running_side_by_side_both_finish_before_the_handover(pair: Pair, tmp_path: Path) -> None:
    await drain_and_hand_over(pair, tmp_path, "drain-gather", steps_before=2)


@pytest.mark.parametrize("backend_url", ["memory"], indirect=True)
async def test_a_draining_worker_says_it_is_not_ready(pair: Pair, tmp_path: Path) -> None:
    from stepline.server.probes import WorkerProbes

    first = await pair.worker("worker-a")
    probes = WorkerProbes("127.0.0.1", 0)
    probes.attach(first)
    try:
        assert (await probes.readiness())[0] == 200
        handle = await pair.client.trigger("drain", {"n": 1})
        await eventually(lambda: executions(tmp_path, handle.run_id, "slow"), timeout=30, what="the slow step")
        drain = asyncio.create_task(first.drain(30))
        await asyncio.sleep(0)
        status, body = await probes.readiness()
        assert (status, body["error"]) == (503, "the worker is draining for a graceful stop")
        assert await drain == 0
        assert (await probes.readiness())[0] == 503  # drained, not yet closed: still out of rotation
    finally:
        await probes.close()


@pytest.mark.parametrize("backend_url", ["memory"], indirect=True)
async def test_the_end_of_the_grace_cancels_the_step_and_it_runs_again(
    pair: Pair, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DRAIN_STEP_SECONDS", "30")
    first = await pair.worker("worker-a")
    handle = await pair.client.trigger("drain", {"n": 1})
    await eventually(lambda: executions(tmp_path, handle.run_id, "slow"), timeout=30, what="the slow step")
    assert await first.drain(0.2) == 1  # still running when the grace ended
    await first.close()
    started, completed, _ = await step_events(pair.client, handle.run_id)
    assert started == [0] and completed == []

    monkeypatch.setenv("DRAIN_STEP_SECONDS", "0")
    await pair.worker("worker-b")
    assert (await handle.result(timeout=30))["result"] == 20
    assert len(executions(tmp_path, handle.run_id, "slow")) == 2  # cancelled, so run again


# --- real processes -------------------------------------------------------------


class Procs(CliProcs):
    """`stepline` processes on one log running the drain app."""

    def __init__(self, url: str, state: Path) -> None:
        super().__init__(url, state)
        self.step_seconds = 2.0

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ, DRAIN_DIR=str(self.state), DRAIN_STEP_SECONDS=str(self.step_seconds))
        env.pop("STEPLINE_SHUTDOWN_GRACE", None)
        extra = ["--console-logs"] if args[0] == "worker" else []
        return self.spawn([*args, str(APP), "--log", self.url, *extra], env)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait(15)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(f"sqlite:///{tmp_path}/stepline.db", tmp_path)
    yield p
    p.stop_all()


async def sigterm_mid_step_and_hand_over(procs: Procs, first: subprocess.Popen[bytes],
                                         second: subprocess.Popen[bytes]) -> None:
    """The run's 2 s step is running on `first`: SIGTERM it at 0.5 s; `second` takes over."""
    async with sl.Client(procs.url) as client:
        handle = await client.trigger("drain", {"n": 4})
        await eventually(lambda: executions(procs.state, handle.run_id, "slow"), timeout=60,
                         what="the slow step to start")
        owner = executions(procs.state, handle.run_id, "slow")[0]
        owner_proc, other = (second, first) if owner == second.pid else (first, second)
        await asyncio.sleep(0.5)
        owner_proc.send_signal(signal.SIGTERM)
        result = await handle.result(timeout=60)
        assert result == {"result": 50, "after_by": other.pid}
        assert await procs.exited(owner_proc) == 0, procs.stderr(owner_proc)
        said = procs.stderr(owner_proc)
        assert "1 running attempt(s) get up to" in said and "cancelling" not in said, said
        assert executions(procs.state, handle.run_id, "slow") == [owner_proc.pid]  # ran once
        assert executions(procs.state, handle.run_id, "after") == [other.pid]  # from the next step, elsewhere
        started, completed, _ = await step_events(client, handle.run_id)
        assert started == [0, 1] and completed == [0, 1]
    assert other.poll() is None


@pytest.mark.slow
@pytest.mark.parametrize("command", ["worker", "dev"])
async def test_sigterm_mid_step_on_sqlite_the_standby_resumes_from_the_next_step(
    procs: Procs, command: str,
) -> None:
    first = procs.start(command, "--grace", "30", *(["--port", "0"] if command == "dev" else []))
    await procs.said(first, f"stepline {command}" if command == "dev" else "stepline worker")
    standby = procs.start("worker")
    await procs.said(standby, "waiting as a standby")
    await sigterm_mid_step_and_hand_over(procs, first, standby)
    assert "taking over" in procs.stderr(standby)


@pytest.mark.slow
async def test_sigterm_mid_step_on_kafka_the_other_member_resumes_from_the_next_step(
    kafka_bootstrap: str, tmp_path: Path,
) -> None:
    url = (f"kafka://{kafka_bootstrap}?namespace=drain-{uuid.uuid4().hex[:10]}&partitions=1"
           "&session_timeout_ms=6000&heartbeat_interval_ms=500&rebalance_timeout_ms=20000")
    procs = Procs(url, tmp_path)
    try:
        first = procs.start("worker", "--grace", "30")
        await procs.said(first, "stepline worker")
        second = procs.start("worker", "--grace", "30")
        await procs.said(second, "stepline worker")  # joined: one of the two owns the only partition
        await sigterm_mid_step_and_hand_over(procs, first, second)
    finally:
        procs.stop_all()


@pytest.mark.slow
async def test_a_second_signal_cancels_the_running_step_at_once(procs: Procs) -> None:
    procs.step_seconds = 60
    first = procs.start("worker", "--grace", "30")
    await procs.said(first, "stepline worker")
    async with sl.Client(procs.url) as client:
        handle = await client.trigger("drain", {"n": 1})
        await eventually(lambda: executions(procs.state, handle.run_id, "slow"), timeout=60, what="the step")
        first.send_signal(signal.SIGTERM)
        await procs.said(first, "get up to 30 s")
        first.send_signal(signal.SIGINT)
        assert await procs.exited(first, timeout=20) == 0  # long before the step or the grace ends
        assert "cancelling 1 attempt(s)" in procs.stderr(first)
        started, completed, _ = await step_events(client, handle.run_id)
        assert started == [0] and completed == []  # the next owner runs the step again


@pytest.mark.slow
async def test_a_standby_waiting_for_the_lock_says_so_and_stops_on_sigterm_or_sigint(procs: Procs) -> None:
    active = procs.start("worker")
    await procs.said(active, "stepline worker")
    standbys = {sig: procs.start("worker") for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig, standby in standbys.items():
        await procs.said(standby, "waiting as a standby")
        standby.send_signal(sig)
        assert await procs.exited(standby, timeout=15) == 0, procs.stderr(standby)
        assert "stopped before joining the worker group" in procs.stderr(standby)
    assert active.poll() is None  # the member is untouched


# --- bad input, deployment ---------------------------------------------------------


@pytest.mark.parametrize(("grace", "message"), [
    ("-1", "--grace '-1' must be a number of seconds ≥ 0"),
    ("soon", "--grace 'soon' is not a number of seconds"),
    ("nan", "--grace 'nan' must be a number of seconds ≥ 0"),
])
@pytest.mark.parametrize("command", ["worker", "dev"])
def test_a_bad_grace_is_one_clear_line(tmp_path: Path, command: str, grace: str, message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stepline.cli", command, str(APP), "--log", f"sqlite:///{tmp_path}/s.db",
         "--grace", grace], capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "s.db").exists()  # nothing opened, nothing written


def test_a_bad_grace_setting_is_one_clear_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stepline.cli", "worker", str(APP), "--log", f"sqlite:///{tmp_path}/s.db"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env=dict(os.environ, STEPLINE_SHUTDOWN_GRACE="-5"),
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "STEPLINE_SHUTDOWN_GRACE" in lines[0], proc.stderr


def test_kubernetes_gives_the_worker_more_than_its_grace() -> None:
    worker = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "worker-deployment.yaml").read_text())
    pod = worker["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for c in pod["containers"] for e in c.get("env", [])}
    grace = float(env.get("STEPLINE_SHUTDOWN_GRACE") or DEFAULT_SHUTDOWN_GRACE)
    # The drain, then cancelling what is left, a snapshot and leaving the group.
    assert grace + 10 <= pod["terminationGracePeriodSeconds"] <= grace + 30


def test_the_grace_comes_from_the_flag_else_the_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import typer.main

    from stepline.cli import app as cli_app
    from stepline.cli.shutdown import parse_grace

    monkeypatch.chdir(tmp_path)  # no stepline.toml
    monkeypatch.delenv("STEPLINE_SHUTDOWN_GRACE", raising=False)
    worker: Any = typer.main.get_command(cli_app).commands["worker"]

    def grace(*args: str) -> float:
        return parse_grace(worker.make_context("worker", ["app.py", *args]).params["grace"])

    assert grace() == DEFAULT_SHUTDOWN_GRACE
    monkeypatch.setenv("STEPLINE_SHUTDOWN_GRACE", "2.5")
    assert grace() == 2.5
    assert grace("--grace", "0") == 0.0
