"""Stepline soak test: runs in flight for minutes while workers are SIGKILLed.

    python bench/soak.py [--duration 300] [--concurrency 200] [--log sqlite|kafka]
                         [--kill-every 20] [--fail-rate 0.05] [--seed N]

Not part of `make test`: it takes minutes and judges a machine, not a commit.

1. Starts `stepline worker bench/soak_app.py --log URL` (sqlite: a file in a
   temp dir; kafka: a fresh namespace on KAFKA_BOOTSTRAP_SERVERS or the broker
   tests/kafka_broker.py finds or starts, served by two workers).
2. A Client in this process keeps `--concurrency` runs of the three-step task
   `soak` in flight for `--duration` seconds: a slot triggers a run, awaits
   its result, triggers the next. Steps fail at `--fail-rate` (four attempts,
   so a few runs dead-letter); `--sleep-rate` of the runs sleep durably.
3. Every `--kill-every` seconds (+-25%) one worker gets SIGKILL and a
   replacement starts. Each worker's peak RSS (VmHWM) is read every second and
   just before it is killed.
4. Then triggering stops, every slot waits (at most `--drain` s) for its run
   to end, the workers get SIGTERM, and the whole runs topic is read once.

Judged from the log and the executions file soak_app.py writes:

* lost: a triggered run whose RunTriggered is not on the log, or that is not
  completed, failed, cancelled or expired after the drain. Must be 0.
* duplicated after checkpoint: an execution of (run, step) that began (its
  line's time) after the first StepCompleted of that step on the log, i.e.
  a completed step that ran again. Must be 0. Executions before the
  checkpoint are expected (a retry, or a step cut short by a kill) and are
  counted apart, split by whether the attempt number changed (a retry) or
  not (a crash does not count as an attempt).

Prints the figures and appends them as one JSON line to
OUT/soak-<UTC timestamp>.jsonl (default bench/results/). Exit code 1 when
anything was lost or duplicated after its checkpoint, 2 when the soak could
not run. On failure the temp dir (log, executions file, worker logs) or the
Kafka namespace is kept for inspection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APP = HERE / "soak_app.py"
sys.path.insert(0, str(HERE))

import kafka_bench  # noqa: E402

import stepline as sl  # noqa: E402
from stepline.core.events import StepCompleted  # noqa: E402
from stepline.projections.runs import TERMINAL, PartitionRuns, RunState  # noqa: E402

KAFKA_WORKERS = 2


# --- worker processes ------------------------------------------------------


def vm_kib(pid: int, field_name: str) -> int:
    """A `Vm*` line of /proc/PID/status in KiB; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class WorkerRecord:
    pid: int
    started: float
    proc: subprocess.Popen[bytes] = field(repr=False)
    ended: float | None = None
    end: str = "running"  # killed | stopped | died (exit code)
    peak_kib: int = 0

    def sample(self) -> None:
        self.peak_kib = max(self.peak_kib, vm_kib(self.pid, "VmHWM"))


