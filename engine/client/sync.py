"""`SyncClient`: the client for code that is not async (Django, Flask, scripts).

One background thread runs an event loop that owns an ordinary async
`Client`; every method hands its coroutine to that loop and blocks the
calling thread until it is done. So a Django view, a Flask handler or a
script triggers and waits without asyncio, and any number of threads share
one connection (the loop serialises nothing but its own bookkeeping: the
requests of different threads run concurrently on it).

Its lifecycle, in order:

1. Built: nothing happens (it may be a module-level object, e.g. in
   Django's settings, imported before the log exists).
2. First call: the thread starts and opens the client.
3. `close()`, the end of a `with` block, or interpreter exit (atexit):
   the client closes, then the loop and the thread end.

A process forked after step 2 (a pre-fork web server) does not inherit the
thread: the child's first call starts its own, with its own connection.
Errors are the async client's own types (`UnknownRun`, `RunFailedError`,
`TimeoutError`, ...), raised in the calling thread.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, Generic, TypeVar

from stepline.client._client import Client
from stepline.projections.runs import RunState
from stepline.sdk.port import RunHandle, TaskRef

R = TypeVar("R")
T = TypeVar("T")


@dataclass(frozen=True)
class SyncRunHandle(Generic[R]):
    """A triggered run, for synchronous code: its id, and its result once it ends."""

    run_id: str
    task_id: str
    _handle: RunHandle[R]
    _client: SyncClient

    def result(self, timeout: float | timedelta | None = None) -> R:
        """Block until the run ends; its output. RunFailedError when it failed or
        was cancelled; TimeoutError (naming the run) when `timeout` passes first,
        and the run goes on."""
        return self._client._call(self._handle.result(timeout))

    def state(self) -> RunState:
        """The run's state now."""
        return self._client.get_run(self.run_id)


class SyncClient:
    """A `stepline.Client` for synchronous code; thread-safe.

        client = stepline.SyncClient("sqlite:///stepline.db")
        run = client.trigger("process-order", {"order_id": 5})
        print(run.result(timeout=30))

    Takes the arguments of `stepline.Client`. Use it as a context manager,
    or keep one for the life of the process: it connects on first use and
    closes at interpreter exit.
    """

    def __init__(self, url: str | None = None, **client_options: Any) -> None:
        self._url = url
        self._options = client_options
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Client | None = None
        self._pid = 0
        self._closed = False

    # --- lifecycle ---------------------------------------------------------

    def __enter__(self) -> SyncClient:
        self._started()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _started(self) -> tuple[asyncio.AbstractEventLoop, Client]:
        with self._lock:
            if self._closed:
                raise RuntimeError("this SyncClient is closed; build a new one")
            if self._loop is None or self._pid != os.getpid():
                self._start()
            assert self._loop is not None and self._client is not None  # noqa: S101 - set by _start
            return self._loop, self._client

    def _start(self) -> None:
        """Start the loop thread and open the client on it (under the lock)."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()
            loop.close()

        # A daemon, so that a forgotten client never keeps the process alive;
        # atexit closes it properly before daemon threads are stopped.
        thread = threading.Thread(target=run, name="stepline-sync-client", daemon=True)
        thread.start()
        ready.wait()
        client = Client(self._url, **self._options)
        try:
            asyncio.run_coroutine_threadsafe(client.__aenter__(), loop).result()
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            raise
        self._loop, self._thread, self._client, self._pid = loop, thread, client, os.getpid()
        _close_at_exit(self)

    def close(self) -> None:
        """Close the client and stop its thread; later calls raise. Idempotent."""
        with self._lock:
            self._closed = True
            loop, thread, client = self._loop, self._thread, self._client
            self._loop, self._thread, self._client = None, None, None
            if loop is None or thread is None or client is None or self._pid != os.getpid():
                return  # never started here (a forked child holds only a copy)
        try:
            asyncio.run_coroutine_threadsafe(client.__aexit__(None, None, None), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            loop, _ = self._started()
        except BaseException:
            coro.close()  # never awaited: no "was never awaited" warning
            raise
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a SyncClient cannot be called from its own event loop; use stepline.Client")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C in a script, or the calling thread otherwise interrupted:
            # the request must not go on behind its back.
            future.cancel()
            raise

    def _with_client(self, request: Callable[[Client], Coroutine[Any, Any, T]]) -> T:
        async def run() -> T:
            assert self._client is not None  # noqa: S101 - started before the loop runs this
            return await request(self._client)

        return self._call(run())

    @property
    def client(self) -> Client:
        """The async client underneath (for use on its own loop only)."""
        return self._started()[1]

    # --- requests ----------------------------------------------------------

    def trigger(
        self,
        task: TaskRef[R] | str,
        payload: Any = None,
        *,
        idempotency_key: str | None = None,
        delay: timedelta | float | None = None,
        priority: int = 0,
        tags: Sequence[str] = (),
        concurrency_key: str | None = None,
        ttl: timedelta | float | None = None,
        idempotency_key_ttl: timedelta | float | None = None,
    ) -> SyncRunHandle[R]:
        """Trigger a run (see `Client.trigger`); its handle."""
        handle: RunHandle[R] = self._with_client(lambda c: c.trigger(
            task, payload, idempotency_key=idempotency_key, delay=delay, priority=priority, tags=tags,
            concurrency_key=concurrency_key, ttl=ttl, idempotency_key_ttl=idempotency_key_ttl,
        ))
        return SyncRunHandle(handle.run_id, handle.task_id, handle, self)

    def publish(self, name: str, data: Any = None, *, key: str | None = None, source: str = "api") -> str:
        """Publish a domain event (see `Client.publish`); its event id."""
        return self._with_client(lambda c: c.publish(name, data, key=key, source=source))

    def get_run(self, run_id: str) -> RunState:
        """A run's state now; UnknownRun if there is none."""
        return self._with_client(lambda c: c.get_run(run_id))

    def list_runs(self) -> list[RunState]:
        """Every run on the log, newest first (reads the whole runs topic)."""
        return self._with_client(lambda c: c.list_runs())

    def wait(self, run_id: str, timeout: float | None = None) -> RunState:
        """Block until the run is completed, failed or cancelled; its state then."""
        return self._with_client(lambda c: c.wait(run_id, timeout))

    def cancel(self, run_id: str, reason: str = "cancelled by request") -> RunState:
        """Cancel a live run; InvalidRunState if it has ended."""
        return self._with_client(lambda c: c.cancel(run_id, reason))

    def retry(self, run_id: str, payload: Any = None, *, new_payload: bool = False) -> RunState:
        """Re-trigger a failed or cancelled run (see `Client.retry`)."""
        return self._with_client(lambda c: c.retry(run_id, payload, new_payload=new_payload))

    def complete_token(self, token: str, data: Any = None) -> RunState:
        """Resume the run waiting on `token` with `data`."""
        return self._with_client(lambda c: c.complete_token(token, data))


def _close_at_exit(client: SyncClient) -> None:
    """Close `client` as the interpreter exits, unless it is gone or closed by then.

    Not plain atexit: by the time atexit runs, concurrent.futures refuses new
    work, and closing a log hands blocking calls to the loop's executor.
    Threading's own exit hooks run first (private, but it is how
    concurrent.futures itself gets there first); weak, so that a client
    dropped early is not kept alive until exit.
    """
    ref = weakref.ref(client)

    def close() -> None:
        found = ref()
        if found is not None:
            found.close()

    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("no threading exit hooks here")
        register(close)
    except RuntimeError:  # missing, or already shutting down (opened at exit)
        atexit.register(close)


__all__ = ["SyncClient", "SyncRunHandle"]
