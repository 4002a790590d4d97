"""A 3-broker KRaft cluster under faults, with a load of runs going all along.

Three Kafka brokers and three Stepline workers run as containers on a
Docker network the test creates (tests/cluster/cluster.py); the test
triggers runs from the host through the brokers' ports published on
127.0.0.1 and reads the log back from there. Topics have three replicas and
min.insync.replicas=2 (the log URL's `replication_factor=3&min_insync_replicas=2`);
every Stepline producer writes with acks=all. While runs of a four-step
task (tests/apps/cluster_app.py) keep coming, the test in turn:

1. SIGKILLs the leader of a busy runs partition, and restarts it later;
2. cuts one worker off the network for longer than its session timeout
   (`docker network disconnect`), then connects it again;
3. pauses another worker (`docker pause`) past its session, then resumes it.

Then, from the log (tests/cluster/checks.py): no acknowledged trigger is
lost and every run has ended; every step is recorded completed exactly once;
no step body began after its checkpoint was accepted; the zombies' late
appends reached the log with their stale epoch and the fold ignored them;
and the state a fresh client folds, the state a worker rebuilds from the
snapshots, and a fold from offset 0 are the same. The figures (runs,
faults, time to recover) are printed, and docs/operations.md quotes them.

Bounded: every wait has a deadline and the whole test takes about three
minutes; containers and network are removed whatever happens. Needs the
Docker engine and the images (scripts/images.sh build, which `make test`
runs): a skip that says why, a failure under CI=true.
STEPLINE_CLUSTER_IMAGE runs the workers on another image than
stepline/stepline:local (to try engine changes without retagging it);
STEPLINE_CLUSTER_URL_OPTIONS adds log URL options on both sides (to see
what e.g. request_timeout_ms=8000 does to the recovery).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

import stepline as sl
from stepline.core.events import PartitionClaimed, StepCompleted
from stepline.log.base import partition_for
from tests.cluster import checks
from tests.cluster.cluster import BROKERS, PARTITIONS, SESSION_TIMEOUT_MS, Cluster
from tests.docker_env import require_images

from .conftest import eventually

pytestmark = pytest.mark.slow

WORKERS = 3
CONCURRENCY = 16
STEP_SECONDS = 0.5
TRIGGER_EVERY_S = 0.25
FAULT_S = 2.5 * SESSION_TIMEOUT_MS / 1000  # cut / paused for well past the session
SETTLE_S = 6.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    images = require_images()
    c = Cluster(images, tmp_path, stepline_image=os.environ.get("STEPLINE_CLUSTER_IMAGE") or None)
    try:
        yield c
    finally:
        c.close()
        assert not c.leftovers(), f"containers or network left behind: {c.leftovers()}"


class Load:
    """Triggers a run every TRIGGER_EVERY_S until stopped; keeps the acknowledged run ids."""

    def __init__(self, client: sl.Client) -> None:
        self.client = client
        self.acknowledged: list[str] = []
        self.refused: list[str] = []
        self._pending: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()

    async def _one(self, n: int) -> None:
        try:
            handle = await asyncio.wait_for(self.client.trigger("cluster-order", n), 60)
        except Exception as exc:  # not acknowledged: not a run the test may expect
            self.refused.append(f"{n}: {exc!r}")
            return
        self.acknowledged.append(handle.run_id)

    async def run(self) -> None:
        n = 0
        while not self._stop.is_set():
            task = asyncio.create_task(self._one(n))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            n += 1
            try:
                await asyncio.wait_for(self._stop.wait(), TRIGGER_EVERY_S)
            except TimeoutError:
                pass

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._pending), 90)


async def _describe(admin: AIOKafkaAdminClient, topic: str) -> dict[int, dict[str, Any]]:
    (found,) = await admin.describe_topics([topic])
    return {p["partition"]: p for p in found["partitions"]}


async def _layout(admin: AIOKafkaAdminClient, topic: str) -> dict[int, dict[str, Any]] | None:
    """Like `_describe`, but None while the admin client's broker is the one just killed."""
    try:
        return await _describe(admin, topic)
    except (KafkaError, OSError):
        return None


