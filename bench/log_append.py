"""How fast the sqlite log appends, and what an fsync per commit costs.

    python bench/log_append.py [--seconds 3] [--appenders 256] [--dir DIR]

Prints records/s for 256 concurrent appenders (each appending one ~200-byte
record in a loop) with synchronous=FULL and NORMAL, the mean batch per
commit, and the latency of one lone append (one commit each) in both modes:
their difference is what the fsync of each commit costs on this disk.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from stepline.log import TopicSpec
from stepline.log.sqlite import SqliteLog

VALUE = os.urandom(100).hex().encode()  # 200 bytes, like a small event


async def concurrent_appends(path: str, synchronous: str, appenders: int, seconds: float) -> None:
    async with SqliteLog(path, synchronous=synchronous) as log:  # type: ignore[arg-type]
        await log.ensure_topics([TopicSpec("bench", 1)])
        stop = time.perf_counter() + seconds
        done = 0

        async def appender(i: int) -> None:
            nonlocal done
            key = f"run-{i}".encode()
            while time.perf_counter() < stop:
                await log.append("bench", 0, [(key, VALUE)])
                done += 1

        writer = log._writer
        assert writer is not None
        commits0, records0 = writer.commits, writer.records_written
        start = time.perf_counter()
        await asyncio.gather(*(appender(i) for i in range(appenders)))
        elapsed = time.perf_counter() - start
        commits = writer.commits - commits0
        batch = (writer.records_written - records0) / max(commits, 1)
        print(
            f"synchronous={synchronous.upper():6} {appenders} appenders: "
            f"{done / elapsed:>9,.0f} records/s, {commits / elapsed:>6,.0f} commits/s, "
            f"{batch:5.1f} records/commit"
        )


async def lone_append_latency(path: str, synchronous: str, count: int) -> float:
    async with SqliteLog(path, synchronous=synchronous) as log:  # type: ignore[arg-type]
        await log.ensure_topics([TopicSpec("lone", 1)])
        for _ in range(20):  # warm up
            await log.append("lone", 0, [(b"k", VALUE)])
        start = time.perf_counter()
        for _ in range(count):
            await log.append("lone", 0, [(b"k", VALUE)])
        return (time.perf_counter() - start) / count


def raw_fsync(directory: str, count: int = 200) -> float:
    path = os.path.join(directory, "fsync.probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        start = time.perf_counter()
        for _ in range(count):
            os.write(fd, VALUE)
            os.fsync(fd)
        return (time.perf_counter() - start) / count
    finally:
        os.close(fd)
        os.unlink(path)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--appenders", type=int, default=256)
    parser.add_argument("--dir", default=None, help="where to put the database (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for mode in ("full", "normal"):
            await concurrent_appends(os.path.join(tmp, f"{mode}.db"), mode, args.appenders, args.seconds)
        full = await lone_append_latency(os.path.join(tmp, "lone-full.db"), "full", 500)
        normal = await lone_append_latency(os.path.join(tmp, "lone-normal.db"), "normal", 500)
        print(f"one append alone: FULL {full * 1e6:,.0f} us, NORMAL {normal * 1e6:,.0f} us "
              f"-> fsync per commit ~{(full - normal) * 1e6:,.0f} us")
        print(f"raw os.write+fsync on this disk: {raw_fsync(tmp) * 1e6:,.0f} us")


if __name__ == "__main__":
    asyncio.run(main())
