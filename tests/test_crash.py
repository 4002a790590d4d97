"""kill -9 of a real worker process, on the embedded sqlite log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import stepline as sl

from .conftest import eventually

APP = Path(__file__).parent / "apps" / "crashy.py"


def start_worker(url: str, state_dir: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, CRASHY_DIR=str(state_dir))
    return subprocess.Popen(
        [sys.executable, "-m", "stepline.cli", "worker", str(APP), "--log", url],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def executions(state_dir: Path) -> Counter[str]:
    path = state_dir / "calls.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(line.split()[0] for line in lines)


@pytest.mark.slow
async def test_kill_9_in_step_two_then_restart_runs_step_one_exactly_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/stepline.db"
    (tmp_path / "block").touch()
    orders = [f"o{i}" for i in range(5)]
    worker = start_worker(url, tmp_path)
    try:
        async with sl.Client(url) as client:
            handles = [await client.trigger("crashy", {"order_id": o}) for o in orders]
            await eventually(
                lambda: all((tmp_path / f"in-two-{o}").exists() for o in orders),
                timeout=30, what="every run to be inside step two",
            )
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            (tmp_path / "block").unlink()
            assert executions(tmp_path) == {"one": 5, "two": 5}

            worker = start_worker(url, tmp_path)
            results = [await h.result(timeout=30) for h in handles]

            assert results == [
                {"order": o, "confirmation": f"CHARGED 30 FOR {o.upper()}"} for o in orders
            ]
            # Step one completed before the crash: never again. Step two was
            # in flight: at least once, so exactly twice here. Step three once.
            assert executions(tmp_path) == {"one": 5, "two": 10, "three": 5}
            history = [ev for _, ev in await client.history(handles[0].run_id)]
            assert [ev.type for ev in history].count("StepCompleted") == 3
            assert [ev.type for ev in history].count("RunStarted") == 2
    finally:
        worker.kill()
        worker.wait(10)
