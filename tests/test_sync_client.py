"""stepline.SyncClient: trigger, wait, publish and cancel from code that is not async,
against a real worker process on a sqlite log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from pydantic import BaseModel

import stepline as sl

from .conftest import eventually

APPS = Path(__file__).parent / "apps"


@pytest.fixture
def log_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/stepline.db"


@pytest.fixture
def worker(log_url: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stepline.cli", "worker", str(APPS / "sync_app.py"), "--log", log_url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


async def test_a_plain_synchronous_script_triggers_waits_cancels_and_publishes(
    log_url: str, worker: subprocess.Popen[bytes],
) -> None:
    done = subprocess.run([sys.executable, str(APPS / "sync_script.py"), log_url],
                          capture_output=True, text=True, timeout=180, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    checks = {line["check"]: line for line in map(json.loads, done.stdout.splitlines())}

    assert checks["result"]["value"] == {"greeting": "hello ada"}
    assert checks["state"]["status"] == "completed"
    assert checks["failed"]["error"] == "RunFailedError" and "refused bob" in checks["failed"]["message"]
    assert "did not finish within 0.5 s" in checks["timeout"]["message"]
    assert checks["cancelled"]["status"] == "cancelled"
    assert checks["cancel-again"]["error"] == "InvalidRunState"
    assert checks["unknown"]["error"] == "UnknownRun"
    assert checks["listed"]["runs"] == [["sync-greet", "cancelled"], ["sync-greet", "completed"],
                                        ["sync-refuse", "failed"]]
    # No "Unclosed" or "never awaited" noise: atexit closed the module-level client.
    assert done.stderr == ""

    async with sl.Client(log_url) as client:
        async def pong() -> Any:
            runs = [r for r in await client.list_runs() if r.task_id == "sync-on-ping"]
            return runs and runs[0].status == "completed" and runs[0]

        ran = await eventually(pong, timeout=60, what="the published event's run")
        assert json.loads(ran.output.data) == {"pong": 7}


class Order(BaseModel):
    order_id: int


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_requests_of_a_threaded_wsgi_app_each_trigger_and_wait(
    log_url: str, worker: subprocess.Popen[bytes],
) -> None:
    # One client for the whole app, as a Django or Flask app keeps it.
    client = sl.SyncClient(log_url)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        name = environ["PATH_INFO"].strip("/")
        run = client.trigger("sync-greet", {"name": name})
        body = json.dumps({"run_id": run.run_id, "thread": threading.get_ident(),
                           **run.result(timeout=60)}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]

    server = make_server("127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_Quiet)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    names = [f"user{i}" for i in range(6)]
    answers: dict[str, dict[str, Any]] = {}

    def call(name: str) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/{name}", timeout=120) as resp:
            answers[name] = json.loads(resp.read())

    try:
        callers = [threading.Thread(target=call, args=(n,)) for n in names]
        for t in callers:
            t.start()
        for t in callers:
            t.join(180)
    finally:
        server.shutdown()
        server.server_close()

    try:
        assert {n: a["greeting"] for n, a in answers.items()} == {n: f"hello {n}" for n in names}
        # Each request was served on its own thread, all through the one client.
        assert len({a["thread"] for a in answers.values()}) == len(names)
        assert len({a["run_id"] for a in answers.values()}) == len(names)
        assert all(client.get_run(a["run_id"]).status == "completed" for a in answers.values())
    finally:
        client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.get_run(answers[names[0]]["run_id"])


def test_the_sync_client_raises_the_async_clients_errors_and_opens_nothing_until_used(
    tmp_path: Path,
) -> None:
    registry = sl.Registry()

    @sl.task(id="typed", registry=registry)
    async def typed(payload: Order) -> int:
        return payload.order_id

    url = f"sqlite:///{tmp_path}/lazy.db"
    client = sl.SyncClient(url, registry=registry)
    assert not list(tmp_path.iterdir())  # built, not connected: safe at import time
    with client:
        with pytest.raises(sl.UnknownRun):
            client.get_run("run_00000000000000000000000000")
        with pytest.raises(sl.UnknownTask):
            client.trigger("no-such-task", {})
        with pytest.raises(sl.PayloadValidationError):
            client.trigger("typed", {"order_id": "five"})
        assert client.list_runs() == []  # nothing was appended for either
    client.close()  # a second close is harmless