async def _brokers(admin: AIOKafkaAdminClient) -> int:
    return len((await admin.describe_cluster())["brokers"])


async def _owners(client: sl.Client) -> dict[int, str]:
    return {p: ev.body.worker_id async for p, _, ev in client.events() if isinstance(ev.body, PartitionClaimed)}


async def _claimed_by(client: sl.Client, host: str, since_ms: int) -> bool:
    """Whether the worker in container `host` has claimed a partition since `since_ms`."""
    async for _, _, ev in client.events():
        body = ev.body
        if isinstance(body, PartitionClaimed) and body.worker_id.startswith(f"{host}-") and ev.time >= since_ms:
            return True
    return False


def _host(worker_id: str | None) -> str:
    return (worker_id or "?").split("-")[0]


def _now_ms() -> int:
    return int(time.time() * 1000)


async def test_three_brokers_and_three_workers_under_faults(cluster: Cluster) -> None:
    started = time.monotonic()
    cluster.start_brokers()
    admin = AIOKafkaAdminClient(bootstrap_servers=cluster.host_bootstrap, request_timeout_ms=10000)
    await eventually(lambda: _start_admin(admin), timeout=120, what="the brokers to answer")
    back_in_sync: asyncio.Task[None] | None = None
    loading: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: _brokers_are(admin, 3), timeout=120, what="three brokers in the cluster")
        async with sl.Client(cluster.host_url()) as client:  # creates the topics: RF 3, min ISR 2
            runs_topic = client.topics.runs
            config = await _topic_config(admin, runs_topic)
            assert config == {"replicas": 3, "min.insync.replicas": "2"}, config
            for _ in range(WORKERS):
                cluster.start_worker(CONCURRENCY, STEP_SECONDS)
            await eventually(lambda: _shared_by(client, WORKERS), timeout=120,
                             what=f"{WORKERS} workers to share the partitions")
            ready = time.monotonic()
            load = Load(client)
            loading = asyncio.create_task(load.run())
            faults, back_in_sync = await _faults(cluster, client, admin, load, runs_topic)
            await load.stop()
            await loading
            acknowledged = list(load.acknowledged)

            async def all_ended() -> bool:
                states = {r.run_id: r for r in await client.list_runs()}
                return not checks.not_ended(states, acknowledged)

            await eventually(all_ended, timeout=180, what="every acknowledged run to end")
            await asyncio.sleep(3)  # late appends of the zombies, if any, land
            try:
                await asyncio.wait_for(back_in_sync, 180)
            except TimeoutError:
                pytest.fail("the restarted broker did not get back into every ISR within 180 s")
            for worker in cluster.workers:
                assert cluster.running(worker), f"{worker} is not running any more"
            await _check(cluster, client, acknowledged, load.refused, faults,
                         setup_s=ready - started, total_s=time.monotonic() - started)
    finally:
        for task in (back_in_sync, loading):
            if task is not None:
                task.cancel()  # after a failure: no triggers or polls left behind
        await admin.close()


async def _start_admin(admin: AIOKafkaAdminClient) -> bool:
    try:
        await admin.start()
    except Exception:
        return False
    return True


async def _brokers_are(admin: AIOKafkaAdminClient, n: int) -> bool:
    try:
        return await _brokers(admin) == n
    except (KafkaError, OSError):
        return False


async def _shared_by(client: sl.Client, workers: int) -> bool:
    owners = await _owners(client)
    return len(owners) == PARTITIONS and len({_host(w) for w in owners.values()}) == workers


async def _topic_config(admin: AIOKafkaAdminClient, topic: str) -> dict[str, Any]:
    partitions = await _describe(admin, topic)
    (resp,) = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    resource = resp.to_object()["resources"][0]
    entries = {c["config_names"]: c["config_value"] for c in resource["config_entries"]}
    return {"replicas": min(len(p["replicas"]) for p in partitions.values()),
            "min.insync.replicas": entries.get("min.insync.replicas")}


