"""Workloads with a real `stepline worker` process: the engine in one process
pinned to one core, the load driver (a Client in the benchmark process)
pinned to another, on sqlite (FULL) and on Kafka.

  a_split     the three-step no-op task (a) at 256 in flight, worker process
              + driver: runs/s and CPU s per 1,000 runs of each process
              (worker, driver, and the Kafka broker's JVM from
              /proc/<pid>/stat when its pid is known)
  d_recovery  N runs (1,000) blocked inside step two; the worker gets
              SIGKILL; the block is lifted and a fresh worker process is
              started on the same log. Times from that restart: the new
              process has imported its app, the first step two re-entered,
              all N re-entered, all N completed (the driver's
              handle.result()); completed steps executed again (must be 0:
              step one once, step three once, step two twice per run) and
              runs lost (must be 0)
  g_sleeping  N runs (100,000) asleep in a fresh worker process: RSS delta per
              sleeping run (VmRSS once all N are suspended minus VmRSS before
              the first trigger, after a warm-up); then the wake: their wake
              times are spread evenly over a window and the lateness of each
              is the step after the sleep starting (its body's time.time())
              minus the wake time the driver put in its payload

Step executions are counted from lines the task bodies append to a file
(bench/sl_proc_tasks.py), not from the engine's own events, so a step that
ran again is seen even if the engine would not record it. Pinning: the
worker runs under `taskset -c 0`, the driver sets its own affinity to CPU 1
(both recorded in every row's `pinning`); the broker is not pinned. Without
taskset or a second CPU nothing is pinned and the rows say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kafka_bench
import physical
import sl_proc_tasks
import workloads

import stepline as sl
from stepline.core import codec
from stepline.core.events import PartitionClaimed
from stepline.projections.runs import SUSPENDED, PartitionRuns

ROOT = Path(__file__).resolve().parent.parent
TASKS_FILE = Path(__file__).resolve().parent / "sl_proc_tasks.py"
WORKER_CPU, DRIVER_CPU = 0, 1
SPLIT_IN_FLIGHT = 256
SQLITE = "stepline-sqlite FULL (fsync)"
KAFKA = kafka_bench.SYSTEM


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        # Kafka's session timeout at the broker's minimum: the restarted worker
        # waits for the killed member's session to expire (timings are not judged).
        return {"split_runs": 300, "split_warmup": 64, "d_runs": 100, "g_runs": 300, "g_warmup": 30,
                "g_spread_s": 0.5, "g_margin_s": 1.5, "g_settle_s": 0.2,
                "kafka_options": "&session_timeout_ms=6000"}
    # g_sleeping: 100,000 sleepers (issue 17's row (g) is per run at that
    # scale), their wakes spread over 200 s: 500 wakes/s.
    # The warm-up of a_split fills the worker's window of whole ended runs
    # (Worker.keep_ended: 4 partitions x 2,000 offsets, ~900 three-step runs),
    # so the RSS measured after it is what each further ended run leaves.
    return {"split_runs": 3000, "split_warmup": 1000, "d_runs": 1000, "g_runs": 100_000, "g_warmup": 200,
            "g_spread_s": 200.0, "g_margin_s": 3.0, "g_settle_s": 1.0, "kafka_options": ""}


# --- pinning and /proc ------------------------------------------------------------


def pinning() -> dict[str, Any]:
    """Where the worker and the driver run (recorded in every row)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        return {"pinned": False, "why": "no sched_getaffinity on this platform"}
    if shutil.which("taskset") is None:
        return {"pinned": False, "why": "taskset not installed"}
    if not {WORKER_CPU, DRIVER_CPU} <= cpus:
        return {"pinned": False, "why": f"CPUs {WORKER_CPU} and {DRIVER_CPU} not both allowed: {sorted(cpus)}"}
    return {"pinned": True, "worker_cpus": [WORKER_CPU], "driver_cpus": [DRIVER_CPU],
            "worker": f"taskset -c {WORKER_CPU}", "driver": f"sched_setaffinity {{{DRIVER_CPU}}}",
            "broker": "not pinned", "machine_cpus": os.cpu_count()}


