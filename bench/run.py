"""Stepline benchmark: embedded engine throughput, per-step checkpoint cost,
and the disk underneath, measured in one run.

    python bench/run.py [--quick] [--reps N] [--out DIR] [--tmpdir DIR]

Workloads (Stepline = Client + Worker on one event loop and one SqliteLog,
as `stepline dev` runs; every one on synchronous=FULL (fsync per group
commit, the default) and again on `?synchronous=normal` (no fsync)):

  a_throughput   3-step no-op task, closed loop with 1 / 16 / 256 runs in
                 flight; completions/s, events/s, CPU s per 1,000 runs
  b_latency      0 / 1 / 10 / 100-step task, one run at a time; p50/p99
  b_slope        least-squares ms per step over the four p50s
  b_amortised    100-step task, 256 in flight: elapsed / total steps
  c_fsync        write 200 B + fsync loop on the benchmark's disk
  c_sqlite       SQLite WAL single-row commits, FULL and NORMAL
  micro_codec    stepline.codec encode/decode of a StepCompleted
  f_match        10 subscription filters matched in process: the fan-out ceiling
  f_fanout       the router fanning E events out to 10 filtered subscriptions
                 (3 match each), sqlite FULL and memory://; events/s, runs/s
                 (bench/fanout.py; --no-fanout leaves both out)
  q_admission    a limited queue's slot release -> next run's start, concurrency_limit
                 1 and 10, against the same limit as worker concurrency (no admission);
                 sqlite FULL, memory:// and Kafka when a broker is had
                 (bench/admission.py; --no-admission leaves it out)
  query_catchup  the query projection's rebuild over N runs' events vs. raw read+decode;
  query_list     GET /v1/runs p50/p99 at N runs (first, filtered, tag, deep, text pages)
                 (bench/query.py; N = 100k, 10k with --quick; --no-query leaves them out)

Process-level and scale workloads, each on sqlite FULL and on Kafka when a
broker is had (--no-procs leaves them out; --only NAME[,NAME] runs just
those of them and nothing else):
  a_split          (a) with the worker in its own process pinned to CPU 0 and the
                   driver pinned to CPU 1; CPU s per 1,000 runs of worker, driver
                   and broker (bench/workloads_procs.py)
  a_cores          (a) against `stepline worker --processes 1` and `--processes N`
                   (N = usable cores, at least 2), nothing pinned, in the same run:
                   the ratio of runs/s (aim ≥ 1.7 on 2 cores), CPU s per 1,000 runs
                   of all worker processes and of the driver, their RSS
                   (bench/workloads_cores.py)
  d_recovery       1,000 runs blocked in step 2, kill -9 of the worker, restart:
                   time to the first / all resumed, all done; completed steps
                   re-executed and runs lost (both must be 0)
  e_replay         the worker's run projection rebuilt from 1,000,000 events:
                   events/s, peak RSS (bench/workloads_replay.py)
  f_subscriptions  one event to 1 / 10 / 100 filtered subscriptions, half matching:
                   deliveries/s, publish-to-start p50/p99 (bench/workloads_subs.py)
  g_sleeping       10,000 sleeping runs in a fresh worker process: RSS bytes per
                   run, and timer lateness p50/p99 when they wake

With --kafka (the default; --no-kafka turns it off) the same run also
measures Stepline on a real Kafka broker and that broker's raw limit with
plain aiokafka (bench/kafka_bench.py: systems "stepline-kafka" and
"aiokafka-raw", workloads k_*; k_workers starts three `stepline worker`
processes). When no broker can be had (see
tests/kafka_broker.py) that part is skipped with the reason printed.
--kafka-only runs just that part.

One JSON line per (system, workload, parameters, repetition) goes to
OUT/<UTC timestamp>.jsonl (default bench/results/); a summary table
(median [min-max] over repetitions) is printed at the end. The exit code
is non-zero when any workload failed to complete with correct results;
timings are never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import admission  # noqa: E402
import fanout  # noqa: E402
import kafka_bench  # noqa: E402
import physical  # noqa: E402
import query  # noqa: E402
import workloads  # noqa: E402
import workloads_cores  # noqa: E402
import workloads_procs  # noqa: E402
import workloads_replay  # noqa: E402
import workloads_subs  # noqa: E402

MODES = {
    "full": "stepline-sqlite FULL (fsync)",
    "normal": "stepline-sqlite NORMAL (no fsync)",
}
CAPS = (1, 16, 256)
STEP_COUNTS = (0, 1, 10, 100)


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "a_runs": {1: 40, 16: 200, 256: 600}, "a_warmup": {1: 5, 16: 32, 256: 256},
            "b_runs": {0: 15, 1: 15, 10: 15, 100: 5}, "b_warmup": 2,
            "amort_runs": 256, "amort_warmup": 32,
            "fsync_ops": 100, "sqlite_commits": 100, "codec_number": 2000,
        }
    return {
        "a_runs": {1: 200, 16: 1500, 256: 4000}, "a_warmup": {1: 20, 16: 100, 256: 512},
        "b_runs": {0: 150, 1: 150, 10: 100, 100: 30}, "b_warmup": 5,
        "amort_runs": 512, "amort_warmup": 256,
        "fsync_ops": 500, "sqlite_commits": 500, "codec_number": 20000,
    }


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--", "../engine", "../projections", "../consumers", "../schemas"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty-engine" if dirty else "")
    except Exception:
        return "unknown"


class Recorder:
    def __init__(self, path: Path, env: dict[str, Any]) -> None:
        self.path = path
        self.env = env
        self.rows: list[dict[str, Any]] = []
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, system: str, workload: str, params: dict[str, Any], rep: int,
            result: dict[str, Any], wall_s: float) -> dict[str, Any]:
        row = {
            "ts": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "system": system, "workload": workload, "params": params, "rep": rep,
            "ok": bool(result.get("ok")), "errors": result.get("errors", []),
            "metrics": result.get("metrics", {}), "wall_s": round(wall_s, 3), "env": self.env,
        }
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        status = "ok" if row["ok"] else "FAILED " + "; ".join(row["errors"][:3])
        print(f"  [{rep}] {system:34} {workload:13} {_fmt_params(params):24} {wall_s:6.1f}s {status}",
              file=sys.stderr, flush=True)
        return row


def _fmt_params(p: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in p.items())


def _run_async(make: Callable[[], Coroutine[Any, Any, dict[str, Any]]], timeout: float) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        return await asyncio.wait_for(make(), timeout)

    try:
        return asyncio.run(go())
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        return {"ok": False, "errors": [f"{type(exc).__name__}: {exc}",
                                        traceback.format_exc(limit=3)], "metrics": {}}


def _run_sync(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:
        return {"ok": False, "errors": [f"{type(exc).__name__}: {exc}"], "metrics": {}}


def one_rep(rec: Recorder, rep: int, sz: dict[str, Any], tmp_root: str | None, timeout: float) -> None:
    def measure(system: str, workload: str, params: dict[str, Any],
                run: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="stepline-bench-", dir=tmp_root) as d:
            t0 = time.perf_counter()
            result = run(d)
            return rec.add(system, workload, params, rep, result, time.perf_counter() - t0)

    # c: the physical floor, first, on the same disk.
    measure("disk", "c_fsync", {"bytes": 200},
            lambda d: _run_sync(lambda: physical.fsync_loop(d, sz["fsync_ops"])))
    for mode in MODES:
        measure(f"sqlite3 WAL {mode.upper()}" + (" (no fsync)" if mode == "normal" else " (fsync)"),
                "c_sqlite", {"synchronous": mode, "rows_per_commit": 1},
                lambda d, m=mode: _run_sync(lambda: physical.sqlite_commits(d, m, sz["sqlite_commits"])))
    measure("stepline.codec", "micro_codec", {"event": "StepCompleted"},
            lambda d: _run_sync(lambda: physical.codec_micro(sz["codec_number"])))

    for mode, system in MODES.items():
        # a: throughput at each in-flight cap.
        for cap in CAPS:
            measure(system, "a_throughput", {"in_flight": cap, "steps": 3},
                    lambda d, m=mode, c=cap: _run_async(lambda: workloads.throughput(
                        workloads.log_url(d, m), c, sz["a_runs"][c], sz["a_warmup"][c]), timeout))
        # b: one at a time, per step count; then the slope over the p50s.
        p50s: dict[int, float] = {}
        all_ok = True
        for n in STEP_COUNTS:
            row = measure(system, "b_latency", {"steps": n, "in_flight": 1},
                          lambda d, m=mode, n=n: _run_async(lambda: workloads.step_latency(
                              workloads.log_url(d, m), n, sz["b_runs"][n], sz["b_warmup"]), timeout))
            all_ok &= row["ok"]
            if row["ok"]:
                p50s[n] = row["metrics"]["p50_ms"]
        if len(p50s) == len(STEP_COUNTS):
            b, a = workloads.slope([float(k) for k in p50s], list(p50s.values()))
            slope_res = {"ok": all_ok, "errors": [], "metrics": {
                "ms_per_step": b, "intercept_ms": a, "p50_ms_by_steps": p50s,
                "fit": "least squares over p50 at steps " + ",".join(map(str, p50s))}}
        else:
            slope_res = {"ok": False, "errors": ["a b_latency point failed; no slope"], "metrics": {}}
        rec.add(system, "b_slope", {"steps": list(STEP_COUNTS)}, rep, slope_res, 0.0)
        # b: amortised per-checkpoint cost under concurrency.
        measure(system, "b_amortised", {"steps": 100, "in_flight": 256},
                lambda d, m=mode: _run_async(lambda: workloads.amortised_checkpoint(
                    workloads.log_url(d, m), 100, 256, sz["amort_runs"], sz["amort_warmup"]), timeout))


PROC_WORKLOADS = ("a_split", "a_cores", "d_recovery", "e_replay", "f_subscriptions", "g_sleeping")


def run_procs(rec: Recorder, rep: int, quick: bool, tmp_root: str | None, timeout: float,
              bootstrap: str | None, only: set[str] | None, sqlite: bool = True) -> None:
    """The process-level and scale workloads (a_split, d..g), sqlite and Kafka."""
    want = only if only is not None else set(PROC_WORKLOADS)
    procs = want & {"a_split", "d_recovery", "g_sleeping"}
    if procs:
        workloads_procs.one_rep(rec, rep, workloads_procs.sizes(quick), tmp_root, timeout, _run_async,
                                bootstrap, procs, sqlite=sqlite)
    if "a_cores" in want:
        workloads_cores.one_rep(rec, rep, workloads_procs.sizes(quick), tmp_root, timeout, _run_async,
                                bootstrap, sqlite=sqlite)
    if "e_replay" in want:
        workloads_replay.one_rep(rec, rep, workloads_replay.sizes(quick), tmp_root, timeout, _run_async,
                                 bootstrap, sqlite=sqlite)
    if "f_subscriptions" in want:
        workloads_subs.one_rep(rec, rep, workloads_subs.sizes(quick), tmp_root, timeout, _run_async,
                               bootstrap, sqlite=sqlite)


# --- summary -------------------------------------------------------------

# (workload, metric, label, format) shown in the summary.
HEADLINES: dict[str, list[tuple[str, str, str]]] = {
    "a_throughput": [("runs_per_s", "runs/s", "{:,.0f}"),
                     ("events_per_s_measured", "events/s", "{:,.0f}"),
                     ("cpu_s_per_1000_runs", "CPU s/1k runs", "{:.2f}"),
                     ("events_per_commit", "events/commit", "{:.1f}")],
    "b_latency": [("p50_ms", "p50 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}"),
                  ("commits_per_run", "commits/run", "{:.1f}")],
    "b_slope": [("ms_per_step", "ms/step (slope of p50)", "{:.3f}"),
                ("intercept_ms", "intercept ms", "{:.2f}")],
    "b_amortised": [("ms_per_checkpoint", "ms/checkpoint (amortised)", "{:.4f}"),
                    ("checkpoints_per_s", "checkpoints/s", "{:,.0f}"),
                    ("cpu_ms_per_checkpoint", "CPU ms/checkpoint", "{:.4f}")],
    "c_fsync": [("mean_us", "µs/op mean", "{:,.0f}"), ("p50_us", "µs/op p50", "{:,.0f}"),
                ("p99_us", "µs/op p99", "{:,.0f}")],
    "c_sqlite": [("mean_us", "µs/commit mean", "{:,.0f}"),
                 ("commits_per_s", "commits/s", "{:,.0f}")],
    "micro_codec": [("encode_us", "encode µs", "{:.2f}"), ("decode_us", "decode µs", "{:.2f}"),
                    ("bytes", "bytes", "{:.0f}")],
    **fanout.HEADLINES,
    **admission.HEADLINES,
    **query.HEADLINES,
    **kafka_bench.HEADLINES,
    **workloads_procs.HEADLINES,
    **workloads_cores.HEADLINES,
    **workloads_replay.HEADLINES,
    **workloads_subs.HEADLINES,
}


def summarise(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, str, str, str]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["system"], r["workload"], _fmt_params(r["params"])), []).append(r)
    out = []
    for (system, workload, params), rs in groups.items():
        ok = all(r["ok"] for r in rs)
        for key, label, fmt in HEADLINES.get(workload, []):
            vals = [r["metrics"][key] for r in rs if r["ok"] and isinstance(r["metrics"].get(key), int | float)]
            if not vals:
                cell = "—"
            elif len(vals) == 1:
                cell = fmt.format(vals[0])
            else:
                cell = (f"{fmt.format(statistics.median(vals))} "
                        f"[{fmt.format(min(vals))}–{fmt.format(max(vals))}]")
            out.append((system, workload, params, label, cell, f"{len(vals)}/{len(rs)}" + ("" if ok else " FAIL")))
    return out


def print_summary(rows: list[dict[str, Any]], path: Path) -> None:
    lines = summarise(rows)
    title = f"Stepline bench — median [min–max] over repetitions — {path}"
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        t = Table(title=escape(title))
        for col in ("system", "workload", "params", "metric", "value", "reps ok"):
            t.add_column(col, overflow="fold")
        prev = None
        for system, workload, params, label, cell, reps in lines:
            key = (system, workload, params)
            t.add_row(*(escape(x) for x in (("", "", "") if key == prev else key)),
                      escape(label), escape(cell), escape(reps))
            prev = key
        Console(width=160).print(t)
    except ImportError:
        print(title)
        for line in lines:
            print(" | ".join(line))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 rep, small counts (CI smoke test, < 60 s)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the .jsonl (default bench/results)")
    ap.add_argument("--tmpdir", default=None, help="where the databases go (default: the system temp dir)")
    ap.add_argument("--timeout", type=float, default=None, help="per-workload timeout, s")
    ap.add_argument("--kafka", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure Stepline on Kafka and the raw broker (default on; "
                         "skipped with the reason when no broker can be had)")
    ap.add_argument("--kafka-only", action="store_true", help="only the Kafka part")
    ap.add_argument("--fanout", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the event router's fan-out (bench/fanout.py; default on)")
    ap.add_argument("--admission", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure queue admission overhead (bench/admission.py; default on)")
    ap.add_argument("--query", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure the query projection and runs list (bench/query.py; default on)")
    ap.add_argument("--procs", action=argparse.BooleanOptionalAction, default=True,
                    help="also run a_split, d_recovery, e_replay, f_subscriptions, g_sleeping (default on)")
    ap.add_argument("--only", default=None,
                    help=f"comma-separated, of {', '.join(PROC_WORKLOADS)}: run just these, nothing else")
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    if only is not None and not only <= set(PROC_WORKLOADS):
        ap.error(f"--only: unknown workload(s) {sorted(only - set(PROC_WORKLOADS))}; "
                 f"choose from {', '.join(PROC_WORKLOADS)}")
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    sz = sizes(args.quick)
    timeout = args.timeout or (45.0 if args.quick else 300.0)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = Path(args.out) / f"{stamp}.jsonl"
    env = {
        "git": _git_sha(), "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(), "quick": args.quick,
        "tmpdir": args.tmpdir or tempfile.gettempdir(), "worker_concurrency": workloads.WORKER_CONCURRENCY,
    }
    rec = Recorder(path, env)
    print(f"stepline bench: {reps} rep(s){' (quick)' if args.quick else ''} -> {path}", file=sys.stderr)
    t0 = time.perf_counter()
    bootstrap = None
    if args.kafka or args.kafka_only:
        try:
            bootstrap = kafka_bench.get_broker()
            print(f"kafka: broker at {bootstrap}", file=sys.stderr)
        except Exception as exc:  # BrokerUnavailable or anything on the way to it
            print(f"kafka: skipped: no broker could be had: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
    ksz = kafka_bench.sizes(args.quick)
    for rep in range(1, reps + 1):
        if only is not None:
            run_procs(rec, rep, args.quick, args.tmpdir, timeout, bootstrap, only, sqlite=not args.kafka_only)
            continue
        if not args.kafka_only:
            one_rep(rec, rep, sz, args.tmpdir, timeout)
            if args.fanout:
                fanout.one_rep(rec, rep, fanout.sizes(args.quick), args.tmpdir, timeout, _run_async)
            if args.admission:
                admission.one_rep(rec, rep, admission.sizes(args.quick), args.tmpdir, timeout,
                                  _run_async, bootstrap)
            if args.query:
                query.one_rep(rec, rep, query.sizes(args.quick), args.tmpdir, timeout, _run_async)
        if bootstrap is not None:
            kafka_bench.one_rep(rec, rep, ksz, bootstrap, timeout, _run_async)
        if args.procs:
            run_procs(rec, rep, args.quick, args.tmpdir, timeout, bootstrap, None, sqlite=not args.kafka_only)
    print_summary(rec.rows, path)
    failed = [r for r in rec.rows if not r["ok"]]
    print(f"{len(rec.rows)} results in {time.perf_counter() - t0:.0f} s; "
          f"{len(failed)} failed", file=sys.stderr)
    for r in failed:
        print(f"FAILED: {r['system']} {r['workload']} {_fmt_params(r['params'])} rep {r['rep']}: "
              f"{r['errors'][:2]}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
