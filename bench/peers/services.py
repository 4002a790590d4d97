"""The peers' servers, private to one benchmark run: a PostgreSQL cluster
(initdb into a temp dir, pg_ctl on a free loopback port, fsync on) and a
redis-server (AOF on, fsync every second, no RDB snapshots). Both are
context managers: stopped on the way out, failure or not. Standard library
only; nothing here is a system service, and nothing is left running.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

READY_TIMEOUT_S = 30.0


class ServiceError(RuntimeError):
    """A peer's server could not be started; the message says why."""


def free_port() -> int:
    """A port the OS has just handed out (bind to 0), so none is guessed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if not found:
        raise ServiceError("no /usr/lib/postgresql/*/bin/initdb: run bench/peers/setup.sh")
    return Path(found[-1]).parent


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; Debian's package made the user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres(tmp_root: str | None = None) -> Iterator[dict[str, str]]:
    """Yields {"url_base": "postgresql://postgres@127.0.0.1:PORT", "version", "settings"}."""
    bindir = pg_bindir()
    d = tempfile.mkdtemp(prefix="bench-pg-", dir=tmp_root)
    data, log = os.path.join(d, "data"), os.path.join(d, "pg.log")
    if os.geteuid() == 0:
        shutil.chown(d, "postgres", "postgres")
    port = free_port()
    started = False
    try:
        _run(_as_postgres([str(bindir / "initdb"), "-D", data, "-U", "postgres", "-A", "trust",
                           "--no-sync", "-E", "UTF8"]), "initdb")
        opts = (f"-p {port} -k {d} -c listen_addresses=127.0.0.1 -c fsync=on "
                f"-c synchronous_commit=on -c full_page_writes=on -c max_connections=300")
        _run(_as_postgres([str(bindir / "pg_ctl"), "-D", data, "-l", log, "-w",
                           "-t", str(int(READY_TIMEOUT_S)), "-o", opts, "start"]), "pg_ctl start", log)
        started = True
        version = _run([str(bindir / "postgres"), "--version"], "postgres --version").strip()
        yield {"url_base": f"postgresql://postgres@127.0.0.1:{port}", "version": version,
               "settings": "fsync=on synchronous_commit=on full_page_writes=on (defaults)"}
    finally:
        if started:
            subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", data, "-m", "fast", "-w",
                                         "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def redis(tmp_root: str | None = None) -> Iterator[dict[str, str]]:
    """Yields {"url": "redis://127.0.0.1:PORT/0", "version", "settings"}.

    --appendonly yes --appendfsync everysec --save '': every write is appended
    to the AOF (the OS page cache) before Redis replies, and the AOF is
    fsync'd once a second. So a killed process (Redis or a client) loses no
    acknowledged write; a power loss can lose about the last second."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise ServiceError("no redis-server on PATH: run bench/peers/setup.sh")
    d = tempfile.mkdtemp(prefix="bench-redis-", dir=tmp_root)
    port = free_port()
    settings = ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]
    log = open(os.path.join(d, "redis.log"), "wb")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", d,
                             "--daemonize", "no", *settings], stdout=log, stderr=log)
    try:
        _wait_port(port, proc, os.path.join(d, "redis.log"))
        version = _run([exe, "--version"], "redis-server --version").split()[2]
        yield {"url": f"redis://127.0.0.1:{port}/0", "version": version,
               "settings": "appendonly yes, appendfsync everysec, save ''"}
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"redis-server exited with {proc.returncode}: {_tail(log)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise ServiceError(f"redis-server not answering on {port} after {READY_TIMEOUT_S:.0f} s")


def _run(cmd: list[str], what: str, log: str | None = None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        detail = (p.stderr or p.stdout).strip()[-600:]
        raise ServiceError(f"{what} failed ({p.returncode}): {detail}"
                           + (f"; log: {_tail(log)}" if log else ""))
    return p.stdout


def _tail(path: str | None, lines: int = 8) -> str:
    if not path:
        return ""
    try:
        return " | ".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
