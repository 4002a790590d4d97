"""`stepline worker --processes N` and `stepline dev --processes N`: one worker
process per core on one log, supervised by the command's process.

Real processes on a real sqlite file (and the Kafka broker): the children
split the partitions, every run completes once, a child killed by -9 comes
back and its runs resume, a signal to the supervisor drains every child, and
the supervisor's death takes its children with it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import stepline as sl
from stepline.core.events import PartitionClaimed
from stepline.log import open_log
from stepline.log.base import Assignment, TopicSpec
from stepline.log.sqlite import SqliteLog

from .cli_procs import CliProcs
from .conftest import eventually

APP = Path(__file__).parent / "apps" / "procs_app.py"
TOPIC = "t"


def children_of(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is `pid`."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Procs(CliProcs):
    """`stepline` processes on one log running the processes app."""

    def start(self, *args: str, command: str = "worker") -> subprocess.Popen[bytes]:
        env = dict(os.environ, PROCS_DIR=str(self.state))
        env.pop("STEPLINE_PROCESSES", None)
        extra = ["--console-logs"] if command == "worker" else ["--port", "0"]
        return self.spawn([command, str(APP), "--log", self.url, *extra, *args], env)

    def calls(self) -> list[tuple[str, str, int]]:
        path = self.state / "calls.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [(step, key, int(pid)) for step, key, pid in (line.split() for line in lines)]

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(15)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(f"sqlite:///{tmp_path}/stepline.db", tmp_path)
    yield p
    p.stop_all()


async def claims(client: sl.Client) -> dict[int, PartitionClaimed]:
    """The latest claim of each partition of the runs topic."""
    return {p: ev.body async for p, _, ev in client.events() if isinstance(ev.body, PartitionClaimed)}


def pid_of(claim: PartitionClaimed) -> int:
    return int(claim.worker_id.split("-")[-2])  # host-pid-random


async def two_children(procs: Procs, proc: subprocess.Popen[bytes]) -> set[int]:
    await procs.said(proc, "stepline worker ", times=2)  # each child's banner
    kids = children_of(proc.pid)
    assert len(kids) == 2, kids
    return kids


# --- in one process: the sqlite groups ------------------------------------------------------


async def test_sqlite_members_k_of_n_split_the_partitions_and_a_plain_joiner_waits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    logs = [open_log(url) for _ in range(3)]
    for log in logs:
        await log.start()
    try:
        await logs[0].ensure_topics([TopicSpec(TOPIC, 5)])
        assigned: list[Assignment] = []

        async def on_assign(a: Assignment) -> None:
            assigned.append(a)

        async def no_op(_: frozenset[int]) -> None:
            return None

        logs[0].split_groups(0, 2)
        logs[1].split_groups(1, 2)
        first = await logs[0].join_group("workers", TOPIC, on_assign, no_op)
        second = await asyncio.wait_for(logs[1].join_group("workers", TOPIC, on_assign, no_op), 10)
        assert first.assignment.partitions == {0, 2, 4}
        assert second.assignment.partitions == {1, 3}
        assert await logs[2].group_alive("workers") is True

        # A plain joiner wants every partition: it waits, holding none, while any member lives.
        plain = asyncio.create_task(logs[2].join_group("workers", TOPIC, on_assign, no_op))
        await first.leave()
        rejoined = await asyncio.wait_for(logs[0].join_group("workers", TOPIC, on_assign, no_op), 10)
        assert rejoined.assignment.partitions == {0, 2, 4}  # the plain joiner took none of them
        assert not plain.done()
        await rejoined.leave()
        await second.leave()
        member = await asyncio.wait_for(plain, 10)
        assert member.assignment.partitions == {0, 1, 2, 3, 4}
        assert member.assignment.generation > second.assignment.generation
        await member.leave()
        assert await logs[1].group_alive("workers") is False
    finally:
        for log in logs:
            await log.close()


def test_split_groups_refuses_a_member_outside_its_count(tmp_path: Path) -> None:
    log = open_log(f"sqlite:///{tmp_path}/s.db")
    assert isinstance(log, SqliteLog)
    with pytest.raises(ValueError, match="member 2 of 2"):
        log.split_groups(2, 2)


# --- real processes on sqlite -----------------------------------------------------------------


@pytest.mark.slow
async def test_two_processes_split_the_partitions_and_run_every_run_once(procs: Procs) -> None:
    proc = procs.start("--processes", "2")
    kids = await two_children(procs, proc)
    keys = [f"k{i}" for i in range(40)]
    async with sl.Client(procs.url) as client:
        handles = [await client.trigger("procs", {"key": k}) for k in keys]
        results = [await h.result(timeout=60) for h in handles]
        owners = await claims(client)
    assert [r["key"] for r in results] == [k.upper() for k in keys]
    assert {r["by"] for r in results} == kids  # both processes did work
    assert {pid_of(c) for c in owners.values()} == kids
    nparts = len(owners)
    for kid in kids:
        mine = sorted(p for p, c in owners.items() if pid_of(c) == kid)
        assert mine in ([p for p in range(nparts) if p % 2 == 0], [p for p in range(nparts) if p % 2 == 1])
    counts = Counter((step, key) for step, key, _ in procs.calls())
    assert counts == {(step, k): 1 for k in keys for step in ("one", "two", "three")}
    assert proc.poll() is None


@pytest.mark.slow
async def test_a_concurrency_limit_holds_across_the_processes(procs: Procs) -> None:
    proc = procs.start("--processes", "2")
    kids = await two_children(procs, proc)
    keys = [f"s{i}" for i in range(16)]
    async with sl.Client(procs.url) as client:
        handles = [await client.trigger("serial", {"key": k}) for k in keys]
        results = [await h.result(timeout=120) for h in handles]
    assert {r["by"] for r in results} == kids  # runs of both processes' partitions
    # In the order the bodies wrote them: never a second start before the first's end.
    marks = [(step, key) for step, key, _ in procs.calls()]
    assert marks == [m for k in [key for step, key in marks if step == "start"]
                     for m in (("start", k), ("end", k))]
    assert sorted(k for step, k in marks if step == "end") == sorted(keys)


@pytest.mark.slow
async def test_a_child_killed_by_9_is_restarted_and_its_runs_resume_none_lost_none_rerun(procs: Procs) -> None:
    (procs.state / "block").touch()
    proc = procs.start("--processes", "2")
    kids = await two_children(procs, proc)
    keys = [f"k{i}" for i in range(20)]
    async with sl.Client(procs.url) as client:
        handles = [await client.trigger("procs", {"key": k}) for k in keys]
        await eventually(lambda: all((procs.state / f"in-two-{k}").exists() for k in keys), timeout=60,
                         what="every run to be inside step two")
        ran_two = {key: pid for step, key, pid in procs.calls() if step == "two"}
        victim = ran_two["k0"]
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: len(children_of(proc.pid) - {victim}) == 2, timeout=60,
                         what="the supervisor to start a new child")
        await procs.said(proc, "restarting it")
        (procs.state / "block").unlink()
        results = [await h.result(timeout=60) for h in handles]
    assert [r["key"] for r in results] == [k.upper() for k in keys]  # none lost
    killed = {k for k, pid in ran_two.items() if pid == victim}
    assert killed and kids - {victim}
    counts = Counter((step, key) for step, key, _ in procs.calls())
    # Completed steps never run again; the step the kill cut short runs once more.
    assert counts == {**{("one", k): 1 for k in keys}, **{("three", k): 1 for k in keys},
                      **{("two", k): 2 if k in killed else 1 for k in keys}}
    assert proc.poll() is None


@pytest.mark.slow
async def test_sigterm_to_the_supervisor_drains_every_child(procs: Procs) -> None:
    proc = procs.start("--processes", "2", "--grace", "30")
    kids = await two_children(procs, proc)
    proc.send_signal(signal.SIGTERM)
    assert await procs.exited(proc) == 0, procs.stderr(proc)
    said = procs.stderr(proc)
    assert said.count("stopping: giving the partitions up") == 2, said
    assert not any(alive(k) for k in kids)
    assert "restarting" not in said


@pytest.mark.slow
async def test_a_second_signal_to_the_supervisor_cancels_the_running_steps_at_once(procs: Procs) -> None:
    (procs.state / "block").touch()
    proc = procs.start("--processes", "2", "--grace", "60")
    kids = await two_children(procs, proc)
    keys = [f"k{i}" for i in range(8)]
    async with sl.Client(procs.url) as client:
        for k in keys:
            await client.trigger("procs", {"key": k})
    await eventually(lambda: all((procs.state / f"in-two-{k}").exists() for k in keys), timeout=60,
                     what="every run to be inside step two")
    busy = {pid for step, _, pid in procs.calls() if step == "two"}
    proc.send_signal(signal.SIGTERM)
    # Each child with a step running drains: the step may finish. (A second
    # signal reaching a child before its first would be a first: a drain.)
    await procs.said(proc, "get up to 60 s", times=len(busy))
    proc.send_signal(signal.SIGTERM)
    assert await procs.exited(proc, timeout=30) == 0, procs.stderr(proc)  # long before the grace ends
    assert "cancelling" in procs.stderr(proc)
    assert not any(alive(k) for k in kids)
    assert not any(step == "three" for step, _, _ in procs.calls())  # the blocked steps never ended


@pytest.mark.slow
async def test_kill_9_of_the_supervisor_leaves_no_child_behind(procs: Procs) -> None:
    proc = procs.start("--processes", "2")
    kids = await two_children(procs, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    await eventually(lambda: not any(alive(k) for k in kids), timeout=10, what="every child to die")
    # The partitions are free at once: a new worker takes every one of them.
    again = procs.start()
    await procs.said(again, "partitions [0, 1, 2, 3]")


@pytest.mark.slow
async def test_a_plain_second_worker_waits_as_a_standby_then_takes_every_partition(procs: Procs) -> None:
    members = procs.start("--processes", "2")
    await two_children(procs, members)
    standby = procs.start()
    await procs.said(standby, "waiting as a standby")
    async with sl.Client(procs.url) as client:
        assert await client.log.group_alive(client.topics.worker_group) is True
    members.send_signal(signal.SIGTERM)
    assert await procs.exited(members) == 0, procs.stderr(members)
    await procs.said(standby, "taking over")
    await procs.said(standby, "partitions [0, 1, 2, 3]")


@pytest.mark.slow
async def test_dev_with_two_processes_runs_member_zero_itself_and_supervises_the_other(procs: Procs) -> None:
    dev = procs.start("--processes", "2", command="dev")
    await procs.said(dev, "stepline worker ")  # the child's banner
    await procs.said(dev, "dashboard:")
    kids = children_of(dev.pid)
    assert len(kids) == 1
    keys = [f"k{i}" for i in range(20)]
    async with sl.Client(procs.url) as client:
        results = [await (await client.trigger("procs", {"key": k})).result(timeout=60) for k in keys]
    assert {r["by"] for r in results} == kids | {dev.pid}
    dev.send_signal(signal.SIGTERM)
    assert await procs.exited(dev) == 0, procs.stderr(dev)
    assert not any(alive(k) for k in kids)


# --- bad input ---------------------------------------------------------------------------------


BAD = [
    (["--processes", "0"], {}, "--processes '0' is not a number of processes"),
    (["--processes", "two"], {}, "--processes 'two' is not a number of processes"),
    ([], {"STEPLINE_PROCESSES": "-1"}, "STEPLINE_PROCESSES='-1'"),
]


@pytest.mark.parametrize(("command", "args", "env", "message"), [
    *[(command, *bad) for command in ("worker", "dev") for bad in BAD],
    ("worker", ["--processes", "2", "--http-port", "65535"], {}, "ports 65535-65536, past 65535"),
])
def test_a_bad_processes_value_is_one_clear_line(tmp_path: Path, command: str, args: list[str],
                                                 env: dict[str, str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stepline.cli", command, str(APP), "--log", f"sqlite:///{tmp_path}/s.db", *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=dict(os.environ, **env),
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "s.db").exists()  # nothing opened, nothing written


# --- Kafka -------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_on_kafka_two_processes_are_two_members_and_run_every_run_once(
    kafka_bootstrap: str, tmp_path: Path,
) -> None:
    url = (f"kafka://{kafka_bootstrap}?namespace=procs-{uuid.uuid4().hex[:10]}&partitions=4"
           "&session_timeout_ms=6000&heartbeat_interval_ms=500&rebalance_timeout_ms=20000")
    p = Procs(url, tmp_path)
    try:
        proc = p.start("--processes", "2", "--instance-id", "w")
        kids = await two_children(p, proc)
        keys = [f"k{i}" for i in range(20)]
        async with sl.Client(url) as client:
            async def both_own() -> bool:
                owners = await claims(client)
                return len(owners) == 4 and {pid_of(c) for c in owners.values()} == kids

            await eventually(both_own, timeout=90, what="both children to own partitions")
            handles = [await client.trigger("procs", {"key": k}) for k in keys]
            results = [await h.result(timeout=60) for h in handles]
        assert [r["key"] for r in results] == [k.upper() for k in keys]
        counts = Counter((step, key) for step, key, _ in p.calls())
        assert counts == {(step, k): 1 for k in keys for step in ("one", "two", "three")}
        argvs = [Path(f"/proc/{k}/cmdline").read_text().split("\0") for k in kids]
        assert sorted(a[a.index("--instance-id") + 1] for a in argvs) == ["w-0", "w-1"]
        proc.send_signal(signal.SIGTERM)
        assert await p.exited(proc) == 0, p.stderr(proc)
    finally:
        p.stop_all()