@contextlib.contextmanager
def pinned_driver() -> Iterator[dict[str, Any]]:
    """Pin this process's main thread (and the threads it starts from here
    on, which inherit it) to the driver's CPU; restored afterwards."""
    pin = pinning()
    if not pin["pinned"]:
        yield pin
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {DRIVER_CPU})
    try:
        yield pin
    finally:
        os.sched_setaffinity(0, before)


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_kb(pid: int) -> int:
    return _status_kb(pid, "VmRSS")


def peak_rss_kb(pid: int) -> int:
    return _status_kb(pid, "VmHWM")


class WorkerProcess:
    """`stepline worker bench/sl_proc_tasks.py` on `url`, pinned when possible."""

    def __init__(self, url: str, state: Path, concurrency: int, name: str,
                 instance_id: str | None = None) -> None:
        self.url, self.state, self.concurrency = url, state, concurrency
        self.instance_id = instance_id
        self.log_path = state / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.spawned_at = 0.0

    def start(self) -> WorkerProcess:
        pin = ["taskset", "-c", str(WORKER_CPU)] if pinning()["pinned"] else []
        env = dict(os.environ, BENCH_STATE=str(self.state))
        with self.log_path.open("wb") as err:
            self.spawned_at = time.time()
            # taskset execs the command: the pid is the worker's own.
            self.proc = subprocess.Popen(
                [*pin, sys.executable, "-m", "stepline.cli", "worker", str(TASKS_FILE), "--log", self.url,
                 "--concurrency", str(self.concurrency),
                 *(["--instance-id", self.instance_id] if self.instance_id else [])],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=env)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}: {self.tail()}")

    def tail(self, lines: int = 6) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class Tail:
    """The driver's own fold of the runs topic, read incrementally: how the
    driver sees which runs are suspended and which worker claimed what,
    without asking the worker."""

    def __init__(self, client: sl.Client) -> None:
        self.client = client
        self.parts: dict[int, PartitionRuns] = {}
        self.claims: dict[int, str] = {}

    async def poll(self) -> None:
        log, topic = self.client.log, self.client.topics.runs
        for p in range(await log.partitions(topic)):
            part = self.parts.setdefault(p, PartitionRuns(p))
            end = await log.end_offset(topic, p)
            while part.next_offset < end:
                for r in await log.read(topic, p, part.next_offset, 5000):
                    ev = codec.decode(r.value)
                    if isinstance(ev.body, PartitionClaimed):
                        self.claims[p] = ev.body.worker_id
                    part.apply(ev, r.offset)

    def statuses(self, task_id: str) -> Counter[str]:
        return Counter(st.status for part in self.parts.values() for st in part.runs.values()
                       if st.task_id == task_id)

    async def wait_claimed(self, worker: WorkerProcess, exclude: set[str], timeout: float = 90.0) -> float:
        """Until every partition's last claim is by a worker not in `exclude`; seconds waited."""
        t0 = time.monotonic()
        nparts = await self.client.log.partitions(self.client.topics.runs)
        while True:
            await self.poll()
            if len(self.claims) == nparts and not set(self.claims.values()) & exclude:
                return time.monotonic() - t0
            worker.check_alive()
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"the worker claimed {len(self.claims)}/{nparts} partitions in {timeout:.0f} s")
            await asyncio.sleep(0.1)


def calls(state: Path) -> list[tuple[str, str, int, float]]:
    """(step, x, pid, time) per line the task bodies wrote."""
    p = state / "calls.log"
    out = []
    for line in p.read_text().splitlines() if p.exists() else []:
        step, x, pid, t = line.split()
        out.append((step, x, int(pid), float(t)))
    return out


def _broker_cpu(bootstrap: str | None) -> tuple[int | None, float | None]:
    pid = kafka_bench.script_broker_pid(bootstrap) if bootstrap else None
    return pid, (kafka_bench.proc_cpu_s(pid) if pid else None)


