"""a_cores: the same (a) work on one worker process and on every core, in one run.

  a_cores   the three-step no-op task (a) at 256 in flight, driven by a
            Client in this process (as a_split), against `stepline worker
            --processes 1` and then `stepline worker --processes N` (N: the
            usable cores, at least 2) on a fresh log each, and the same with
            `stepline dev` (API, dashboard and worker process 0 in one
            process, the others its children): runs/s of each,
            the ratio (the aim: >= 1.7x on 2 cores), CPU s per 1,000 runs of
            all the command's processes (the worker's supervisor and children;
            dev and its children) and of the driver, and their RSS after the
            runs. Its limit, from the same run: the runs/s the usable cores
            would give at the N side's CPU per run (its processes, the
            driver and, on Kafka, the broker started by scripts/kafka.sh,
            all on the same cores), as a ratio to the one-process side:
            a speedup above it needs less CPU per run, not more processes.

On sqlite FULL and, when a broker is had, on Kafka (a fresh namespace per
side; the N processes are members of the worker group, Kafka splits the
partitions). Nothing is pinned: every process, the driver's too, shares the machine's
cores, as users run them. `--concurrency` is the command's total: N
children get 256 / N each, so both sides have 256 runs in flight at most.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import kafka_bench
import sl_proc_tasks
import workloads
from workloads_procs import KAFKA, SPLIT_IN_FLIGHT, SQLITE, TASKS_FILE, Tail, rss_kb

import stepline as sl
from stepline.cli.supervise import usable_cores

ROOT = Path(__file__).resolve().parent.parent


def children_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                rest = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(rest[1]) == pid and rest[0] != "Z":
                out.append(int(entry))
    return sorted(out)


class Workers:
    """`stepline worker|dev --processes N` on `url`: the command's process and its children."""

    def __init__(self, url: str, state: Path, processes: int, command: str = "worker") -> None:
        self.url, self.state, self.processes = url, state, processes
        self.log_path = state / f"{command}-{processes}.log"
        # dev: the API and dashboard too, on a free port, and its query projection beside the log.
        extra = ["--port", "0"] if command == "dev" else []
        with self.log_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "stepline.cli", command, str(TASKS_FILE), "--log", url,
                 "--concurrency", str(workloads.WORKER_CONCURRENCY), "--processes", str(processes), *extra],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                env=dict(os.environ, BENCH_STATE=str(state)))

    def pids(self) -> list[int]:
        return [self.proc.pid, *children_of(self.proc.pid)]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-6:])
            raise RuntimeError(f"worker exited with {self.proc.returncode}: {tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def _claimed(tail: Tail, workers: Workers, timeout: float = 90.0) -> float:
    """Until every partition is claimed, by `processes` distinct workers."""
    t0 = time.monotonic()
    nparts = await tail.client.log.partitions(tail.client.topics.runs)
    owners = min(workers.processes, nparts)
    while True:
        await tail.poll()
        if len(tail.claims) == nparts and len(set(tail.claims.values())) == owners:
            return time.monotonic() - t0
        workers.check_alive()
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{len(tail.claims)}/{nparts} partitions claimed in {timeout:.0f} s")
        await asyncio.sleep(0.1)


async def one_side(url: str, processes: int, n: int, warmup: int, command: str = "worker",
                   cap: int = SPLIT_IN_FLIGHT, broker: int | None = None) -> dict[str, Any]:
    """(a) against `stepline <command> --processes <processes>`."""
    with tempfile.TemporaryDirectory(prefix="stepline-bench-cores-") as d:
        workers = Workers(url, Path(d), processes, command)
        try:
            async with sl.Client(url, registry=sl_proc_tasks.registry) as client:
                settle_s = await _claimed(Tail(client), workers)
                task = sl_proc_tasks.noop3
                w = await workloads.drive(client, task, lambda x: x + 3, warmup, cap, base=10**9)
                pids = workers.pids()
                w0 = sum(kafka_bench.proc_cpu_s(p) for p in pids)
                b0 = kafka_bench.proc_cpu_s(broker) if broker else 0.0
                d0, t0 = time.process_time(), time.perf_counter()
                r = await workloads.drive(client, task, lambda x: x + 3, n, cap)
                elapsed, dcpu = time.perf_counter() - t0, time.process_time() - d0
                after = workers.pids()
                if after != pids:
                    raise RuntimeError(f"a worker process was restarted during the measurement: {pids} -> {after}")
                wcpu = sum(kafka_bench.proc_cpu_s(p) for p in pids) - w0
                bcpu = kafka_bench.proc_cpu_s(broker) - b0 if broker else None
                rss = sum(rss_kb(p) for p in pids)
                workers.check_alive()
        finally:
            workers.stop()
    errors = w.errors + r.errors
    if r.completed != n or w.completed != warmup:
        errors.append(f"completed {r.completed}/{n} (warm-up {w.completed}/{warmup})")
    done = max(r.completed, 1)
    return {"errors": errors, "pids": len(pids), "completed": r.completed, "settle_s": settle_s,
            "elapsed_s": elapsed,
            "runs_per_s": r.completed / elapsed, "cpu_s_per_1000_runs_workers": 1000 * wcpu / done,
            "cpu_s_per_1000_runs_driver": 1000 * dcpu / done, "cpu_s_per_1000_runs_broker": 1000 * bcpu / done if bcpu is not None else None,
            "workers_rss_kb": rss}


async def cores(url_of: Any, n: int, warmup: int, command: str = "worker",
                broker: int | None = None) -> dict[str, Any]:
    """Both sides in one run, one process first; the ratio of their runs/s,
    and the ratio the cores allow at the N side's CPU per run."""
    sys.setswitchinterval(0.0005)
    many = max(2, usable_cores())
    one = await one_side(url_of(f"{command}-one"), 1, n, warmup, command, broker=broker)
    every = await one_side(url_of(f"{command}-every"), many, n, warmup, command, broker=broker)
    errors = [f"--processes 1: {e}" for e in one.pop("errors")] + [
        f"--processes {many}: {e}" for e in every.pop("errors")]
    metrics: dict[str, Any] = {"runs": n, "in_flight": SPLIT_IN_FLIGHT, "processes_many": many,
                               "usable_cores": usable_cores(),
                               "speedup": every["runs_per_s"] / one["runs_per_s"], "aim_speedup": 1.7}
    for side, m in (("one", one), ("many", every)):
        metrics.update({f"{k}_{side}": v for k, v in m.items()})
    metrics["cpu_s_per_1000_runs_one"] = one["cpu_s_per_1000_runs_workers"] + one["cpu_s_per_1000_runs_driver"]
    metrics["cpu_s_per_1000_runs_many"] = (every["cpu_s_per_1000_runs_workers"]
                                           + every["cpu_s_per_1000_runs_driver"])
    # What the cores give when every one is busy at the N side's cost per run:
    # CPU the broker spends on these runs is spent on the same cores.
    cost = metrics["cpu_s_per_1000_runs_many"] + (every["cpu_s_per_1000_runs_broker"] or 0.0)
    metrics["cores_limit_runs_per_s"] = usable_cores() * 1000 / cost if cost > 0 else None
    if metrics["cores_limit_runs_per_s"]:
        metrics["limit_speedup"] = metrics["cores_limit_runs_per_s"] / one["runs_per_s"]
        metrics["vs_limit"] = every["runs_per_s"] / metrics["cores_limit_runs_per_s"]
    return {"ok": not errors, "errors": errors, "metrics": metrics}


PARAMS = {"in_flight": SPLIT_IN_FLIGHT, "steps": 3, "processes": "1 vs N (usable cores, >= 2)"}


def one_rep(rec: Any, rep: int, sz: dict[str, Any], tmp_root: str | None, timeout: float,
            run_async: Any, bootstrap: str | None = None, sqlite: bool = True) -> None:
    """a_cores for `stepline worker` and `stepline dev`, on sqlite FULL and on
    Kafka when a broker is had (each side on a fresh log: a fresh file, a
    fresh namespace)."""
    systems = ([SQLITE] if sqlite else []) + ([KAFKA] if bootstrap else [])
    for system in systems:
        for command in ("worker", "dev"):
            t0 = time.perf_counter()
            result = _measure(system, command, sz, tmp_root, timeout, run_async, bootstrap)
            rec.add(system, "a_cores", {**PARAMS, "command": command}, rep, result, time.perf_counter() - t0)


def _measure(system: str, command: str, sz: dict[str, Any], tmp_root: str | None, timeout: float,
             run_async: Any, bootstrap: str | None) -> dict[str, Any]:
    namespaces: list[str] = []
    with tempfile.TemporaryDirectory(prefix="stepline-bench-", dir=tmp_root) as d:
        def url_of(name: str) -> str:
            if system == KAFKA and bootstrap:
                namespaces.append(kafka_bench.fresh_namespace("bench-cores"))
                return kafka_bench.log_url(bootstrap, namespaces[-1]) + sz["kafka_options"]
            os.makedirs(os.path.join(d, name), exist_ok=True)
            return workloads.log_url(os.path.join(d, name), "full")

        try:
            result: dict[str, Any] = run_async(
                lambda: cores(url_of, sz["split_runs"], sz["split_warmup"], command,
                              kafka_bench.script_broker_pid(bootstrap) if system == KAFKA and bootstrap else None),
                2 * timeout)
            return result
        finally:
            for ns in namespaces:
                asyncio.run(kafka_bench.delete_namespace(bootstrap or "", ns))


HEADLINES: dict[str, list[tuple[str, str, str]]] = {
    "a_cores": [("speedup", "runs/s every core / one process (aim ≥ 1.7)", "{:.2f}"),
                ("limit_speedup", "limit: the same ratio with every core busy at N's CPU per run", "{:.2f}"),
                ("vs_limit", "runs/s N ÷ that limit", "{:.2f}"),
                ("runs_per_s_one", "runs/s, --processes 1", "{:,.0f}"),
                ("runs_per_s_many", "runs/s, --processes N", "{:,.0f}"),
                ("cpu_s_per_1000_runs_workers_one", "CPU s/1k runs, worker, 1 process", "{:.2f}"),
                ("cpu_s_per_1000_runs_workers_many", "CPU s/1k runs, workers, N processes", "{:.2f}"),
                ("cpu_s_per_1000_runs_driver_one", "CPU s/1k runs, driver (vs 1)", "{:.2f}"),
                ("cpu_s_per_1000_runs_driver_many", "CPU s/1k runs, driver (vs N)", "{:.2f}"),
                ("cpu_s_per_1000_runs_broker_one", "CPU s/1k runs, broker (vs 1; Kafka)", "{:.2f}"),
                ("cpu_s_per_1000_runs_broker_many", "CPU s/1k runs, broker (vs N; Kafka)", "{:.2f}"),
                ("workers_rss_kb_one", "RSS KiB, worker, 1 process", "{:,.0f}"),
                ("workers_rss_kb_many", "RSS KiB, all N processes (+ supervisor)", "{:,.0f}")],
}
