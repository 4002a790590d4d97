"""compose.yaml runs: Kafka, two workers, the API and dashboard, and a worker killed mid-step.

The stack is the repository's compose.yaml as it is, on the images
scripts/images.sh builds (no registry), with an override that only mounts
the test's task module (tests/apps/compose_app.py) and a folder where its
steps record each execution. The test triggers runs over the HTTP API,
`docker kill`s the worker that is inside a step, and checks that every run
completes, that each step completed once in the history and ran to its end
once, that the step cut off was run again by the other worker, and that
the runs show in the API and the dashboard answers. The stack is torn down
whatever happens (`down -v`). Ports are published on 127.0.0.1 only; every
wait is bounded.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.docker_env import DOCKER_SH, ROOT, docker, require_images, unavailable

RUNS = 6
STEPS = 3
UP_TIMEOUT_S = 300
RUNS_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """One compose project: `compose(...)` runs scripts/docker.sh compose with its files and env."""

    def __init__(self, tmp: Path) -> None:
        self.project = f"stepline-compose-{uuid.uuid4().hex[:8]}"
        self.records = tmp / "records"
        self.records.mkdir()
        self.records.chmod(0o777)  # the image's `stepline` user writes here
        override = tmp / "compose.test.yaml"
        apps = ROOT / "tests" / "apps"
        override.write_text(json.dumps({"services": {
            "worker": {"volumes": [f"{apps}:/testapp:ro", f"{self.records}:/records"],
                       "environment": {"COMPOSE_RECORDS": "/records/steps.log"}},
            "api": {"volumes": [f"{apps}:/testapp:ro"]},
        }}))
        self.token = secrets.token_hex(16)
        self.api_port = _free_port()
        self.env = {**os.environ, "STEPLINE_API_TOKEN": self.token, "STEPLINE_APP": "/testapp/compose_app.py",
                    "STEPLINE_API_PORT": str(self.api_port), "KAFKA_HOST_PORT": str(_free_port()),
                    "COMPOSE_PROJECT_NAME": self.project}
        self.files = ["-f", str(ROOT / "compose.yaml"), "-f", str(override)]

    def compose(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(DOCKER_SH), "compose", "-p", self.project, *self.files, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)
        if check and done.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def containers(self, service: str) -> dict[str, str]:
        """Running containers of a service: hostname (the short id) -> full id."""
        out = docker("ps", "-q", "--no-trunc", "--filter", f"label=com.docker.compose.project={self.project}",
                     "--filter", f"label=com.docker.compose.service={service}").stdout.split()
        return {cid[:12]: cid for cid in out}

    def api(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
        return json.loads(raw) if response.headers.get_content_type() == "application/json" else raw.decode()

    def lines(self) -> list[list[str]]:
        path = self.records / "steps.log"
        return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def _until(check: Any, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            found = check()
        except (OSError, urllib.error.URLError, ValueError) as exc:  # not up yet
            last, found = exc, None
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last!r})")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    require_images()
    version = subprocess.run([str(DOCKER_SH), "compose", "version"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0:
        unavailable(f"no Docker Compose: {version.stderr.strip()} (scripts/docker.sh install)")
    stack = Stack(tmp_path)
    try:
        yield stack
    finally:
        logs = stack.compose("logs", "--no-color", "--tail", "80", check=False, timeout=60)
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "5", check=False, timeout=180)
        (tmp_path / "compose.log").write_text(logs.stdout + logs.stderr)
        leftover = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={stack.project}").stdout
        assert not leftover.strip(), f"compose down left containers: {leftover}"


def test_compose_stack_survives_a_worker_killed_mid_step(stack: Stack) -> None:
    # Without --build: compose runs the images scripts/images.sh built.
    stack.compose("up", "-d", "--no-build", "--scale", "worker=2", timeout=UP_TIMEOUT_S)
    _until(lambda: stack.api("GET", "/healthz"), 120, "the API's /healthz")
    workers = stack.containers("worker")
    assert len(workers) == 2, f"expected two worker containers, found {workers}"

    run_ids = [stack.api("POST", "/v1/tasks/compose-order/trigger", {"payload": f"order-{i}"})["run_id"]
               for i in range(RUNS)]

    # The first worker seen inside a step is killed while the step sleeps.
    def in_flight() -> tuple[str, str] | None:
        ended = {(key, host) for kind, key, host, _ in stack.lines() if kind == "end"}
        for kind, key, host, at in stack.lines():
            if kind == "begin" and (key, host) not in ended and time.time() - float(at) < 1.5 and host in workers:
                return key, host
        return None

    _, victim = _until(in_flight, 120, "a step in flight", interval=0.1)
    docker("kill", workers[victim])
    killed_at = time.time()
    cut = {key for kind, key, host, at in stack.lines() if kind == "begin" and host == victim}
    cut -= {key for kind, key, host, _ in stack.lines() if kind == "end" and host == victim}
    assert cut, "the kill caught no step in flight"

    def states() -> list[dict[str, Any]]:
        return [stack.api("GET", f"/v1/runs/{rid}") for rid in run_ids]

    def all_done() -> bool:
        return all(s["status"] in ("completed", "failed", "cancelled") for s in states())

    _until(all_done, RUNS_TIMEOUT_S, "every run to end after the kill")
    print(f"compose: killed worker {victim} inside {sorted(cut)}; every run completed "
          f"{time.time() - killed_at:.1f} s after the kill")
    final = states()
    assert [s["status"] for s in final] == ["completed"] * RUNS, [(s["run_id"], s["status"], s["error"]) for s in final]

    # Each completed step has one StepCompleted, and its body ran to the end once.
    ends = Counter(key for kind, key, *_ in stack.lines() if kind == "end")
    for rid in run_ids:
        events = stack.api("GET", f"/v1/runs/{rid}/history")["events"]
        completed = Counter(e["body"]["step"] for e in events if e["type"] == "StepCompleted")
        assert sorted(completed) == list(range(STEPS)) and set(completed.values()) == {1}, (rid, completed)
        for step in range(STEPS):
            assert ends[f"{rid}:{step}"] == 1, f"{rid}:{step} ran to its end {ends[f'{rid}:{step}']} times"
    # The steps the kill cut off were run again, by the surviving worker.
    survivor = next(h for h in workers if h != victim)
    for key in cut:
        assert [h for kind, k, h, _ in stack.lines() if kind == "end" and k == key] == [survivor], key
    assert all(float(at) > killed_at for kind, key, host, at in stack.lines() if key in cut and kind == "end")

    listed = {r["run_id"] for r in stack.api("GET", "/v1/runs?task=compose-order&limit=100")["runs"]}
    assert set(run_ids) <= listed, f"runs missing from GET /v1/runs: {set(run_ids) - listed}"
    page = stack.api("GET", "/")
    assert "<html" in page.lower(), "the dashboard did not answer at /"
