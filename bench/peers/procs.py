"""Server processes that a peer driver starts for itself (the Temporal dev
server, restate-server, hypercorn serving the Restate SDK), and a probe that
counts a running server's fsync-family system calls.

Standard library only. A driver starts its servers either in their own
process group (a measurement: stopped by the driver, whatever happens) or in
the driver's group (kill9.py's `run` phase: SIGKILLed together with the
driver, which is the point).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

READY_TIMEOUT_S = 60.0


class ServerError(RuntimeError):
    """A server could not be started; the message says why (and where its log is)."""


def free_port() -> int:
    """A port the OS has just handed out, so none is guessed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: str | Path, lines: int = 6) -> str:
    try:
        return " | ".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


_live: set[Server] = set()


@atexit.register
def _stop_all() -> None:
    """A driver that ends without reaching its own stop() (an exception
    outside it, SIGTERM turned into SystemExit) leaves no server behind."""
    for s in list(_live):
        with contextlib.suppress(Exception):
            s.stop(grace=5.0)


class Server:
    """One server process, its output in `log`; `stop()` (also on failure) ends it."""

    def __init__(self, name: str, argv: list[str], log: str | Path, own_group: bool = True,
                 env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.name, self.argv, self.log = name, argv, Path(log)
        self._f: IO[bytes] = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(argv, stdout=self._f, stderr=subprocess.STDOUT,
                                         start_new_session=own_group, env=env, cwd=cwd)
        except OSError as exc:
            self._f.close()
            raise ServerError(f"{name}: cannot start {argv[0]}: {exc}") from exc
        self.own_group = own_group
        _live.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_port(self, port: int, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            time.sleep(0.05)
        raise ServerError(f"{self.name} not answering on port {port} after {timeout:.0f} s; "
                          f"log {self.log}: {tail(self.log)}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ServerError(f"{self.name} exited with {self.proc.returncode}; log {self.log}: "
                              f"{tail(self.log)}")

    def stop(self, grace: float = 15.0) -> None:
        _live.discard(self)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                if self.own_group:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                else:
                    self.proc.kill()
                self.proc.wait(5)
        self._f.close()

    def cpu_s(self) -> float | None:
        """utime + stime of the process so far (its threads included), from /proc."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "msync")


async def run_main(coro: Any, timeout: float) -> None:
    """The driver's main coroutine, bounded, and cancelled on SIGTERM (the
    orchestrator's stop on timeout), so its `finally` stops the servers."""
    import asyncio

    task = asyncio.ensure_future(asyncio.wait_for(coro, timeout))
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    await task


@contextlib.contextmanager
def count_syncs(pid: int) -> Iterator[dict[str, Any]]:
    """Counts the fsync-family system calls of `pid` (all its threads) while
    the block runs, with strace. Yields a dict filled in on exit:
    {"calls": {syscall: n}, "total": n} or {"error": why}. strace slows the
    server down: use it only where the count, not the timing, is the point."""
    out: dict[str, Any] = {}
    exe = shutil.which("strace")
    if exe is None:
        out["error"] = "strace not installed"
        yield out
        return
    with tempfile.TemporaryDirectory(prefix="bench-strace-") as d:
        summary, err = os.path.join(d, "summary"), os.path.join(d, "stderr")
        with open(err, "wb") as ef:
            p = subprocess.Popen([exe, "-f", "-c", "-e", "trace=" + ",".join(SYNC_CALLS), "-p", str(pid),
                                  "-o", summary], stdout=subprocess.DEVNULL, stderr=ef)
        deadline = time.monotonic() + 10
        while b"attached" not in Path(err).read_bytes():
            if p.poll() is not None or time.monotonic() > deadline:
                p.kill()
                out["error"] = f"strace could not attach: {tail(err, 3)}"
                yield out
                return
            time.sleep(0.02)
        time.sleep(0.2)  # the "attached" line is printed per thread; let it reach all of them
        try:
            yield out
        finally:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            calls: dict[str, int] = {}
            for line in Path(summary).read_text().splitlines() if os.path.exists(summary) else []:
                tok = line.split()
                if tok and tok[-1] in SYNC_CALLS and re.fullmatch(r"\d+", tok[3]):
                    calls[tok[-1]] = int(tok[3])
            out["calls"] = calls
            out["total"] = sum(calls.values())
