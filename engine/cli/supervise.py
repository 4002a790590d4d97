"""`--processes N`: one worker process per core, supervised by the command's process.

`stepline worker --processes N` (N > 1) does no work itself: it starts N
children, each `stepline worker ... --member k/N`, which on sqlite owns the
partitions p with p % N == k of every group it joins (the log's
`split_groups`), and on Kafka is a plain member of the group (Kafka balances
it). `stepline dev --processes N` runs member 0 itself, beside the API, and
starts members 1..N-1. The supervisor:

1. starts the children in a process group of their own, so a terminal's
   Ctrl-C reaches them once, through the supervisor, and a first signal
   is a graceful drain in each of them, not a drain and a cancel;
2. has the kernel kill every child when the supervisor dies, even by kill -9
   (PR_SET_PDEATHSIG, set in the child between fork and exec; a child whose
   supervisor died before that exits at once);
3. forwards SIGTERM and SIGINT to every child (the first drains, a second
   cancels what still runs: engine/cli/shutdown.py), and exits once they
   all have, with the worst exit code;
4. restarts a child that exits while no stop was asked for, after a pause
   that doubles with each quick crash (0.5 s up to 30 s) and starts over once
   a child has lived a minute. A child that fails within its first seconds
   on its first start (a log that cannot be opened: it said why on stderr)
   stops the whole command with its exit code, rather than crash forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

from stepline.cli._common import CliError, _say
from stepline.settings import parse_processes

# Back-off before restarting a child that exited without being asked to.
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0
# A child that lived this long resets its back-off.
HEALTHY_S = 60.0
# A child failing this soon after its first start stops the command.
FAILED_START_S = 5.0

_PR_SET_PDEATHSIG = 1


def usable_cores() -> int:
    """The cores this process may run on, bounded by a cgroup CPU quota (a
    container limited to 2 CPUs on a 64-core node gets 2, not 64)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cores)


def processes_of(value: str | int, log_url: str) -> int:
    """`--processes` (or the `processes` setting) as a count; `auto` is every
    usable core; an in-process log (memory://) is always one process."""
    try:
        wanted = parse_processes(value)
    except ValueError as exc:
        raise CliError(f"--processes {exc}") from None
    if log_url.startswith("memory:"):
        return 1
    return usable_cores() if wanted == "auto" else wanted


def parse_member(value: str) -> tuple[int, int]:
    """`--member k/N` (set by the supervisor) as (k, N)."""
    k, sep, n = value.partition("/")
    if not sep or not k.isdigit() or not n.isdigit() or not 0 <= int(k) < int(n):
        raise CliError(f"--member {value!r} is not k/N with 0 <= k < N (the supervisor sets it)")
    return int(k), int(n)


def share(total: int, members: int) -> int:
    """Each member's part of a per-command limit (`--concurrency`): the
    command as a whole keeps it, give or take rounding up."""
    return max(1, math.ceil(total / members))


def _die_with_parent(parent: int) -> Callable[[], None]:
    linux = sys.platform.startswith("linux")

    def preexec() -> None:
        os.setpgid(0, 0)  # a process group of its own: a terminal's Ctrl-C reaches it through us
        if linux:  # elsewhere there is no PR_SET_PDEATHSIG: a child outlives a supervisor killed by -9
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before the prctl
            os._exit(1)
    return preexec


class Supervisor:
    """Children `argv_of(k)` for k in `members`, kept running until a signal."""

    def __init__(self, argv_of: Callable[[int], Sequence[str]], members: Sequence[int], json_logs: bool,
                 what: str = "stepline worker", label: Callable[[int], str] = "process {}".format) -> None:
        self._argv_of = argv_of
        self._label = label
        self._members = list(members)
        self._json_logs = json_logs
        self._what = what
        self.children: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self._stopped = asyncio.Event()
        self._failed: int | None = None
        self.restarts = 0

    def signal(self, sig: int) -> None:
        """SIGTERM/SIGINT to the supervisor: the same signal to every child."""
        self.stopping = True
        self._stopped.set()
        for child in self.children.values():
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(sig)

    def on_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.signal, sig)

    async def run(self) -> int:
        """Every child until all have exited after a stop; the worst exit code."""
        codes = await asyncio.gather(*(self._keep(k) for k in self._members))
        if self._failed is not None:
            return self._failed
        return max((c for c in codes if c > 0), default=0)

    async def _start(self, k: int) -> asyncio.subprocess.Process:
        child = await asyncio.create_subprocess_exec(
            *self._argv_of(k), preexec_fn=_die_with_parent(os.getpid()),
        )
        self.children[k] = child
        if self.stopping:  # a signal came while it started: it drains too
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        return child

    async def _keep(self, k: int) -> int:
        pause = RESTART_FIRST_S
        first = True
        while True:
            started = time.monotonic()
            child = await self._start(k)
            code = await child.wait()
            if self.stopping:
                return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
            lived = time.monotonic() - started
            if first and lived < FAILED_START_S and code > 0:
                _say(f"{self._what}: {self._label(k)} failed at start (exit {code}); stopping the others",
                     self._json_logs, member=k, exit_code=code)
                self._failed = code
                self.signal(signal.SIGTERM)
                return code
            first = False
            if lived >= HEALTHY_S:
                pause = RESTART_FIRST_S
            _say(f"{self._what}: {self._label(k)} (pid {child.pid}) exited with {code}; "
                 f"restarting it in {pause:g} s",
                 self._json_logs, member=k, pid=child.pid, exit_code=code, restart_in_s=pause)
            self.restarts += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), pause)
            if self.stopping:
                return 0
            pause = min(pause * 2, RESTART_MAX_S)


def worker_argv(module: str, log_url: str, *, member: int, members: int, concurrency: int, grace: float,
                pool: str, json_logs: bool, http: tuple[str, int] | None, instance_id: str | None) -> list[str]:
    """`stepline worker` as member `member` of `members`: each child gets its
    share of the concurrency, its own instance id (`X-k`) and, with an HTTP
    port P, port P+k (0 stays 0: a free port each)."""
    argv = [sys.executable, "-m", "stepline.cli", "worker", module, "--log", log_url,
            "--concurrency", str(share(concurrency, members)), "--grace", repr(grace), "--pool", pool,
            "--json-logs" if json_logs else "--console-logs", "--processes", "1",
            "--member", f"{member}/{members}"]
    if http is not None:
        host, port = http
        argv += ["--http-host", host, "--http-port", str(port + member if port else 0)]
    if instance_id is not None:
        argv += ["--instance-id", f"{instance_id}-{member}"]
    return argv
