"""CPU of an idle `stepline worker`: what it costs to wait for work.

    .venv/bin/python bench/idle.py [--seconds 20] [--reps 3] [--log URL]

Starts `stepline worker bench/sl_proc_tasks.py` on a fresh sqlite log (or
`--log`), lets it settle, then reads its utime + stime from /proc/<pid>/stat
before and after `--seconds` of nothing to do: the percentage of one core
it used. On the embedded log an idle worker's tails wait for other
processes' commits; they sleep until one rings (engine/log/sqlite_bell.py)
instead of polling every 10 ms. The clock tick is 10 ms, so over 20 s the
resolution is 0.05% of a core.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SETTLE_S = 6.0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_percent(url: str | None, seconds: float) -> float:
    with tempfile.TemporaryDirectory(prefix="stepline-idle-") as d:
        log = url or f"sqlite:///{d}/log.db"
        env = dict(os.environ, PYTHONPATH=str(BENCH))
        proc = subprocess.Popen(
            [sys.executable, "-m", "stepline.cli", "worker", str(BENCH / "sl_proc_tasks.py"), "--log", log],
            env=env, cwd=d, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(SETTLE_S)
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode} before the measurement")
            c0, t0 = cpu_s(proc.pid), time.monotonic()
            time.sleep(seconds)
            used, elapsed = cpu_s(proc.pid) - c0, time.monotonic() - t0
        finally:
            proc.terminate()
            proc.wait(30)
    return 100 * used / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--log", help="a log URL (default: a fresh sqlite file per rep)")
    args = ap.parse_args()
    vals = [idle_percent(args.log, args.seconds) for _ in range(args.reps)]
    print(f"idle stepline worker: {statistics.median(vals):.2f}% of a core "
          f"[{min(vals):.2f}-{max(vals):.2f}] over {args.seconds:.0f} s, {args.reps} reps")


if __name__ == "__main__":
    main()