async def _faults(cluster: Cluster, client: sl.Client, admin: AIOKafkaAdminClient, load: Load,
                  runs_topic: str) -> tuple[list[dict[str, Any]], asyncio.Task[None]]:
    """The three faults in turn, under load; what happened when, for the checks and figures."""
    faults: list[dict[str, Any]] = []
    await asyncio.sleep(SETTLE_S)

    # 1. The leader of a busy runs partition: the partition of the latest acknowledged run.
    busy = partition_for(load.acknowledged[-1].encode(), PARTITIONS)
    layout = await _describe(admin, runs_topic)
    leader = layout[busy]["leader"]
    led = sorted(p for p, d in layout.items() if d["leader"] == leader)
    at = _now_ms()
    cluster.kill_broker(leader)
    moved = None  # when every partition it led had a new leader (Kafka's part of the recovery)
    while (_now_ms() - at) / 1000 < FAULT_S:
        now = await _layout(admin, runs_topic)
        if moved is None and now is not None and all(now[p]["leader"] not in (leader, -1) for p in led):
            moved = _now_ms()
        await asyncio.sleep(0.5)
    healed = _now_ms()
    cluster.start_broker(leader)

    await eventually(lambda: _brokers_are(admin, len(BROKERS)), timeout=120,
                     what=f"broker k{leader} to register again after its restart")
    broker_fault = {"kind": "broker", "target": f"k{leader}", "partitions": led, "at": at, "healed": healed,
                    "rejoined": None, "moved": moved}
    faults.append(broker_fault)
    # It catches up while the other faults go on; the test waits for it at the end.
    back_in_sync = asyncio.create_task(_back_in_sync(admin, runs_topic, broker_fault))
    await asyncio.sleep(SETTLE_S)

    # 2. Cut off the owner of the latest run's partition; 3. pause another owner.
    for kind in ("cut", "pause"):
        owners = await _owners(client)
        latest = partition_for(load.acknowledged[-1].encode(), PARTITIONS)
        taken = {f["target"] for f in faults}
        candidates = [_host(owners[p]) for p in [latest, *range(PARTITIONS)] if _host(owners[p]) not in taken]
        host = candidates[0]
        container = cluster.workers[int(host[1:]) - 1]
        mine = sorted(p for p, w in owners.items() if _host(w) == host)
        at = _now_ms()
        (cluster.cut if kind == "cut" else cluster.pause)(container)
        await asyncio.sleep(FAULT_S)
        healed = _now_ms()
        (cluster.heal if kind == "cut" else cluster.resume)(container)
        await eventually(lambda h=host, t=healed: _claimed_by(client, h, t), timeout=120,  # type: ignore[misc]
                         what=f"{host} to own a partition again after the {kind}")
        faults.append({"kind": kind, "target": host, "partitions": mine, "at": at, "healed": healed,
                       "rejoined": _now_ms()})
        await asyncio.sleep(SETTLE_S)
    return faults, back_in_sync


async def _back_in_sync(admin: AIOKafkaAdminClient, topic: str, fault: dict[str, Any]) -> None:
    """Note when the restarted broker is back in every runs partition's ISR."""
    while True:
        now = await _layout(admin, topic)
        if now is not None and all(len(d["isr"]) == len(BROKERS) for d in now.values()):
            fault["rejoined"] = _now_ms()
            return
        await asyncio.sleep(1)