async def _trigger_all(client: sl.Client, task: sl.Task[Any, Any], payloads: list[Any],
                       in_flight: int = 256) -> list[sl.RunHandle[Any]]:
    handles: list[sl.RunHandle[Any]] = []
    for start in range(0, len(payloads), in_flight):
        handles += await asyncio.gather(*(task.trigger(x, client=client)
                                          for x in payloads[start:start + in_flight]))
    return handles


async def _watching(worker: WorkerProcess, aw: Any) -> Any:
    """Await `aw`, failing at once (with the worker's last log lines) if the worker exits."""
    fut = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({fut}, timeout=0.25)
            if done:
                return fut.result()
            worker.check_alive()
    finally:
        fut.cancel()


# --- a_split ------------------------------------------------------------------------


async def split_throughput(url: str, n: int, warmup: int, bootstrap: str | None = None,
                           cap: int = SPLIT_IN_FLIGHT) -> dict[str, Any]:
    """(a) with the engine in its own process: closed loop of `cap` virtual
    users in this process, completions counted with handle.result()."""
    sys.setswitchinterval(0.0005)
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="stepline-bench-split-") as d:
        state = Path(d)
        worker = WorkerProcess(url, state, workloads.WORKER_CONCURRENCY, "worker")
        try:
            async with sl.Client(url, registry=sl_proc_tasks.registry) as client:
                worker.start()
                settle_s = await Tail(client).wait_claimed(worker, set())
                task = sl_proc_tasks.noop3
                w = await workloads.drive(client, task, lambda x: x + 3, warmup, cap, base=10**9)
                bpid, b0 = _broker_cpu(bootstrap)
                w0 = kafka_bench.proc_cpu_s(worker.pid)
                rss0 = rss_kb(worker.pid)
                d0, t0 = time.process_time(), time.perf_counter()
                r = await workloads.drive(client, task, lambda x: x + 3, n, cap)
                elapsed, dcpu = time.perf_counter() - t0, time.process_time() - d0
                wcpu = kafka_bench.proc_cpu_s(worker.pid) - w0
                # Every run has ended: what the worker still holds of them.
                await asyncio.sleep(0.3)
                rss1 = rss_kb(worker.pid)
                bcpu = kafka_bench.proc_cpu_s(bpid) - b0 if bpid and b0 is not None else None
                errors += w.errors + r.errors
                if r.completed != n or w.completed != warmup:
                    errors.append(f"completed {r.completed}/{n} (warm-up {w.completed}/{warmup})")
                worker.check_alive()
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}; worker: {worker.tail()}")
            raise RuntimeError("; ".join(errors)) from exc
        finally:
            worker.stop()
        # The physical limit, measured on the same disk in the same minute.
        found = physical.group_commit_probe(d, min(n, 3000))
        errors += found["errors"]
        probe = found["metrics"]
    done = max(r.completed, 1)
    cpu_per_1000 = 1000 * (wcpu + dcpu + (bcpu or 0.0)) / done
    return {"ok": not errors, "errors": errors, "metrics": {
        "runs": n, "completed": r.completed, "in_flight": cap, "settle_s": settle_s,
        "elapsed_s": elapsed, "runs_per_s": r.completed / elapsed,
        "cpu_s_per_1000_runs_worker": 1000 * wcpu / done,
        "cpu_s_per_1000_runs_driver": 1000 * dcpu / done,
        "cpu_s_per_1000_runs_broker": 1000 * bcpu / done if bcpu is not None else None,
        "cpu_s_per_1000_runs": cpu_per_1000,
        # µs per run is ms per 1,000 runs: / 1000 for s per 1,000.
        "limit_cpu_s_per_1000_runs": probe["cpu_us_per_run"] / 1000,
        "vs_limit": cpu_per_1000 / (probe["cpu_us_per_run"] / 1000),
        "aim_cpu_s_per_1000_runs": 0.2, "aim_runs_per_s": 5000,
        "limit": "group-commit probe (bench/physical.py): encode + durable commit of the same records, "
                 "no engine",
        "worker_cpu_s": wcpu, "driver_cpu_s": dcpu, "broker_cpu_s": bcpu,
        "broker_pid_known": bpid is not None,
        "worker_rss_before_kb": rss0, "worker_rss_after_kb": rss1,
        # Growth of the worker's RSS over the measured runs, all ended, after
        # a warm-up of `warmup` runs: what an ended run leaves in the worker.
        "worker_rss_bytes_per_ended_run": (rss1 - rss0) * 1024 / done,
        "completion_signal": "handle.result() in the driver process",
    }}


