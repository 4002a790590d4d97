"""What the health, metrics and autoscaling tests share: real `stepline` processes
and real HTTP to them, and a parsed Prometheus scrape."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

APP = str(Path(__file__).parent / "apps" / "ops_app.py")

Labels = frozenset[tuple[str, str]]
Scrape = dict[tuple[str, Labels], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stepline(*args: str, state: Path, log: Path | None = None, **env: str) -> subprocess.Popen[bytes]:
    """`stepline ARGS` as a child process; its stderr goes to `log` (read it on failure)."""
    environ = dict(os.environ, OPS_DIR=str(state), COLUMNS="200", **env)
    for name in ("STEPLINE_APP", "STEPLINE_HTTP_PORT", "STEPLINE_LOG"):
        environ.pop(name, None)
    out = (log or state / f"{args[0]}-{time.monotonic_ns()}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "stepline.cli", *args], env=environ,
                            stdout=subprocess.DEVNULL, stderr=out)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def get(url: str, timeout: float = 15.0) -> tuple[int, str]:
    """(status, body) of GET `url`; (0, reason) when nothing answers."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.get(url) as response:
                return response.status, await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, repr(exc)


async def until_status(url: str, status: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> str:
    """Poll `url` until it answers `status`; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    last: tuple[int, str] = (0, "")
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the process exited with {proc.returncode} while {url} was polled"
        last = await get(url)
        if last[0] == status:
            return last[1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} answered {last} instead of {status} within {timeout} s")


def parse(text: str) -> Scrape:
    """Every sample of a Prometheus text scrape, by (sample name, labels)."""
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return out


def value(scrape: Scrape, name: str, **labels: str) -> float:
    """One series' value; 0 when the scrape has no such series (a counter never touched)."""
    return scrape.get((name, frozenset(labels.items())), 0.0)


def total(scrape: Scrape, name: str) -> float:
    """The sum of every series of `name`."""
    return sum(v for (n, _), v in scrape.items() if n == name)


async def scrape(url: str) -> Scrape:
    status, body = await get(url)
    assert status == 200, f"GET {url}: {status} {body[:500]}"
    return parse(body)


def read(path: Path) -> Any:
    return path.read_text(errors="replace") if path.exists() else ""
