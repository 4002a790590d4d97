"""A damaged embedded log: torn tails, flipped bytes, a full disk.

What must hold whatever the damage: no acknowledged (fsynced) event goes
missing without a word. Either SQLite's own recovery drops exactly the
transaction that never finished, and a restarted worker completes every
run whose trigger was acknowledged, or opening the log fails with an error
that names the file and the problem.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import stepline as sl
from stepline.errors import LogCorrupted, LogWriteFailed
from stepline.log.base import TopicSpec
from stepline.log.sqlite import SqliteLog

from .conftest import IN_CI, eventually

CRASHY = Path(__file__).parent / "apps" / "crashy.py"
WAL_HEADER = 32
FRAME_HEADER = 24


def start_worker(url: str, state: Path) -> subprocess.Popen[bytes]:
    with open(state / "worker.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "stepline.cli", "worker", str(CRASHY), "--log", url],
            env=dict(os.environ, CRASHY_DIR=str(state)), stdout=subprocess.DEVNULL, stderr=log,
        )


def executions(state: Path) -> Counter[str]:
    path = state / "calls.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(line.split()[0] for line in lines)


def _wal_checksum(data: bytes, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's cumulative WAL checksum over `data` (8-byte steps), from (s0, s1)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def wal_transactions(wal: Path) -> tuple[int, list[list[int]]]:
    """The page size and the committed transactions in a WAL file, each as
    the file offsets of its frames, as SQLite's recovery reads them: frames
    of an older WAL generation (other salts), frames whose cumulative
    checksum does not follow from the ones before, and an unfinished
    transaction at the end are left out. (A writer killed after writing its
    frames but before publishing them in the wal-index leaves them behind;
    the next writer writes over the first of them, and what is left of the
    dead one's no longer chains: it is not a transaction.)"""
    data = wal.read_bytes()
    big_endian = int.from_bytes(data[0:4], "big") & 1 == 1
    page = int.from_bytes(data[8:12], "big")
    salts = data[16:24]
    s0, s1 = _wal_checksum(data[:24], 0, 0, big_endian)
    assert (s0, s1) == (int.from_bytes(data[24:28], "big"), int.from_bytes(data[28:32], "big")), "bad WAL header"
    done: list[list[int]] = []
    current: list[int] = []
    off = WAL_HEADER
    while off + FRAME_HEADER + page <= len(data) and data[off + 8:off + 16] == salts:
        c0, c1 = _wal_checksum(data[off:off + 8] + data[off + FRAME_HEADER:off + FRAME_HEADER + page], s0, s1,
                               big_endian)
        if (c0, c1) != (int.from_bytes(data[off + 16:off + 20], "big"), int.from_bytes(data[off + 20:off + 24], "big")):
            break
        s0, s1 = c0, c1
        current.append(off)
        if int.from_bytes(data[off + 4:off + 8], "big"):  # db size set: a commit frame
            done.append(current)
            current = []
        off += FRAME_HEADER + page
    return page, done


# A process that commits one more trigger straight into the file and then
# waits to be killed, so that its transaction stays in the WAL, unmerged.
LAST_WRITER = textwrap.dedent("""
    import sqlite3, sys, time
    from stepline.core import codec
    from stepline.core.events import JSON, Event, Payload, RunTriggered
    from stepline.core.ids import new_event_id, new_run_id
    from stepline.log.base import partition_for

    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("PRAGMA synchronous = FULL")
    tid, parts = conn.execute("SELECT id, partitions FROM topics WHERE name = 'stepline.runs'").fetchone()
    run_id = new_run_id()
    body = RunTriggered(Payload(JSON, b'{"order_id": "late"}'))
    event = Event(new_event_id(), body.TYPE, run_id, "crashy", 1, 0, 0, body)
    p = partition_for(run_id.encode(), parts)
    conn.execute("BEGIN IMMEDIATE")
    top = conn.execute("SELECT MAX(offset) FROM records WHERE topic_id = ? AND partition = ?", (tid, p)).fetchone()[0]
    conn.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?, ?)",
                 (tid, p, 0 if top is None else top + 1, run_id.encode(), codec.encode(event), 0))
    conn.execute("COMMIT")
    print(run_id, flush=True)
    time.sleep(3600)
""")


def damage_last_transaction(wal: Path, how: str) -> None:
    page, transactions = wal_transactions(wal)
    assert transactions, f"{wal} holds no committed transaction: it was checkpointed too early"
    last = transactions[-1][-1]  # the commit frame of the last transaction
    if how == "torn":
        # Power went out while the commit frame was being written.
        with open(wal, "r+b") as f:
            f.truncate(last + FRAME_HEADER + page // 2)
    elif how == "flipped":
        # The commit frame reached the disk with bytes of its page wrong.
        with open(wal, "r+b") as f:
            f.seek(last + FRAME_HEADER + page // 2)
            chunk = f.read(16)
            f.seek(last + FRAME_HEADER + page // 2)
            f.write(bytes(b ^ 0x5A for b in chunk))
    else:
        # The last transaction is whole; the next one got half a frame out.
        assert how == "half-frame-after"
        data = wal.read_bytes()
        header = bytearray(data[last:last + FRAME_HEADER])
        header[4:8] = (0).to_bytes(4, "big")  # not a commit frame
        with open(wal, "ab") as f:
            f.write(bytes(header) + os.urandom(page // 2))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torn", "flipped", "half-frame-after"])
async def test_a_damaged_wal_tail_loses_only_the_unfinished_transaction_and_every_acknowledged_run_completes(
    tmp_path: Path, how: str,
) -> None:
    db = tmp_path / "stepline.db"
    url = f"sqlite:///{db}"
    (tmp_path / "block").touch()
    orders = [f"o{i}" for i in range(5)]
    worker = start_worker(url, tmp_path)
    writer: subprocess.Popen[bytes] | None = None
    try:
        async with sl.Client(url) as client:
            handles = [await client.trigger("crashy", {"order_id": o}) for o in orders]
            await eventually(lambda: all((tmp_path / f"in-two-{o}").exists() for o in orders),
                             timeout=60, what="every run to be inside step two")
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            writer = subprocess.Popen([sys.executable, "-c", LAST_WRITER, str(db)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert writer.stdout is not None
            late_run = (await asyncio.to_thread(writer.stdout.readline)).decode().strip()
            assert late_run.startswith("run_"), writer.stderr.read().decode() if writer.stderr else ""
        # The writer is still connected, so closing the client merged nothing
        # into the database file: the WAL ends with the writer's transaction.
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
        damage_last_transaction(Path(f"{db}-wal"), how)
        (tmp_path / "block").unlink()

        worker = start_worker(url, tmp_path)
        async with sl.Client(url) as client:
            # (The handles' client is closed; this one waits for their runs.)
            ended = [await client.wait(h.run_id, timeout=60) for h in handles]
            results = [json.loads(st.output.data) for st in ended if st.output is not None]
            assert results == [{"order": o, "confirmation": f"CHARGED 30 FOR {o.upper()}"} for o in orders]
            if how == "half-frame-after":
                # The transaction itself was whole: it counts, and its run runs.
                assert (await client.wait(late_run, timeout=60)).status == "completed"
                expected = {"one": 6, "two": 11, "three": 6}
            else:
                with pytest.raises(sl.UnknownRun):
                    await client.get_run(late_run)
                expected = {"one": 5, "two": 10, "three": 5}
            # Step one was checkpointed before the kill: never again. Step two
            # was in flight: once more on the restarted worker.
            assert executions(tmp_path) == expected
            runs = await client.list_runs()  # a rebuild from offset 0
            assert len(runs) == len(handles) + (how == "half-frame-after")
            assert all(r.status == "completed" for r in runs)
            for h in handles:
                history = [ev.type for _, ev in await client.history(h.run_id)]
                assert history.count("StepCompleted") == 3 and history.count("RunCompleted") == 1
        check = sqlite3.connect(db)
        try:
            assert check.execute("PRAGMA quick_check").fetchall() == [("ok",)]
        finally:
            check.close()
    finally:
        for proc in (worker, writer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


# --- damage to the database file itself ---------------------------------------------


async def filled_log(db: Path, records: int = 1000) -> list[bytes]:
    values = [f"event {i} ".encode() + os.urandom(200) for i in range(records)]
    async with SqliteLog(db) as log:
        await log.ensure_topics([TopicSpec("t", 1)])
        for i in range(0, records, 50):
            await log.append("t", 0, [(b"k", v) for v in values[i:i + 50]])
    assert not Path(f"{db}-wal").exists()  # closed cleanly: everything is in the file
    return values


async def read_all(db: Path) -> list[bytes]:
    async with SqliteLog(db) as log:
        end = await log.end_offset("t", 0)
        out: list[bytes] = []
        while len(out) < end:
            recs = await log.read("t", 0, len(out), 5000)
            assert recs, "the log ended before its end offset"
            out += [r.value for r in recs]
        return out


def damage_file(db: Path, how: str) -> None:
    size = db.stat().st_size
    page = 4096
    with open(db, "r+b") as f:
        if how == "cut-mid-page":
            f.truncate(size - page // 2)
        elif how == "cut-last-page":
            f.truncate(size - page)
        elif how == "zeroed-last-page":
            f.seek(size - page)
            f.write(bytes(page))
        elif how == "flipped-last-page-header":
            f.seek(size - page)
            head = f.read(12)
            f.seek(size - page)
            f.write(bytes(b ^ 0xFF for b in head))
        else:
            assert how == "overwritten-file-header"
            f.write(os.urandom(100))


@pytest.mark.parametrize("how", ["cut-mid-page", "cut-last-page", "zeroed-last-page",
                                 "flipped-last-page-header", "overwritten-file-header"])
async def test_a_damaged_database_file_is_refused_with_the_file_and_the_problem(tmp_path: Path, how: str) -> None:
    db = tmp_path / "log.db"
    values = await filled_log(db)
    assert await read_all(db) == values
    damage_file(db, how)
    before = hashlib.sha256(db.read_bytes()).hexdigest()

    with pytest.raises(LogCorrupted) as info:
        await read_all(db)
    message = str(info.value)
    assert str(db) in message and "damaged" in message and ".recover" in message
    assert not info.value.retriable
    # Refusing it changed nothing: the damage is still there to be salvaged.
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


async def test_a_worker_on_a_torn_log_exits_with_the_file_and_the_problem(tmp_path: Path) -> None:
    db = tmp_path / "stepline.db"
    await filled_log(db, 200)
    damage_file(db, "cut-mid-page")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "stepline.cli", "worker", str(CRASHY), "--log", f"sqlite:///{db}"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, CRASHY_DIR=str(tmp_path)),
    )
    assert done.returncode != 0
    assert str(db) in done.stderr and "middle of a page" in done.stderr, done.stderr[-2000:]


# --- a full disk ------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs; needs root and mount rights, else the test skips."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here: {done.stderr.decode().strip()}"
        if IN_CI:
            pytest.fail(f"CI runs as root and must test a real full disk; {reason}")
        pytest.skip(f"{reason} (a failure under CI=true)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of the disk with a file; remove it to free them."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(bytes(64 * 1024))
                f.flush()
        except OSError:
            pass
    return filler


async def test_after_a_full_disk_empties_appends_work_and_every_acknowledged_record_is_intact(
    tiny_disk: Path,
) -> None:
    db = tiny_disk / "log.db"
    acknowledged: list[bytes] = []
    async with SqliteLog(db) as log:
        await log.ensure_topics([TopicSpec("t", 1)])
        for i in range(20):
            batch = [f"{i}-{j} ".encode() + os.urandom(100) for j in range(20)]
            await log.append("t", 0, [(b"k", v) for v in batch])
            acknowledged += batch
        filler = fill(tiny_disk)
        refused = 0
        for i in range(50):  # the WAL may still have room for a few
            try:
                batch = [f"more-{i} ".encode() + os.urandom(2000) for _ in range(20)]
                await log.append("t", 0, [(b"k", v) for v in batch])
                acknowledged += batch
            except LogWriteFailed as exc:
                assert str(db) in str(exc) and "full" in str(exc).lower()
                refused += 1
        assert refused > 0, "the disk never filled up"

        filler.unlink()
        after = [b"after " + os.urandom(100) for _ in range(20)]
        assert await log.append("t", 0, [(b"k", v) for v in after]) == list(
            range(len(acknowledged), len(acknowledged) + 20))
        acknowledged += after
    # Reopened from the file: every acknowledged record, in order, no others.
    assert await read_all(db) == acknowledged


FLEET = Path(__file__).parent / "apps" / "fleet.py"


@pytest.mark.slow
async def test_runs_in_flight_when_the_disk_fills_complete_once_space_returns(tiny_disk: Path) -> None:
    db = tiny_disk / "stepline.db"
    url = f"sqlite:///{db}"
    state = tiny_disk.parent / "state"
    state.mkdir()
    (state / "hold").touch()
    worker = subprocess.Popen(
        [sys.executable, "-m", "stepline.cli", "worker", str(FLEET), "--log", url],
        env=dict(os.environ, FLEET_DIR=str(state)), stdout=subprocess.DEVNULL,
        stderr=open(state / "worker.log", "wb"),  # noqa: SIM115
    )
    filler: Path | None = None
    try:
        async with sl.Client(url) as client:
            handles = [await client.trigger("fleet", {"n": i}) for i in range(5)]
            await eventually(lambda: all((state / f"held-{h.run_id}").exists() for h in handles),
                             timeout=60, what="every run to be held in step two")
            filler = fill(tiny_disk)
            (state / "hold").unlink()  # step two ends now, with nowhere to write its checkpoint
            await asyncio.sleep(2.0)  # the worker meets the full disk
            filler.unlink()
            filler = None
            results = [await h.result(timeout=60) for h in handles]
            assert [r["result"] for r in results] == [(i * 2 + 1) * 10 for i in range(5)]
            runs = await client.list_runs()  # a rebuild from offset 0
            assert len(runs) == 5 and all(r.status == "completed" for r in runs)
        assert b"SQLITE_FULL" in (state / "worker.log").read_bytes(), "the worker never met the full disk"
        calls = Counter(step for _, step in (line.split()[:2] for line in
                                            (state / "calls.log").read_text().splitlines()))
        # Step one was checkpointed before the disk filled: never again.
        assert calls["one"] == 5 and calls["three"] == 5
        assert calls["two"] >= 5
    finally:
        if filler is not None:
            filler.unlink()
        worker.kill()
        worker.wait(10)