# --- d_recovery ---------------------------------------------------------------------


async def recovery(url: str, n: int, bootstrap: str | None = None, result_timeout: float = 120.0) -> dict[str, Any]:
    sys.setswitchinterval(0.0005)
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="stepline-bench-recovery-") as d:
        state = Path(d)
        (state / "block").touch()
        # Every run must be inside step two at once: the slots must not limit it.
        concurrency = max(n + 24, workloads.WORKER_CONCURRENCY)
        # One worker process slot, restarted: the same instance id (Kafka
        # static membership; sqlite ignores it), as a supervisor restarts it.
        slot = f"bench-recovery-{os.getpid()}-{time.time_ns()}"
        first = WorkerProcess(url, state, concurrency, "worker-1", instance_id=slot)
        second = WorkerProcess(url, state, concurrency, "worker-2", instance_id=slot)
        try:
            async with sl.Client(url, registry=sl_proc_tasks.registry) as client:
                first.start()
                tail = Tail(client)
                await tail.wait_claimed(first, set())
                old_owners = set(tail.claims.values())
                handles = await _trigger_all(client, sl_proc_tasks.crash3, list(range(n)))
                t0 = time.monotonic()
                while sum(1 for c in calls(state) if c[0] == "two") < n:
                    first.check_alive()
                    if time.monotonic() - t0 > result_timeout:
                        got = sum(1 for c in calls(state) if c[0] == "two")
                        raise TimeoutError(f"{got}/{n} runs inside step two after {result_timeout:.0f} s")
                    await asyncio.sleep(0.05)
                records = sum([await client.log.end_offset(client.topics.runs, p)
                               for p in range(await client.log.partitions(client.topics.runs))])
                first.kill9()
                (state / "block").unlink()
                bpid, b0 = _broker_cpu(bootstrap)
                d0 = time.process_time()
                second.start()
                spawned = second.spawned_at
                done_at: list[float] = []

                async def result(h: sl.RunHandle[int]) -> int:
                    out: int = await h.result(timeout=result_timeout)
                    done_at.append(time.time())
                    return out

                outs = await _watching(second, asyncio.gather(*(result(h) for h in handles),
                                                              return_exceptions=True))
                dcpu = time.process_time() - d0
                wcpu = kafka_bench.proc_cpu_s(second.pid)
                bcpu = kafka_bench.proc_cpu_s(bpid) - b0 if bpid and b0 is not None else None
                await tail.poll()
                new_owners = set(tail.claims.values()) - old_owners
        except Exception as exc:
            raise RuntimeError(f"{type(exc).__name__}: {exc}; worker 1: {first.tail(3)}; "
                               f"worker 2: {second.tail(3)}") from exc
        finally:
            first.stop()
            second.stop()
        lines = calls(state)
        tails = f"worker 1 log: {first.tail(4)}; worker 2 log: {second.tail(4)}"
    lost = [x for x, out in enumerate(outs) if isinstance(out, BaseException)]
    wrong = [x for x, out in enumerate(outs) if not isinstance(out, BaseException) and out != x + 3]
    for x in lost[:3]:
        errors.append(f"run {x} lost: {type(outs[x]).__name__}: {outs[x]}")
    for x in wrong[:3]:
        errors.append(f"run {x}: output {outs[x]!r}, expected {x + 3}")
    per_run: dict[str, Counter[str]] = {}
    for step, x, _, _ in lines:
        if step != "loaded":
            per_run.setdefault(x, Counter())[step] += 1
    # Completed before the kill: step one of every run. Completed after: two
    # and three. Each may run once more than it completed only while in flight.
    allowed = {"one": 1, "two": 2, "three": 1}
    reexecuted = sum(max(0, c[s] - k) for c in per_run.values() for s, k in allowed.items())
    if reexecuted:
        errors.append(f"{reexecuted} completed step(s) executed again")
    pid2 = second.pid
    loaded = [t for s, _, pid, t in lines if s == "loaded" and pid == pid2]
    resumed = sorted(t for s, _, pid, t in lines if s == "two" and pid == pid2)
    if len(resumed) != n:
        errors.append(f"{len(resumed)} of {n} runs re-entered step two after the restart")
    if errors:
        errors.append(tails)
    t_loaded = loaded[0] if loaded else float("nan")
    t_done = max(done_at) if done_at else float("nan")
    first_r = resumed[0] if resumed else float("nan")
    last_r = resumed[-1] if resumed else float("nan")
    return {"ok": not errors, "errors": errors, "metrics": {
        "runs": n, "completed": n - len(lost) - len(wrong), "runs_lost": len(lost),
        "wrong_outputs": len(wrong), "reexecuted_completed_steps": reexecuted,
        "step_executions": dict(sum(per_run.values(), Counter())),
        "records_in_runs_topic_at_kill": records, "worker_concurrency": concurrency,
        "restart_to_app_loaded_s": t_loaded - spawned,
        "restart_to_first_resumed_s": first_r - spawned,
        "restart_to_all_resumed_s": last_r - spawned,
        "restart_to_all_done_s": t_done - spawned,
        "loaded_to_first_resumed_s": first_r - t_loaded,
        "loaded_to_all_resumed_s": last_r - t_loaded,
        "loaded_to_all_done_s": t_done - t_loaded,
        "claimed_by_new_worker": len(new_owners) == 1,
        "worker_cpu_s": wcpu, "driver_cpu_s": dcpu, "broker_cpu_s": bcpu,
        "aim_all_resumed_s": 1.0, "static_membership": True,
        **physical.interpreter_start(),
    }}


