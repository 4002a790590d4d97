"""Restate under the peer workloads (see common.py): restate-server (the
binary npm's @restatedev/restate-server installs into .bench-venv/npm) and
the Python SDK (restate-sdk, bench/peers/restate_app.py) served by hypercorn
in a process of its own. One process per (workload letter, repetition), each
with a fresh server on a fresh base dir; rows as `ROW {json}` on stdout:

    .bench-venv/bin/python bench/peers/restate_bench.py --workload a [--quick] [--tmpdir DIR]

The driver registers the deployment with the admin API, then calls the
handler through the HTTP ingress (`POST /bench/steps`, request-response: the
reply is the handler's output, so completions are counted) from one asyncio
loop with aiohttp. A task of n steps is a handler doing n `ctx.run` steps.

The server runs as shipped except for what keeps it private and offline:
its own base dir and loopback ports, and `disable-telemetry = true`. It
still tries its version check at start, fails (no network) and logs an
ERROR from `octocrab`, then runs on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import aio_workloads as aw  # noqa: E402
import aiohttp  # noqa: E402
import common as c  # noqa: E402
import kill9  # noqa: E402
import procs  # noqa: E402

HERE = Path(__file__).resolve().parent
VENV = Path(sys.executable).parent.parent
RESTATE = VENV / "npm" / "node_modules" / "@restatedev" / "restate-server-linux-x64" / "bin" / "restate-server"
HYPERCORN = Path(sys.executable).parent / "hypercorn"
KILL_STATE = os.environ.get("BENCH_KILL9_STATE", "")
KILL_KEY = "bench-kill9"


class Restate:
    """restate-server + hypercorn serving restate_app, on `base` (a dir). The
    ports are kept in base/ports.json, so a restart on the same base dir
    (the kill -9 check) finds the node and the deployment where they were."""

    def __init__(self, base: str, log: str, own_group: bool = True, starts_file: str | None = None) -> None:
        self.base = base
        pf = Path(base, "ports.json")
        if pf.exists():
            self.ports = json.loads(pf.read_text())
        else:
            self.ports = {k: procs.free_port() for k in ("node", "ingress", "admin", "sdk")}
            Path(base).mkdir(parents=True, exist_ok=True)
            pf.write_text(json.dumps(self.ports))
        cfg = Path(base, "restate.toml")
        cfg.write_text(
            f'base-dir = "{base}/data"\n'
            'disable-telemetry = true\n'
            f'bind-address = "127.0.0.1:{self.ports["node"]}"\n'
            f'advertised-address = "http://127.0.0.1:{self.ports["node"]}/"\n'
            f'[ingress]\nbind-address = "127.0.0.1:{self.ports["ingress"]}"\n'
            f'[admin]\nbind-address = "127.0.0.1:{self.ports["admin"]}"\n')
        self.fresh = not Path(base, "data").exists()
        self.server = procs.Server("restate-server", [str(RESTATE), "--config-file", str(cfg), "--no-logo",
                                                      "--listen-mode", "tcp"],
                                   log, own_group=own_group, env={**os.environ, "RESTATE_LOG_FORMAT": "compact"})
        env = {**os.environ, "PYTHONPATH": str(HERE)}
        if starts_file:
            env["BENCH_STARTS_FILE"] = starts_file
        try:
            self.sdk = procs.Server("hypercorn", [str(HYPERCORN), "restate_app:app", "--bind",
                                                  f"127.0.0.1:{self.ports['sdk']}", "--log-level", "warning"],
                                    log + ".sdk", own_group=own_group, env=env, cwd=str(HERE))
        except Exception:
            self.server.stop()
            raise

    def url(self, what: str) -> str:
        return f"http://127.0.0.1:{self.ports[what]}"

    async def start(self, http: aiohttp.ClientSession) -> None:
        await asyncio.to_thread(self.server.wait_port, self.ports["admin"])
        await asyncio.to_thread(self.server.wait_port, self.ports["ingress"])
        await asyncio.to_thread(self.sdk.wait_port, self.ports["sdk"])
        deadline = time.monotonic() + procs.READY_TIMEOUT_S
        # Registered once per base dir: restarted, the server still knows it.
        while self.fresh:
            self.server.check_alive()
            try:
                async with http.post(self.url("admin") + "/deployments",
                                     json={"uri": self.url("sdk")}) as r:
                    body = await r.text()
                    if r.status in (200, 201):
                        break
                    why = f"{r.status} {body[:300]}"
            except aiohttp.ClientError as exc:
                why = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise procs.ServerError(f"restate: registering the deployment failed: {why}; "
                                        f"log {self.server.log}: {procs.tail(self.server.log)}")
            await asyncio.sleep(0.2)

    def stop(self) -> None:
        self.sdk.stop()
        self.server.stop()

    def settings(self) -> dict[str, Any]:
        return {"config": "as shipped (restate-server --dump-config), but base-dir, loopback ports, "
                          "disable-telemetry = true", "sdk_server": "hypercorn, 1 worker",
                "log": "bifrost default-provider = replicated, default-replication = 1, "
                       "log-server rocksdb-disable-wal-fsync = false (defaults)"}


def caller(http: aiohttp.ClientSession, r: Restate) -> aw.Call:
    url = r.url("ingress") + "/bench/steps"

    async def call(x: int, n: int) -> int:
        async with http.post(url, json={"x": x, "n": n}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"ingress {resp.status}: {(await resp.text())[:200]}")
            return int(await resp.json())
    return call


def prober(http: aiohttp.ClientSession, r: Restate) -> aw.Probe:
    url = r.url("ingress") + "/bench/probe3"

    async def probe(x: int) -> int:
        async with http.post(url, json=x) as resp:
            if resp.status != 200:
                raise RuntimeError(f"ingress {resp.status}: {(await resp.text())[:200]}")
            return int(await resp.json())
    return probe


def read_starts(path: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in Path(path).read_text().splitlines() if os.path.exists(path) else []:
        x, t = line.split()
        out.setdefault(int(x), float(t))
    return out


async def ready(call: aw.Call) -> None:
    """The ingress may answer 404 for a moment after the registration."""
    deadline = time.monotonic() + procs.READY_TIMEOUT_S
    while True:
        try:
            if await call(-100, 1) == -99:
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


async def workload_d(system: str, phase: str, extra: dict[str, Any]) -> None:
    """kill9.py's protocol. restate-server and hypercorn run in THIS process
    group in phase run, so the SIGKILL takes both down; phase resume starts
    them again on the same base dir, and asks for the result with the same
    idempotency key (Restate answers with the first invocation's result)."""
    base = os.path.join(KILL_STATE, "restate")
    r = Restate(base, os.path.join(KILL_STATE, "restate.log"), own_group=phase != "run")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as http:
            await r.start(http)
            url = r.url("ingress") + "/bench/kill3"
            hdr = {"idempotency-key": KILL_KEY}
            if phase == "run":
                async with http.post(url + "/send", json=kill9.X, headers=hdr) as resp:
                    if resp.status not in (200, 202):
                        raise RuntimeError(f"send: {resp.status} {await resp.text()}")
                await asyncio.sleep(600)  # killed in step two
                return
            try:
                async with http.post(url, json=kill9.X, headers=hdr,
                                     timeout=aiohttp.ClientTimeout(total=60)) as resp:
                    out, finished = (int(await resp.json()), True) if resp.status == 200 else (None, False)
            except Exception:
                out, finished = None, False
            call = caller(http, r)
            await ready(call)
            probe = await aw.sync_probe(r.server.pid, call, 10)
        ok, errors, m = kill9.verdict(KILL_STATE, finished, out, {
            "resumed_by": "restate-server and hypercorn restarted on the same base dir; Restate "
                          "retried the invocation",
            "killed": "restate-server AND the SDK's hypercorn", "fsync_probe": probe})
        c.emit(c.row(system, "d_kill9", {"steps": 3, **extra, "server": r.settings()}, ok, errors, m))
    finally:
        r.stop()


async def run(args: argparse.Namespace, system: str, extra: dict[str, Any]) -> None:
    sz = c.sizes(args.quick)
    if args.workload == "d":
        await workload_d(system, args.phase, extra)
        return
    with tempfile.TemporaryDirectory(prefix="restate-peers-", dir=args.tmpdir) as d:
        starts = os.path.join(d, "starts")
        r = Restate(os.path.join(d, "base"), args.server_log or os.path.join(d, "server.log"),
                    starts_file=starts)
        try:
            conn = aiohttp.TCPConnector(limit=0)  # as many connections as runs in flight
            async with aiohttp.ClientSession(connector=conn,
                                             timeout=aiohttp.ClientTimeout(total=sz["timeout_s"])) as http:
                await r.start(http)
                extra["server"] = r.settings()
                call = caller(http, r)
                await ready(call)
                if args.workload == "a":
                    await aw.workload_a(system, call, sz, extra)
                elif args.workload == "b":
                    await aw.workload_b(system, call, sz, extra)
                else:
                    await aw.workload_c(system, prober(http, r), lambda: read_starts(starts), sz, extra,
                                        [int(x) for x in args.rates.split(",")])
        finally:
            r.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=("a", "b", "c", "d"), required=True)
    ap.add_argument("--phase", choices=("run", "resume"), default="run", help="for d (kill9.py)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("--rates", default=",".join(map(str, c.RATES)), help="for c: sends per second")
    ap.add_argument("--server-log", default=None, help="where restate-server logs (default: the temp dir)")
    args = ap.parse_args()
    import importlib.metadata as md

    system = c.RESTATE
    extra: dict[str, Any] = {"restate_sdk": md.version("restate-sdk"), "hypercorn": md.version("hypercorn")}
    missing = [str(p) for p in (RESTATE, HYPERCORN) if not p.exists()]
    if missing:
        c.emit(c.row(system, f"{args.workload}_driver", extra, False,
                     [f"missing {', '.join(missing)}: run bench/peers/setup.sh"], {}))
        return 1
    try:
        v = Path(RESTATE).parent.parent / "package.json"
        extra["restate_server"] = json.loads(v.read_text()).get("version", "?")
        asyncio.run(procs.run_main(run(args, system, extra), c.sizes(args.quick)["timeout_s"] * 3))
    except (Exception, asyncio.CancelledError) as exc:  # cancelled: SIGTERM (run_main)
        c.emit(c.row(system, f"{args.workload}_driver", extra, False,
                     [f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=4)], {}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
