"""Does a completed step survive kill -9? Checked, not only stated: the same
protocol for every system, once per benchmark run (workload `d_kill9`).

1. Phase `run` (a driver process, with the process that executes the task
   in ITS process group): a 3-step task whose step one appends "one" to
   STATE/calls.log and whose step two appends "two" and then, while
   STATE/block exists, creates STATE/in-two and waits.
2. When STATE/in-two appears, the whole process group gets SIGKILL: step one
   had completed, step two was running. (The databases, Redis and the Kafka
   broker are other processes and live on.)
3. STATE/block is removed; phase `resume` starts the system again on the same
   database / Redis / log, waits for the run's result (bounded), and emits
   the `d_kill9` row: how often each step ran, whether the run finished
   with the right output. Survived = finished, right output, step one ran
   exactly once.

Standard library only. The drivers import the task-side helpers below.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

WAIT_IN_TWO_S = 90.0
X = 7  # the payload: the right output is X + 3


def record(state: str, step: str) -> None:
    with open(os.path.join(state, "calls.log"), "a") as f:
        f.write(step + "\n")
        f.flush()
        os.fsync(f.fileno())


def hold_in_two(state: str) -> None:
    """Step two's body: wait here (to be killed) while the block file exists."""
    record(state, "two")
    block = os.path.join(state, "block")
    if os.path.exists(block):
        Path(state, "in-two").touch()
        while os.path.exists(block):
            time.sleep(0.05)


def calls(state: str) -> dict[str, int]:
    p = Path(state, "calls.log")
    out = {"one": 0, "two": 0, "three": 0}
    for line in p.read_text().split() if p.exists() else []:
        out[line] = out.get(line, 0) + 1
    return out


def verdict(state: str, finished: bool, output: Any, extra: dict[str, Any]) -> tuple[bool, list[str], dict[str, Any]]:
    """(ok, errors, metrics) of the resume phase. `ok` = the check ran; whether
    the step survived is the metric `completed_step_survived`, since a
    system that does not resume is a finding, not a broken benchmark."""
    n = calls(state)
    survived = finished and output == X + 3 and n["one"] == 1
    m = {"calls": n, "finished_after_restart": finished, "output": output,
         "completed_step_survived": survived,
         "completed_step_reran": n["one"] > 1,
         "interrupted_step_reran": n["two"] > 1, **extra}
    return True, [], m


def run_check(argv_run: list[str], argv_resume: list[str], state: str, log: Any, cwd: str,
              timeout: float = 180.0) -> tuple[str, str]:
    """Steps 1-3; returns (stdout of resume, a problem or "")."""
    env = dict(os.environ, BENCH_KILL9_STATE=state)
    Path(state, "block").touch()
    proc = subprocess.Popen(argv_run, stdout=log, stderr=log, start_new_session=True, env=env, cwd=cwd)
    deadline = time.monotonic() + WAIT_IN_TWO_S
    try:
        while not Path(state, "in-two").exists():
            if proc.poll() is not None:
                return "", f"phase run exited with {proc.returncode} before step two"
            if time.monotonic() > deadline:
                return "", f"step two not reached in {WAIT_IN_TWO_S:.0f} s"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and whatever runs the task
        proc.wait(30)
    Path(state, "block").unlink()
    try:
        p = subprocess.run(argv_resume, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout,
                           env=env, cwd=cwd)
    except subprocess.TimeoutExpired:
        return "", f"phase resume timed out after {timeout:.0f} s"
    return p.stdout, "" if p.returncode == 0 else f"phase resume exited with {p.returncode}"