# --- g_sleeping --------------------------------------------------------------------


async def sleeping(url: str, n: int, warmup: int, spread_s: float, bootstrap: str | None = None,
                   margin_s: float = 3.0, settle_s: float = 1.0) -> dict[str, Any]:
    sys.setswitchinterval(0.0005)
    errors: list[str] = []
    task = sl_proc_tasks.sleeper
    with tempfile.TemporaryDirectory(prefix="stepline-bench-sleep-") as d:
        state = Path(d)
        worker = WorkerProcess(url, state, workloads.WORKER_CONCURRENCY, "worker")
        try:
            async with sl.Client(url, registry=sl_proc_tasks.registry) as client:
                worker.start()
                tail = Tail(client)
                await tail.wait_claimed(worker, set())
                # Warm-up: the same path once at small scale (code, caches, pools).
                soon = int(time.time() * 1000) + 300
                warm = await _trigger_all(client, task, [{"i": -1 - i, "wake_at_ms": soon} for i in range(warmup)])
                await asyncio.gather(*(h.result(timeout=120) for h in warm))
                await asyncio.sleep(settle_s)
                rss0 = rss_kb(worker.pid)
                # Wake times: after all N are surely asleep, spread evenly.
                margin_ms = int(1000 * g_margin_s(n, margin_s))
                t_wake0 = int(time.time() * 1000) + margin_ms
                wake = [t_wake0 + int(i * spread_s * 1000 / n) for i in range(n)]
                t_trig = time.perf_counter()
                handles = await _trigger_all(client, task, [{"i": i, "wake_at_ms": wake[i]} for i in range(n)])
                trigger_s = time.perf_counter() - t_trig
                while True:
                    await tail.poll()
                    asleep = tail.statuses(task.id)[SUSPENDED]
                    if asleep >= n:
                        break
                    worker.check_alive()
                    if time.time() * 1000 > t_wake0 - 100:
                        raise RuntimeError(f"only {asleep}/{n} runs asleep before the first wake time "
                                           f"({margin_ms} ms after the first trigger)")
                    await asyncio.sleep(0.1)
                all_asleep_s = time.perf_counter() - t_trig
                await asyncio.sleep(0.3)
                rss1 = rss_kb(worker.pid)
                w0 = kafka_bench.proc_cpu_s(worker.pid)
                outs = await _watching(worker, asyncio.gather(
                    *(h.result(timeout=spread_s + margin_ms / 1000 + 120) for h in handles),
                    return_exceptions=True))
                wake_cpu = kafka_bench.proc_cpu_s(worker.pid) - w0
                await asyncio.sleep(0.3)
                rss2 = rss_kb(worker.pid)
                peak = peak_rss_kb(worker.pid)
                worker.check_alive()
        except Exception as exc:
            raise RuntimeError(f"{type(exc).__name__}: {exc}; worker: {worker.tail(3)}") from exc
        finally:
            worker.stop()
    lateness: list[float] = []
    lost = 0
    for i, out in enumerate(outs):
        if isinstance(out, BaseException) or not isinstance(out, dict) or out.get("i") != i:
            lost += 1
            if len(errors) < 5:
                errors.append(f"run {i}: {out!r}")
            continue
        lateness.append(float(out["started_ms"]) - wake[i])
    pct = workloads._pct
    return {"ok": not errors, "errors": errors, "metrics": {
        "runs": n, "completed": n - lost, "runs_lost": lost, "warmup_runs": warmup,
        "rss_before_kb": rss0, "rss_asleep_kb": rss1, "rss_after_wake_kb": rss2, "peak_rss_kb": peak,
        "bytes_per_sleeping_run": (rss1 - rss0) * 1024 / n,
        "bytes_per_completed_run_retained": (rss2 - rss0) * 1024 / n,
        "trigger_s": trigger_s, "all_asleep_s": all_asleep_s,
        "wake_spread_s": spread_s, "wakes_per_s": n / spread_s if spread_s else None,
        "lateness_p50_ms": pct(lateness, 0.5), "lateness_p99_ms": pct(lateness, 0.99),
        "lateness_max_ms": max(lateness) if lateness else float("nan"),
        "lateness_min_ms": min(lateness) if lateness else float("nan"),
        "worker_cpu_s_waking": wake_cpu,
        "aim_bytes_per_run": 1024, "aim_lateness_p99_ms": 50,
        "lateness": "step body start (time.time()) - the payload's wake_at_ms; the engine's recorded "
                    "wake time is at most ~1 ms later",
    }}