class Workers:
    """The `stepline worker` processes: started, sampled, killed, replaced."""

    def __init__(self, url: str, env: dict[str, str], logdir: Path, concurrency: int) -> None:
        self.url, self.env, self.logdir, self.concurrency = url, env, logdir, concurrency
        self.records: list[WorkerRecord] = []
        self.kills = 0
        self.unexpected_exits: list[str] = []

    def live(self) -> list[WorkerRecord]:
        return [w for w in self.records if w.end == "running"]

    def start(self) -> WorkerRecord:
        n = len(self.records)
        with (self.logdir / f"worker-{n}.log").open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "stepline.cli", "worker", str(APP), "--log", self.url,
                 "--concurrency", str(self.concurrency)],
                env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        rec = WorkerRecord(proc.pid, time.time(), proc)
        self.records.append(rec)
        return rec

    def kill_and_replace(self, rng: random.Random) -> None:
        live = self.live()
        if not live:
            return
        victim = rng.choice(live)
        victim.sample()  # the peak up to the kill
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(30)
        victim.ended, victim.end = time.time(), "killed"
        self.kills += 1
        self.start()

    def sample(self) -> None:
        """Every second: peaks, and a replacement for any worker that died by itself."""
        for w in self.live():
            w.sample()
            code = w.proc.poll()
            if code is not None:
                w.ended, w.end = time.time(), f"died ({code})"
                tail = (self.logdir / f"worker-{self.records.index(w)}.log").read_text(errors="replace")
                self.unexpected_exits.append(f"pid {w.pid} exited {code}: {tail.strip()[-500:]}")
                self.start()

    def stop_all(self, timeout: float = 30.0) -> None:
        for w in self.live():
            w.sample()
            w.proc.send_signal(signal.SIGTERM)
        for w in self.live():
            try:
                code = w.proc.wait(timeout)
                w.end = "stopped" if code in (0, -signal.SIGTERM) else f"stopped ({code})"
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(10)
                w.end = "stopped (SIGKILL after SIGTERM timed out)"
            w.ended = time.time()

    def claim_delays(self, first_workers: int) -> list[tuple[float, float]]:
        """Per replacement: seconds from its start to its first partition claim, and
        to the last claim of that burst (within 5 s), from its JSON log lines."""
        out = []
        for n, w in enumerate(self.records[first_workers:], first_workers):
            times = []
            for line in (self.logdir / f"worker-{n}.log").read_text(errors="replace").splitlines():
                if '"partition claimed"' in line:
                    ts = json.loads(line)["timestamp"]
                    times.append(dt.datetime.fromisoformat(ts).timestamp() - w.started)
            if times:
                out.append((round(times[0], 2), round(max(t for t in times if t <= times[0] + 5), 2)))
        return out

    def peaks_mib(self) -> list[float]:
        return [round(w.peak_kib / 1024, 1) for w in self.records]


# --- the load --------------------------------------------------------------


