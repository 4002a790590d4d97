"""The child process of an isolated attempt (`@task(isolation="process")`).

Started by its worker (engine/runtime/isolation.py, which describes the
exchange) as `python -m stepline.runtime.isolation_child <fd> <parent pid>`:
it reads its `Init` from the socket, imports the task's app, runs the
ordinary attempt code (`runner.run_body`) and records everything through
its parent. It has no connection to the log.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import os
import random
import signal
import socket
import sys
import threading
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stepline.core.events import Body
from stepline.core.payloads import ANY
from stepline.errors import IsolationError, NoClient
from stepline.observability import isolated
from stepline.projections.runs import RunState
from stepline.runtime import isolation_wire as wire
from stepline.runtime.runner import run_body
from stepline.sdk.context import RunContext, now_ms
from stepline.sdk.interceptors import Interceptors, default_interceptors
from stepline.sdk.port import RunHandle, TaskRef, bind_client
from stepline.sdk.task import Task, load_app


class _Link:
    """The child's side of the socket: calls to the parent, as futures."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._listener: asyncio.Task[None] | None = None
        # Set when the worker drains (its "handover" message): the attempt
        # stops before its next step.
        self.handover = asyncio.Event()

    async def recv(self) -> Any:
        return await wire.recv(self._reader)

    def send(self, msg: tuple[Any, ...]) -> None:
        self._writer.write(wire.frame(msg))

    def call(self, name: str, *args: Any) -> asyncio.Future[Any]:
        call_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        self.send(("call", call_id, name, args))
        return fut

    def emit(self, body: Body) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = self.call("emit", body)
        return fut

    def listen(self) -> None:
        self._listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        while True:
            try:
                msg: tuple[Any, ...] = await wire.recv(self._reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                # The worker is gone or gave up on this attempt: nothing this
                # process does from here can be recorded, so stop doing it.
                _leave(70)
            if msg[0] == "handover":
                self.handover.set()
                continue
            _, call_id, ok, value = msg
            fut = self._pending.pop(call_id, None)
            if fut is None or fut.done():
                continue
            if ok:
                fut.set_result(value)
            elif value is None:
                fut.cancel()
            else:
                fut.set_exception(value)

    async def close(self) -> None:
        await self._writer.drain()
        if self._listener is not None:
            self._listener.cancel()
        self._writer.close()


class _ParentClient:
    """Stands in for the worker's Client inside the child. Triggers and
    publishes go through the parent; the rest of Client is not offered."""

    def __init__(self, link: _Link) -> None:
        self._link = link

    async def trigger(self, task: TaskRef[Any] | str, payload: Any = None, **options: Any) -> RunHandle[Any]:
        task_id = task if isinstance(task, str) else task.id
        t = task if isinstance(task, Task) else None
        # Validated here, where the caller can catch it; sent as JSON data,
        # since a payload object need not pickle.
        data = (t.payload_codec if t else ANY).check_and_dump(payload, f"payload for task {task_id!r}")
        run_id, offset = await self._link.call("trigger", task_id, json.loads(data.data), options)
        codec = t.output_codec if t else ANY
        return RunHandle(run_id, task_id, self, codec, offset)

    async def publish(self, name: str, data: Any = None, **options: Any) -> str:
        value = json.loads(ANY.dump(data, f"data of event {name!r}").data)
        event_id: str = await self._link.call("publish", name, value, options)
        return event_id

    async def wait(self, run_id: str, timeout: float | None = None, from_offset: int | None = None) -> RunState:
        state: RunState = await self._link.call("wait", run_id, timeout, from_offset)
        return state

    async def get_run(self, run_id: str) -> RunState:
        state: RunState = await self._link.call("get_run", run_id)
        return state

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise NoClient(
            f"Client.{name} is not available inside a task with isolation='process': the child "
            f"reaches the log only through its worker, which offers trigger, publish, wait and get_run"
        )


def _limit_memory(mb: int) -> None:
    import resource  # only where a limit is set: Unix only

    limit = mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _find_task(init: wire.Init) -> Task[Any, Any]:
    sys.path[:0] = [p for p in init.sys_path if p not in sys.path]
    registry = load_app(init.target)
    found = registry.find(init.task_id)
    if found is None:  # declared with another registry: look in the module itself
        module = sys.modules.get(Path(init.target).stem if init.target.endswith(".py") else init.target)
        candidates = vars(module).values() if module is not None else ()
        found = next((v for v in candidates if isinstance(v, Task) and v.id == init.task_id), None)
    if found is None:
        raise IsolationError(
            f"task {init.task_id!r} is not declared in {init.target} as imported by the child "
            f"process (known there: {', '.join(registry.ids()) or 'none'}); an isolated task must "
            f"be declared at module level of its app"
        )
    return found


def _shifted_clock(offset_ms: int) -> Callable[[], int]:
    return lambda: now_ms() + offset_ms


async def _child(fd: int) -> int:
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
    link = _Link(reader, writer)
    init: wire.Init = await link.recv()
    try:
        if init.memory_limit_mb is not None:
            _limit_memory(init.memory_limit_mb)  # before the app's imports count against it
        task = _find_task(init)
    except Exception as exc:
        link.send(("unavailable", f"{type(exc).__qualname__}: {exc}"))
        await link.close()
        return 1
    link.send(("ready",))
    link.listen()
    state = init.state
    hooks = Interceptors(default_interceptors())
    ctx = RunContext(
        state.run_id, state.task_id, state.attempt, state.steps, link.emit,
        _shifted_clock(init.clock_offset_ms),
        register_wait=functools.partial(link.call, "register_wait") if init.can_register_waits else None,
        unregister_wait=functools.partial(link.call, "unregister_wait") if init.can_register_waits else None,
        request=functools.partial(link.call, "request") if init.can_request else None,
        patches=state.patch_answers(), step_scope=hooks.step, handover=link.handover,
        step_failures=state.step_failures(),
    )
    if init.has_client:
        bind_client(_ParentClient(link))
    spans = None if init.trace is None else isolated.ChildSpans(init.trace, task.id, _span_sender(link))
    try:
        outcome = await run_body(task, state, ctx, random.Random(init.seed), None, hooks)
    except Exception as exc:
        link.send(("raised", wire.portable_error(exc)))
    else:
        link.send(("outcome", outcome))
    finally:
        if spans is not None:
            spans.close()
    await link.close()
    return 0


def _span_sender(link: _Link) -> Callable[[list[isolated.PortableSpan]], None]:
    """Send finished spans to the parent: at once from the loop's thread, so
    a step's spans precede the outcome; via the loop from other threads."""
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()

    def send(batch: list[isolated.PortableSpan]) -> None:
        if threading.get_ident() == loop_thread:
            link.send(("spans", batch))
        else:
            loop.call_soon_threadsafe(link.send, ("spans", batch))

    return send


def _die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel kill this process if the worker dies, even
    while the task spins in code that never reads the socket. Best effort."""
    if sys.platform != "linux":
        return
    import ctypes  # only on Linux, where the request exists

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the request took effect
        _leave(70)


def _leave(code: int) -> typing.NoReturn:
    """Exit now, keeping what was printed. Threads the task left behind are
    not joined: the attempt is over, there is nothing left to report to."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    fd, parent_pid = (int(a) for a in (sys.argv[1:] if argv is None else argv))
    _die_with_parent(parent_pid)
    _leave(asyncio.run(_child(fd)))


if __name__ == "__main__":
    # Run as `python -m stepline.runtime.isolation_child`: hand over to the
    # importable module, so that classes pickled to and from the parent are the same.
    from stepline.runtime.isolation_child import main as _main

    _main()
