"""A worker's HTTP port (`stepline worker --http-port`): `/healthz`, `/readyz`, `/metrics`.

Served from a thread of its own (the standard library's HTTP server), not
from the worker's event loop: a liveness probe has to say "the loop is
stuck" even while it is, which a handler on that very loop never could.
Every check is therefore a question put to the loop with a bound:

* `/healthz`: the loop runs a no-op within `bound` seconds (200), or not (503).
* `/readyz`: the worker has joined its group (it holds its partitions, or
  none while others hold them all) and the log answers a read of the runs
  topic's end offset within `bound` (200); else 503 with the reason. A
  worker still waiting to join (a standby behind the SQLite file lock, a
  Kafka group forming) is alive but not ready, and so is a worker draining
  for a graceful stop: it starts nothing more, so a load balancer or an
  autoscaler counting ready workers should count it out.
* `/metrics`: the Prometheus text of engine/observability/metrics.py, read
  on the loop.

Answers are JSON (`/metrics` excepted), e.g. `{"ok": false, "error": "..."}`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from stepline.observability import metrics
from stepline.runtime.worker import Worker

DEFAULT_BOUND_S = 5.0


class WorkerProbes:
    """The probe and metrics server of one worker process.

    The port is bound when this is built (a port in use raises OSError there,
    before anything else starts); `start` serves it, `attach` names the
    worker once it exists, `close` stops serving.
    """

    def __init__(self, host: str, port: int, *, bound: float = DEFAULT_BOUND_S) -> None:
        self.bound = bound
        self.worker: Worker | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server = _Server((host, port), _Handler)
        self._server.probes = self
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        shown = host if isinstance(host, str) else host.decode()
        return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve from a daemon thread; the checks run on the calling event loop."""
        self.loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="stepline-probes", daemon=True)
        self._thread.start()

    def attach(self, worker: Worker) -> None:
        self.worker = worker

    async def close(self) -> None:
        if self._thread is not None:
            await asyncio.to_thread(self._server.shutdown)
            self._thread = None
        self._server.server_close()

    async def __aenter__(self) -> WorkerProbes:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the checks, run on the worker's loop ---------------------------------

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        worker = self.worker
        if worker is None or not worker.started.is_set():
            return 503, {"ready": False, "error": "the worker has not joined its group yet "
                                                  "(starting, or a standby waiting for its turn)"}
        if worker.draining:
            return 503, {"ready": False, "error": "the worker is draining for a graceful stop"}
        try:
            await asyncio.wait_for(worker.log.end_offset(worker.topics.runs, 0), self.bound)
        except TimeoutError:
            return 503, {"ready": False, "error": f"the log did not answer within {self.bound:g} s"}
        except Exception as exc:  # the log's own error says what is wrong
            return 503, {"ready": False, "error": f"the log is not reachable: {exc}"}
        return 200, {"ready": True, "worker_id": worker.worker_id, "partitions": sorted(worker.owned)}

    def ask(self, coro: Coroutine[Any, Any, Any], timeout: float) -> Any:
        """Run `coro` on the worker's loop from the server's thread; TimeoutError past `timeout`."""
        loop = self.loop
        if loop is None or loop.is_closed():
            coro.close()
            raise TimeoutError
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError from None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    probes: WorkerProbes


async def _answer() -> bool:
    return True


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        probes = self.server.probes
        path = self.path.split("?", 1)[0]
        bound = probes.bound
        try:
            if path == "/healthz":
                probes.ask(_answer(), bound)
                self._json(200, {"ok": True})
            elif path == "/readyz":
                # The log check has its own bound; the loop gets one more to answer at all.
                status, body = probes.ask(probes.readiness(), 2 * bound)
                self._json(status, body)
            elif path == "/metrics":
                self._send(200, probes.ask(metrics.exposition(), bound), metrics.CONTENT_TYPE)
            else:
                self._json(404, {"error": f"no route GET {path}: this port serves /healthz, /readyz, /metrics"})
        except TimeoutError:
            self._json(503, {"ok": False, "error": f"the worker's event loop did not answer within {bound:g} s"})

    def _json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return None  # probes every few seconds would drown the worker's own log lines


__all__ = ["DEFAULT_BOUND_S", "WorkerProbes"]