@dataclass
class Driver:
    """Closed loop: each of `concurrency` slots triggers a run and awaits it."""

    client: sl.Client
    rng: random.Random
    sleep_rate: float
    triggered: dict[str, int] = field(default_factory=dict)  # run id -> i
    outcomes: Counter[str] = field(default_factory=Counter)
    wrong_outputs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    stopping: bool = False
    next_i: int = 0

    async def slot(self) -> None:
        while not self.stopping:
            i, self.next_i = self.next_i, self.next_i + 1
            payload = {"i": i, "sleep": self.rng.random() < self.sleep_rate}
            try:
                handle = await self.client.trigger("soak", payload)
            except Exception as exc:  # noqa: BLE001 - counted and reported, the soak goes on
                self.outcomes["trigger_error"] += 1
                self._error(f"trigger {i}: {type(exc).__name__}: {exc}")
                await asyncio.sleep(0.1)
                continue
            self.triggered[handle.run_id] = i
            t0 = time.perf_counter()
            try:
                out = await handle.result()
                self.outcomes["completed"] += 1
                if out != {"i": i, "out": i + 3}:
                    self.wrong_outputs.append(handle.run_id)
            except sl.RunFailedError:
                self.outcomes["failed"] += 1
            except Exception as exc:  # noqa: BLE001 - the final log scan decides the run's fate
                self.outcomes["wait_error"] += 1
                self._error(f"result of {handle.run_id}: {type(exc).__name__}: {exc}")
            self.latencies.append(time.perf_counter() - t0)

    def _error(self, message: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(message)

    def ended(self) -> int:
        return sum(v for k, v in self.outcomes.items() if k != "trigger_error")


async def every_second(workers: Workers, driver: Driver, t0: float, stop: asyncio.Event) -> None:
    last_print = 0.0
    while not stop.is_set():
        workers.sample()
        elapsed = time.monotonic() - t0
        if elapsed - last_print >= 10:
            last_print = elapsed
            peak = max((w.peak_kib for w in workers.records), default=0) / 1024
            print(f"  {elapsed:6.0f}s triggered {len(driver.triggered):,} ended {driver.ended():,} "
                  f"kills {workers.kills} peak RSS {peak:.0f} MiB", file=sys.stderr, flush=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def killer(workers: Workers, every: float, rng: random.Random, stop: asyncio.Event) -> None:
    if every <= 0:
        return
    while True:
        try:
            await asyncio.wait_for(stop.wait(), every * rng.uniform(0.75, 1.25))
            return
        except TimeoutError:
            workers.kill_and_replace(rng)


# --- judging ---------------------------------------------------------------


@dataclass
class LogScan:
    runs: dict[str, RunState]
    # (run, step) -> time of the StepCompleted the fold accepted: its checkpoint.
    checkpoints: dict[tuple[str, int], int]
    # (run, step) -> time of its first StepCompleted in log order. The same as
    # the accepted one unless that record was fenced (an old owner's epoch).
    first_in_log: dict[tuple[str, int], int]
    extra_checkpoints: int  # StepCompleted records after the first, per (run, step)
    fenced: int  # events any partition's fold dropped as from an older epoch
    events: int


async def scan_log(client: sl.Client) -> LogScan:
    """Read the runs topic once: the folded runs and every step's StepCompleted."""
    parts: dict[int, PartitionRuns] = {}
    first: dict[tuple[str, int], int] = {}
    extra = events = 0
    async for p, offset, ev in client.events():
        events += 1
        part = parts.get(p)
        if part is None:
            part = parts[p] = PartitionRuns(p)
        part.apply(ev, offset)
        if isinstance(ev.body, StepCompleted):
            key = (ev.run_id, ev.body.step)
            if key in first:
                extra += 1
            else:
                first[key] = ev.time
    runs = {rid: st for part in parts.values() for rid, st in part.runs.items()}
    accepted = {(rid, pos): s.ended_at for rid, st in runs.items() for pos, s in st.steps.items()
                if s.status == "completed" and s.ended_at is not None and (rid, pos) in first}
    return LogScan(runs, accepted, first, extra, sum(p.fenced for p in parts.values()), events)


@dataclass(frozen=True)
class Execution:
    time: int
    attempt: int
    pid: int


def read_executions(path: Path) -> dict[tuple[str, int], list[Execution]]:
    by_step: dict[tuple[str, int], list[Execution]] = defaultdict(list)
    if path.exists():
        for line in path.read_text().splitlines():
            run_id, step, attempt, t, pid = line.split()
            by_step[(run_id, int(step))].append(Execution(int(t), int(attempt), int(pid)))
    return by_step


def judge_executions(by_step: dict[tuple[str, int], list[Execution]],
                     scan: LogScan, kill_pids: set[int]) -> dict[str, Any]:
    dup_after: list[dict[str, Any]] = []
    retried = after_crash = uncheckpointed = 0
    for key, execs in by_step.items():
        cp = scan.checkpoints.get(key)
        if cp is None:
            uncheckpointed += len(execs)  # a dead-lettered run's failing step, mostly
            continue
        execs = sorted(execs, key=lambda e: e.time)
        before = [e for e in execs if e.time <= cp]
        for prev, e in zip(before, before[1:], strict=False):
            if e.attempt == prev.attempt:
                after_crash += 1
            else:
                retried += 1
        for e in execs:
            if e.time > cp:
                dup_after.append({"run_id": key[0], "step": key[1], "exec_time": e.time,
                                  "checkpoint_time": cp, "attempt": e.attempt, "pid": e.pid,
                                  "pid_was_killed": e.pid in kill_pids})
    missing = [k for k in scan.checkpoints if k not in by_step]
    not_accepted = [k for k, t in scan.first_in_log.items() if scan.checkpoints.get(k) != t]
    return {
        "step_executions": sum(len(v) for v in by_step.values()),
        "duplicated_after_checkpoint": len(dup_after),
        "duplicated_after_checkpoint_samples": dup_after[:20],
        "reexecutions_before_checkpoint": retried + after_crash,
        "reexecutions_retry": retried,
        "reexecutions_same_attempt": after_crash,
        "executions_never_checkpointed": uncheckpointed,
        "checkpoints_without_execution_line": len(missing),
        "extra_step_completed_records": scan.extra_checkpoints,
        "first_step_completed_not_accepted": len(not_accepted),
        "fenced_events": scan.fenced,
    }


def judge_runs(triggered: dict[str, int], scan: LogScan) -> dict[str, Any]:
    statuses: Counter[str] = Counter()
    missing: list[str] = []
    live: list[str] = []
    for rid in triggered:
        st = scan.runs.get(rid)
        if st is None:
            missing.append(rid)
            continue
        statuses[st.status] += 1
        if st.status not in TERMINAL:
            live.append(rid)
    return {
        "runs_triggered": len(triggered),
        "completed": statuses["completed"],
        "dead_lettered": sum(1 for rid in triggered if (s := scan.runs.get(rid)) and s.dead_lettered),
        "failed": statuses["failed"],
        "cancelled_or_expired": statuses["cancelled"] + statuses["expired"],
        "still_live_after_drain": len(live),
        "lost_trigger_not_on_log": len(missing),
        "lost": len(missing) + len(live),
        "lost_samples": (missing + [f"{r} ({scan.runs[r].status})" for r in live])[:20],
        "runs_on_log_not_triggered_here": len(set(scan.runs) - set(triggered)),
    }


# --- one soak --------------------------------------------------------------


@dataclass
class Backend:
    url: str
    workers: int
    tmp: Path
    bootstrap: str | None = None
    namespace: str | None = None


def make_backend(kind: str, tmp: Path) -> Backend:
    if kind == "sqlite":
        return Backend(f"sqlite:///{tmp}/soak.db", 1, tmp)
    bootstrap = kafka_bench.get_broker()
    ns = kafka_bench.fresh_namespace("soak")
    return Backend(kafka_bench.log_url(bootstrap, ns), KAFKA_WORKERS, tmp, bootstrap, ns)


@dataclass
class Window:
    seconds: float
    ended: int  # runs ended within the window
    drain_s: float
    still_waiting: int  # slots still awaiting a result when the drain timed out
    wall_start: float


async def load(args: argparse.Namespace, workers: Workers, driver: Driver, rng: random.Random) -> Window:
    """Triggering for `duration` s with kills, then the drain."""
    window_over, done = asyncio.Event(), asyncio.Event()
    t0, wall_start = time.monotonic(), time.time()
    sampler = asyncio.create_task(every_second(workers, driver, t0, done))
    kills = asyncio.create_task(killer(workers, args.kill_every, rng, window_over))
    slots = [asyncio.create_task(driver.slot()) for _ in range(args.concurrency)]
    try:
        await asyncio.sleep(args.duration)
        driver.stopping = True
        window_over.set()  # no kills during the drain
        window = Window(time.monotonic() - t0, driver.ended(), 0.0, 0, wall_start)
        print(f"  window over: draining (at most {args.drain:.0f} s)", file=sys.stderr, flush=True)
        _, pending = await asyncio.wait(slots, timeout=args.drain)
        window.drain_s = time.monotonic() - t0 - window.seconds
        window.still_waiting = len(pending)
        return window
    finally:
        window_over.set()
        done.set()
        for task in slots:
            task.cancel()
        await asyncio.gather(sampler, kills, *slots, return_exceptions=True)


async def soak(args: argparse.Namespace, backend: Backend) -> dict[str, Any]:
    rng = random.Random(args.seed)
    executions = backend.tmp / "executions.txt"
    env = dict(os.environ, SOAK_EXECUTIONS=str(executions), SOAK_FAIL_RATE=str(args.fail_rate))
    sys.setswitchinterval(0.0005)  # as the worker processes set it
    async with sl.Client(backend.url) as client:  # makes the topics before any worker starts
        workers = Workers(backend.url, env, backend.tmp, args.worker_concurrency)
        driver = Driver(client, rng, args.sleep_rate)
        try:
            for _ in range(backend.workers):
                workers.start()
            window = await load(args, workers, driver, rng)
        finally:
            workers.stop_all()
        print("  reading the runs topic and the executions file", file=sys.stderr, flush=True)
        t_scan = time.monotonic()
        scan = await scan_log(client)
        scan_s = time.monotonic() - t_scan
    kill_pids = {w.pid for w in workers.records if w.end == "killed"}
    claims = workers.claim_delays(backend.workers)
    return {
        "duration_s": round(window.seconds, 1), "drain_s": round(window.drain_s, 1),
        "slots_still_waiting_at_drain_timeout": window.still_waiting,
        **judge_runs(driver.triggered, scan),
        **judge_executions(read_executions(executions), scan, kill_pids),
        "worker_kills": workers.kills, "workers_started": len(workers.records),
        "kill_times_s": sorted(round(w.ended - window.wall_start, 1) for w in workers.records
                               if w.end == "killed" and w.ended is not None),
        "replacement_first_claim_s": [c[0] for c in claims],
        "replacement_last_claim_s": [c[1] for c in claims],
        "unexpected_worker_exits": workers.unexpected_exits,
        "worker_peak_rss_mib": max(workers.peaks_mib(), default=0.0),
        "worker_peak_rss_mib_each": workers.peaks_mib(),
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "runs_per_s": round(window.ended / window.seconds, 1),
        "driver_outcomes": dict(driver.outcomes), "wrong_outputs": len(driver.wrong_outputs),
        "driver_errors": driver.errors,
        "latency_s_p50": _pct(driver.latencies, 50), "latency_s_p99": _pct(driver.latencies, 99),
        "latency_s_max": round(max(driver.latencies, default=0.0), 3),
        "events_on_log": scan.events, "final_scan_s": round(scan_s, 1),
    }


def _pct(values: list[float], q: int) -> float:
    if len(values) < 2:
        return round(values[0], 3) if values else 0.0
    return round(statistics.quantiles(values, n=100)[q - 1], 3)


# --- the command -----------------------------------------------------------

# (metric, label) in the printed summary, in this order.
SUMMARY = [
    ("duration_s", "duration s (triggering window)"), ("drain_s", "drain s"),
    ("runs_triggered", "runs triggered"), ("completed", "completed"),
    ("dead_lettered", "dead-lettered (failed)"), ("still_live_after_drain", "still live after drain"),
    ("lost", "LOST"), ("duplicated_after_checkpoint", "DUPLICATED STEP EXECUTIONS AFTER CHECKPOINT"),
    ("reexecutions_before_checkpoint", "re-executions before checkpoint"),
    ("reexecutions_retry", "  of which retries (attempt changed)"),
    ("reexecutions_same_attempt", "  of which same attempt (cut short: kill, rebalance)"),
    ("executions_never_checkpointed", "executions of steps never checkpointed"),
    ("step_executions", "step executions in all"), ("worker_kills", "worker kills"),
    ("kill_times_s", "kills at s"),
    ("replacement_last_claim_s", "replacement start -> partitions claimed, s"),
    ("worker_peak_rss_mib", "peak RSS of a worker, MiB"),
    ("worker_peak_rss_mib_each", "  each worker in start order"), ("driver_peak_rss_mib", "peak RSS of the driver, MiB"),
    ("runs_per_s", "runs/s (ended in window / window)"),
    ("latency_s_p50", "trigger -> end p50 s"), ("latency_s_p99", "trigger -> end p99 s"),
    ("latency_s_max", "trigger -> end max s"),
    ("events_on_log", "events on the runs topic"), ("final_scan_s", "final scan s"),
]


def print_summary(row: dict[str, Any], path: Path) -> None:
    m = row["metrics"]
    print(f"\nStepline soak, {row['params']['log']}, {row['ts']}, git {row['env']['git']}, load average "
          f"{row['env']['load_avg_at_start'][0]:.1f} at start -> {path}")
    for key, label in SUMMARY:
        print(f"  {label:46} {m[key]:,}" if isinstance(m[key], int) else f"  {label:46} {m[key]}")
    for key in ("lost_samples", "duplicated_after_checkpoint_samples", "unexpected_worker_exits",
                "driver_errors"):
        if m.get(key):
            print(f"  {key}:")
            for item in m[key]:
                print(f"    {item}")
    others = ("wrong_outputs", "checkpoints_without_execution_line", "runs_on_log_not_triggered_here",
              "slots_still_waiting_at_drain_timeout", "extra_step_completed_records",
              "first_step_completed_not_accepted", "fenced_events")
    print("  other counters (the first four should be 0; the last three are 0 unless a fenced\n"
          "  old owner wrote after a new owner's claim): " + ", ".join(f"{k} {m[k]}" for k in others))
    print("  verdict: " + ("ok" if row["ok"] else "FAILED: " + "; ".join(row["errors"])))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of triggering (default 300)")
    ap.add_argument("--concurrency", type=int, default=200, help="runs kept in flight (default 200)")
    ap.add_argument("--log", choices=("sqlite", "kafka"), default="sqlite")
    ap.add_argument("--kill-every", type=float, default=20.0,
                    help="SIGKILL a worker about every N s, +-25%% (0: never; default 20)")
    ap.add_argument("--fail-rate", type=float, default=0.05, help="failure probability per step execution")
    ap.add_argument("--sleep-rate", type=float, default=0.1, help="share of runs with a durable 0.1 s sleep")
    ap.add_argument("--seed", type=int, default=None, help="seeds the payloads and the kill times")
    ap.add_argument("--drain", type=float, default=120.0, help="at most this long for in-flight runs to end")
    ap.add_argument("--worker-concurrency", type=int, default=256, help="each worker's --concurrency")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the .jsonl (default bench/results)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir / Kafka namespace even when ok")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**32)
    return args


def verdict(m: dict[str, Any]) -> list[str]:
    errors = []
    if m["lost"]:
        errors.append(f"{m['lost']} run(s) lost")
    if m["duplicated_after_checkpoint"]:
        errors.append(f"{m['duplicated_after_checkpoint']} step execution(s) after their checkpoint")
    return errors


def git_describe() -> str:
    """HEAD, plus "+dirty" when the engine's sources differ from it."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "engine", "projections",
                                "consumers", "schemas"], capture_output=True, text=True, timeout=5).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = dt.datetime.now(dt.UTC)
    path = Path(args.out) / f"soak-{stamp.strftime('%Y%m%dT%H%M%SZ')}.jsonl"
    tmp = Path(tempfile.mkdtemp(prefix="stepline-soak-"))
    load_at_start = os.getloadavg()
    try:
        backend = make_backend(args.log, tmp)
    except Exception as exc:  # noqa: BLE001 - no broker: say why
        print(f"soak: no {args.log} log could be had: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(f"stepline soak: {args.log} {backend.url}, {args.duration:.0f} s, {args.concurrency} in flight, "
          f"kill every {args.kill_every:.0f} s, fail rate {args.fail_rate}, seed {args.seed}; files in {tmp}",
          file=sys.stderr, flush=True)
    metrics = asyncio.run(soak(args, backend))
    errors = verdict(metrics)
    row = {
        "ts": stamp.isoformat(timespec="seconds"), "system": f"stepline-{args.log}", "workload": "soak",
        "params": {k: v for k, v in vars(args).items() if k not in ("out", "keep")},
        "ok": not errors, "errors": errors, "metrics": metrics,
        "env": {"git": git_describe(), "python": platform.python_version(), "machine": platform.machine(),
                "cpus": os.cpu_count(), "load_avg_at_start": load_at_start, "load_avg_at_end": os.getloadavg(),
                "url": backend.url, "tmp": str(tmp)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    print_summary(row, path)
    if errors or args.keep:
        where = f"Kafka namespace {backend.namespace}, " if backend.namespace else ""
        print(f"  kept for inspection: {where}{tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
        if backend.bootstrap and backend.namespace:
            asyncio.run(kafka_bench.delete_namespace(backend.bootstrap, backend.namespace))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