def g_margin_s(n: int, margin_s: float) -> float:
    """Seconds from the first trigger to the first wake: all N must be asleep by then
    (100,000 were in 41 s on sqlite on a loaded 2-core machine: 800/s leaves room)."""
    return max(margin_s, n / 800)


def g_wait_s(sz: dict[str, Any]) -> float:
    return g_margin_s(sz["g_runs"], sz["g_margin_s"]) + sz["g_spread_s"]


# --- one repetition ---------------------------------------------------------------

RunAsync = Callable[[Callable[[], Any], float], dict[str, Any]]


def one_rep(rec: Any, rep: int, sz: dict[str, Any], tmp_root: str | None, timeout: float,
            run_async: RunAsync, bootstrap: str | None, only: set[str] | None = None, sqlite: bool = True) -> None:
    def measure(system: str, workload: str, params: dict[str, Any], make: Callable[[str], Any]) -> None:
        if only is not None and workload not in only:
            return
        # g_sleeping's runs wait out their margin and spread (~8 minutes at
        # 100,000): the timeout is on top of that.
        limit = timeout + (g_wait_s(sz) if workload == "g_sleeping" else 0.0)
        with tempfile.TemporaryDirectory(prefix="stepline-bench-", dir=tmp_root) as d, pinned_driver() as pin:
            ns = kafka_bench.fresh_namespace("bench-p") if system == KAFKA else ""
            url = (kafka_bench.log_url(bootstrap, ns) + sz["kafka_options"] if system == KAFKA and bootstrap
                   else workloads.log_url(d, "full"))
            t0 = time.perf_counter()
            try:
                result = run_async(lambda: make(url), limit)
            finally:
                if ns and bootstrap:
                    asyncio.run(kafka_bench.delete_namespace(bootstrap, ns))
            result.setdefault("metrics", {})["pinning"] = pin
            result["metrics"]["log_url_options"] = url.partition("?")[2]
            rec.add(system, workload, params, rep, result, time.perf_counter() - t0)

    systems = ([SQLITE] if sqlite else []) + ([KAFKA] if bootstrap else [])
    for system in systems:
        b = bootstrap if system == KAFKA else None
        measure(system, "a_split", {"in_flight": SPLIT_IN_FLIGHT, "steps": 3, "processes": "worker+driver"},
                lambda u, b=b: split_throughput(u, sz["split_runs"], sz["split_warmup"], b))
        measure(system, "d_recovery", {"runs": sz["d_runs"], "blocked_in": "step 2", "signal": "SIGKILL"},
                lambda u, b=b: recovery(u, sz["d_runs"], b))
        measure(system, "g_sleeping", {"runs": sz["g_runs"], "wake_spread_s": sz["g_spread_s"]},
                lambda u, b=b: sleeping(u, sz["g_runs"], sz["g_warmup"], sz["g_spread_s"], b,
                                        sz["g_margin_s"], sz["g_settle_s"]))