def _recovery(topic: checks.RunsTopic, fault: dict[str, Any]) -> float:
    """Seconds from the fault until every partition it hit accepted a checkpoint again
    (written by a broker that leads it now, or by a worker that owns it now)."""
    worst = 0.0
    for p in fault["partitions"]:
        firsts = [e.appended_ms for e in topic.events
                  if e.partition == p and e.accepted and isinstance(e.event.body, StepCompleted)
                  and e.appended_ms > fault["at"]
                  and (fault["kind"] == "broker" or _host(topic.owner_at(p, e.appended_ms)) != fault["target"])]
        assert firsts, f"partition {p} accepted no checkpoint after the {fault['kind']} of {fault['target']}"
        worst = max(worst, (min(firsts) - fault["at"]) / 1000)
    return worst


async def _check(cluster: Cluster, client: sl.Client, acknowledged: list[str], refused: list[str],
                 faults: list[dict[str, Any]], *, setup_s: float, total_s: float) -> None:
    topic = await checks.read_runs_topic(client, PARTITIONS)
    runs = topic.runs
    done = checks.executions(cluster.records / "steps.log")

    lost = checks.not_ended(runs, acknowledged)
    assert not lost, f"{len(lost)} acknowledged runs lost or not ended: {lost[:10]}"
    statuses = {runs[rid].status for rid in acknowledged}
    assert statuses == {"completed"}, {rid: runs[rid].status for rid in acknowledged if runs[rid].status != "completed"}
    unasked = set(runs) - set(acknowledged)  # a trigger that timed out may still have landed
    assert len(unasked) <= len(refused), f"runs on the log that nobody triggered: {sorted(unasked)[:10]}"

    checkpoints = checks.accepted_checkpoints(topic)
    twice = {k: len(v) for k, v in checkpoints.items() if len(v) != 1}
    assert not twice, f"steps recorded completed more than once: {twice}"
    assert all((rid, s) in checkpoints for rid in acknowledged for s in range(4)), "a completed run lacks a checkpoint"

    duplicates = checks.started_after_checkpoint(topic, done)
    assert not duplicates, f"{len(duplicates)} completed steps executed again:\n" + "\n".join(duplicates[:20])

    fenced = topic.fenced()
    zombies = {_host(topic.claimer(e.partition, e.event.epoch)) for e in fenced}
    for f in faults:
        if f["kind"] != "broker":  # the worker was in steps when it went: its late checkpoints were fenced
            assert f["target"] in zombies, f"no late append of the {f['kind']} worker {f['target']} was fenced"
    ignored = checks.fenced_checkpoints_ignored(topic)
    assert not ignored, "\n".join(ignored)

    folded = await client.list_runs()
    assert {r.run_id: r for r in folded} == runs, "a fresh client's fold differs from the fold from offset 0"
    rebuilt = await checks.rebuilt_from_snapshots(client, PARTITIONS)
    differ = [rid for rid in runs if rebuilt.get(rid) != runs[rid]]
    assert not differ and set(rebuilt) == set(runs), f"snapshot + tail differs from offset 0 for {differ[:10]}"

    again = checks.reexecuted(done)
    print(f"\ncluster under faults: {len(acknowledged)} runs ({len(refused)} triggers refused), "
          f"{len(acknowledged) * 4} steps; 3 brokers (RF 3, min ISR 2, acks=all), {WORKERS} workers")
    print(f"  lost runs 0, steps recorded twice 0, completed steps begun again 0; in-flight steps "
          f"run again {sum(again.values())}; fenced late appends {len(fenced)} (from {', '.join(sorted(zombies))}); "
          f"events on the log {len(topic.events)}")
    for f in faults:
        back = "back in every ISR" if f["kind"] == "broker" else "owning partitions again"
        moved = f"; new leaders after {(f['moved'] - f['at']) / 1000:.1f} s" if f.get("moved") else ""
        print(f"  {f['kind']:6} {f['target']} for {(f['healed'] - f['at']) / 1000:.1f} s (partitions "
              f"{f['partitions']}){moved}; checkpoints flowing again on all of them after "
              f"{_recovery(topic, f):.1f} s; {back} {(f['rejoined'] - f['healed']) / 1000:.1f} s after the heal")
    print(f"  setup {setup_s:.0f} s, whole test {total_s:.0f} s")
