"""`stepline` command processes started by a test, each with its stderr in a file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .conftest import eventually


class CliProcs:
    """`stepline` processes on one log; `start` is each test module's own."""

    def __init__(self, url: str, state: Path) -> None:
        self.url = url
        self.state = state
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        """`python -m stepline.cli *argv`, in the state folder, stderr to proc-<n>.log."""
        with open(self.state / f"proc-{len(self.procs)}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "stepline.cli", *argv], env=env,
                                    stdout=subprocess.DEVNULL, stderr=log, cwd=self.state)
        self.procs.append(proc)
        return proc

    def stderr(self, proc: subprocess.Popen[bytes]) -> str:
        return (self.state / f"proc-{self.procs.index(proc)}.log").read_text(errors="replace")

    async def said(self, proc: subprocess.Popen[bytes], text: str, times: int = 1, timeout: float = 60) -> None:
        def check() -> bool:
            if self.stderr(proc).count(text) >= times:
                return True
            assert proc.poll() is None, f"exited with {proc.returncode} before saying {text!r}:\n{self.stderr(proc)}"
            return False

        await eventually(check, timeout=timeout, what=f"{text!r} on stderr")

    async def exited(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
        await eventually(lambda: proc.poll() is not None, timeout=timeout, what="the process to exit")
        assert proc.returncode is not None
        return proc.returncode