HEADLINES: dict[str, list[tuple[str, str, str]]] = {
    "a_split": [("runs_per_s", "runs/s", "{:,.0f}"),
                ("cpu_s_per_1000_runs", "CPU s/1k runs, all processes", "{:.2f}"),
                ("cpu_s_per_1000_runs_worker", "  worker process", "{:.2f}"),
                ("cpu_s_per_1000_runs_driver", "  driver process", "{:.2f}"),
                ("cpu_s_per_1000_runs_broker", "  Kafka broker", "{:.2f}"),
                ("limit_cpu_s_per_1000_runs", "  limit: group-commit probe, same run", "{:.2f}"),
                ("vs_limit", "  all processes ÷ limit", "{:.1f}x"),
                ("worker_rss_bytes_per_ended_run", "worker RSS bytes per ended run", "{:,.0f}")],
    "d_recovery": [("restart_to_first_resumed_s", "s restart -> first step resumed", "{:.2f}"),
                   ("restart_to_all_resumed_s", "s restart -> all resumed (aim ≤ 1)", "{:.2f}"),
                   ("restart_to_all_done_s", "s restart -> all done", "{:.2f}"),
                   ("restart_to_app_loaded_s", "s restart -> process imported the app", "{:.2f}"),
                   ("cli_import_s", "  limit: python + import stepline.cli, same run", "{:.2f}"),
                   ("loaded_to_all_resumed_s", "s app loaded -> all resumed", "{:.2f}"),
                   ("reexecuted_completed_steps", "completed steps re-executed (must be 0)", "{:.0f}"),
                   ("runs_lost", "runs lost (must be 0)", "{:.0f}")],
    "g_sleeping": [("bytes_per_sleeping_run", "RSS bytes per sleeping run (aim < 1,024)", "{:,.0f}"),
                   ("lateness_p50_ms", "timer lateness p50 ms", "{:.1f}"),
                   ("lateness_p99_ms", "timer lateness p99 ms (aim < 50)", "{:.1f}"),
                   ("lateness_max_ms", "timer lateness max ms", "{:.1f}"),
                   ("wakes_per_s", "wakes/s (spread)", "{:,.0f}"),
                   ("bytes_per_completed_run_retained", "RSS bytes per ended run, all woken and completed (aim 0)",
                    "{:,.0f}")],
}
