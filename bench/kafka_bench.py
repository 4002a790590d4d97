"""Stepline on Kafka, and the same broker's raw limit, measured in one run.

    stepline-kafka  Client + Worker on one KafkaLog in one process (as
                    `workloads.embedded` wires them for sqlite), a fresh
                    namespace per repetition, 6 partitions:
      k_throughput    3-step no-op task at 16 / 256 runs in flight: runs/s,
                      events/s (records appended, counted at the log)
      k_latency       1- and 10-step task, one run at a time: p50/p99
      k_slope         ms per step between the two p50s
      k_workers       3-step no-op task run by THREE `stepline worker`
                      processes (bench/sl_tasks.py), triggered from this
                      process with up to 512 in flight: runs/s, events/s,
                      CPU s per 1,000 runs (workers + driver; the broker's
                      apart, when its pid is known from scripts/kafka.sh)
    aiokafka-raw    plain aiokafka on the same broker, acks=all and
                    enable_idempotence=True, ~150-byte records, one topic of
                    6 partitions:
      k_raw_produce   N records with up to 256 sends in flight: acked
                      records/s, and the end-to-end produce -> consume rate
                      of a consumer reading them back concurrently
      k_raw_single    one record at a time (send_and_wait): p50/p99

The broker comes from tests/kafka_broker.py `ensure_broker()` (reuses one
on KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:19092 via scripts/kafka.sh, or
starts one). Topics made here are deleted at the end of each measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import sl_tasks
import workloads

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 6
CAPS = (16, 256)
STEP_COUNTS = (1, 10)
WORKERS = 3
WORKERS_IN_FLIGHT = 512
SETTLE_TIMEOUT_S = 90.0
RECORD_BYTES = 150
RAW_IN_FLIGHT = 256


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"a_runs": {16: 80, 256: 300}, "a_warmup": {16: 16, 256: 64},
                "b_runs": {1: 10, 10: 10}, "b_warmup": 2,
                "raw_records": 3000, "raw_single": 30,
                "w_runs": 300, "w_warmup": 64}
    return {"a_runs": {16: 800, 256: 3000}, "a_warmup": {16: 50, 256: 256},
            "b_runs": {1: 100, 10: 50}, "b_warmup": 5,
            "raw_records": 50000, "raw_single": 300,
            "w_runs": 3000, "w_warmup": 512}


def get_broker() -> str:
    """Bootstrap servers; raises (with the reasons) when none can be had."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import kafka_broker
    finally:
        sys.path.remove(str(ROOT / "tests"))
    bootstrap = kafka_broker.ensure_broker()
    # KAFKA_BOOTSTRAP_SERVERS is taken as is there: check one broker answers.
    reasons = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
            return bootstrap
        except (OSError, ValueError) as exc:
            reasons.append(f"{server}: {exc}")
    raise ConnectionError(f"no broker of {bootstrap!r} answers: {'; '.join(reasons)}")


def fresh_namespace(prefix: str = "bench") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def log_url(bootstrap: str, namespace: str, partitions: int = PARTITIONS) -> str:
    return f"kafka://{bootstrap}?namespace={namespace}&partitions={partitions}"


async def delete_namespace(bootstrap: str, namespace: str) -> None:
    """Best effort: drop the topics a measurement made (keeps the broker small)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        await admin.start()
        names = [t for t in await admin.list_topics() if t.startswith(namespace + ".")]
        if names:
            await admin.delete_topics(names)
    except Exception:  # noqa: BLE001 - cleanup only
        pass
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


class _Counter:
    def __init__(self) -> None:
        self.calls = 0
        self.records = 0


@contextlib.asynccontextmanager
async def embedded(bootstrap: str, namespace: str) -> AsyncIterator[tuple[Any, Any, _Counter]]:
    """workloads.embedded on a KafkaLog, plus a count of appended records
    (the KafkaLog keeps no writer counters; the count wraps this instance's
    `append`, which both client and worker call)."""
    try:
        async with workloads.embedded(log_url(bootstrap, namespace)) as (client, worker):
            counter = _Counter()
            log = client.log
            inner = log.append

            async def counted(topic: str, partition: int, records: Any, headers: Any = None) -> list[int]:
                counter.calls += 1
                counter.records += len(records)
                return await inner(topic, partition, records, headers)

            log.append = counted
            yield client, worker, counter
    finally:
        await delete_namespace(bootstrap, namespace)


async def throughput(bootstrap: str, cap: int, n: int, warmup: int) -> dict[str, Any]:
    """Workload a on Kafka: 3-step task at `cap` in flight."""
    async with embedded(bootstrap, fresh_namespace()) as (client, worker, ctr):
        w = await workloads.drive(client, sl_tasks.noop3, sl_tasks.expected_noop3, warmup, cap,
                                  base=10**9)
        c0, r0 = ctr.calls, ctr.records
        # The broker's CPU too (its JVM, when scripts/kafka.sh started it):
        # the process here is client and worker in one.
        broker = script_broker_pid(bootstrap)
        bcpu0 = proc_cpu_s(broker) if broker else 0.0
        cpu0, t0 = time.process_time(), time.perf_counter()
        r = await workloads.drive(client, sl_tasks.noop3, sl_tasks.expected_noop3, n, cap)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        bcpu = proc_cpu_s(broker) - bcpu0 if broker else None
        c1, r1 = ctr.calls, ctr.records
        await workloads._settle(worker, "noop3", warmup + n)
        errors = w.errors + r.errors
        if r.completed != n or w.completed != warmup:
            errors.append(f"completed {r.completed}/{n} (warm-up {w.completed}/{warmup})")
        workloads._check_worker(worker, "noop3", warmup + n, errors)
    events = r1 - r0
    return {"ok": not errors, "errors": errors, "metrics": {
        "runs": n, "completed": r.completed, "elapsed_s": elapsed,
        "runs_per_s": r.completed / elapsed,
        "events_per_s_nominal": 9 * r.completed / elapsed,
        "events_written": events,
        "events_per_run_measured": events / max(r.completed, 1),
        "events_per_s_measured": events / elapsed,
        "append_calls": c1 - c0,
        "events_per_append": events / max(c1 - c0, 1),
        "cpu_s_per_1000_runs": 1000 * cpu / max(r.completed, 1),
        "cpu_s_per_1000_runs_broker": 1000 * bcpu / max(r.completed, 1) if bcpu is not None else None,
        "cpu_utilisation": cpu / elapsed,
        "processes": "client + worker in one process; the broker apart",
    }}


async def step_latency(bootstrap: str, steps: int, n: int, warmup: int) -> dict[str, Any]:
    """Checkpoint latency on Kafka: single runs of the `steps`-step task, one at a time."""
    task = sl_tasks.STEPS_TASKS[steps]
    expected = lambda x: sl_tasks.expected_steps(steps, x)  # noqa: E731
    async with embedded(bootstrap, fresh_namespace()) as (client, worker, ctr):
        w = await workloads.drive(client, task, expected, warmup, 1, base=10**9)
        c0, r0 = ctr.calls, ctr.records
        r = await workloads.drive(client, task, expected, n, 1, record_latency=True)
        c1, r1 = ctr.calls, ctr.records
        await workloads._settle(worker, task.id, warmup + n)
        errors = w.errors + r.errors
        if r.completed != n:
            errors.append(f"completed {r.completed}/{n}")
        workloads._check_worker(worker, task.id, warmup + n, errors)
    ms = [x * 1000 for x in r.latencies]
    pct = workloads._pct
    return {"ok": not errors, "errors": errors, "metrics": {
        "steps": steps, "runs": n, "completed": r.completed,
        "p50_ms": pct(ms, 0.5), "p99_ms": pct(ms, 0.99),
        "mean_ms": statistics.fmean(ms) if ms else float("nan"),
        "appends_per_run": (c1 - c0) / max(n, 1),
        "events_per_run": (r1 - r0) / max(n, 1),
    }}


# --- several worker processes ------------------------------------------------------

TASKS_FILE = Path(__file__).resolve().parent / "sl_tasks.py"  # has a module-level `registry`
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rpartition(")")[2].split()  # the name may hold spaces
    return (int(rest[11]) + int(rest[12])) / _CLK_TCK  # fields 14, 15 of proc(5)


def script_broker_pid(bootstrap: str) -> int | None:
    """The pid of scripts/kafka.sh's broker when it is the one at `bootstrap`."""
    state = Path(os.environ.get("KAFKA_STATE_DIR") or ROOT / ".kafka")
    try:
        pid = int((state / "broker.pid").read_text().strip())
        addr = (state / "bootstrap").read_text().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if b"kafka.Kafka" not in cmdline or addr.split(",")[0] != bootstrap.split(",")[0].strip():
        return None
    return pid


async def _owners(client: Any) -> dict[int, str]:
    """The worker that last claimed each partition of the runs topic (as
    tests/test_kafka_workers.py reads it: PartitionClaimed events)."""
    from stepline.core import codec
    from stepline.core.events import PartitionClaimed

    out: dict[int, str] = {}
    topic = client.topics.runs
    for p in range(await client.log.partitions(topic)):
        end = await client.log.end_offset(topic, p)
        offset = 0
        while offset < end:
            for rec in await client.log.read(topic, p, offset, 5000):
                offset = rec.offset + 1
                ev = codec.decode(rec.value)
                if isinstance(ev.body, PartitionClaimed):
                    out[p] = ev.body.worker_id
    return out


async def _records(client: Any) -> int:
    """Records in all of the namespace's topics (sum of end offsets)."""
    total = 0
    for spec in client.topics.specs():
        for p in range(await client.log.partitions(spec.name)):
            total += await client.log.end_offset(spec.name, p)
    return total


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (the worker's clean shutdown), then kill what is left."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


async def workers_throughput(bootstrap: str, n: int, warmup: int, workers: int = WORKERS,
                             cap: int = WORKERS_IN_FLIGHT) -> dict[str, Any]:
    """3-step task executed by `workers` `stepline worker` processes, triggered
    from this process (a Client only, no Worker) with up to `cap` in flight."""
    import stepline as sl

    sys.setswitchinterval(0.0005)  # as the worker processes set it
    ns = fresh_namespace("bench-w")
    url = log_url(bootstrap, ns)
    errors: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    logdir = Path(tempfile.mkdtemp(prefix="stepline-bench-workers-"))
    broker = script_broker_pid(bootstrap)
    try:
        # The driver's Client makes the topics before any worker starts.
        async with sl.Client(url, registry=sl_tasks.registry) as client:
            for i in range(workers):
                with (logdir / f"worker-{i}.log").open("wb") as err:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "stepline.cli", "worker", str(TASKS_FILE),
                         "--log", url, "--concurrency", str(workloads.WORKER_CONCURRENCY)],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                        cwd=ROOT))
            t_start = time.perf_counter()
            while True:
                dead = [i for i, p in enumerate(procs) if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"worker(s) {dead} exited before settling: "
                                       f"{_tail(logdir / f'worker-{dead[0]}.log')} (logs in {logdir})")
                owners = await _owners(client)
                if len(owners) == PARTITIONS and len(set(owners.values())) == workers:
                    break
                if time.perf_counter() - t_start > SETTLE_TIMEOUT_S:
                    raise TimeoutError(f"{workers} workers did not share the {PARTITIONS} "
                                       f"partitions in {SETTLE_TIMEOUT_S:.0f} s: owners {owners} "
                                       f"(logs in {logdir})")
                await asyncio.sleep(0.25)
            settle_s = time.perf_counter() - t_start

            w = await workloads.drive(client, sl_tasks.noop3, sl_tasks.expected_noop3, warmup, cap,
                                      base=10**9)
            rec0 = await _records(client)
            wcpu0 = [proc_cpu_s(p.pid) for p in procs]
            bcpu0 = proc_cpu_s(broker) if broker else None
            cpu0, t0 = time.process_time(), time.perf_counter()
            r = await workloads.drive(client, sl_tasks.noop3, sl_tasks.expected_noop3, n, cap)
            elapsed, dcpu = time.perf_counter() - t0, time.process_time() - cpu0
            wcpu = [proc_cpu_s(p.pid) - c for p, c in zip(procs, wcpu0, strict=True)]
            bcpu = proc_cpu_s(broker) - bcpu0 if broker and bcpu0 is not None else None
            rec1 = await _records(client)
            owners_after = await _owners(client)
            errors += w.errors + r.errors
            if r.completed != n or w.completed != warmup:
                errors.append(f"completed {r.completed}/{n} (warm-up {w.completed}/{warmup})")
            dead = [i for i, p in enumerate(procs) if p.poll() is not None]
            if dead:
                errors.append(f"worker(s) {dead} exited during the run: "
                              f"{_tail(logdir / f'worker-{dead[0]}.log')}")
    finally:
        _stop(procs)
        await delete_namespace(bootstrap, ns)
    for i, p in enumerate(procs):
        if p.returncode not in (0, -signal.SIGTERM) and not errors:
            errors.append(f"worker {i} exited {p.returncode} on SIGTERM: "
                          f"{_tail(logdir / f'worker-{i}.log')}")
    done = max(r.completed, 1)
    total_cpu = sum(wcpu) + dcpu
    metrics: dict[str, Any] = {
        "runs": n, "completed": r.completed, "workers": workers, "in_flight": cap,
        "worker_concurrency": workloads.WORKER_CONCURRENCY, "settle_s": settle_s,
        "elapsed_s": elapsed, "runs_per_s": r.completed / elapsed,
        "events_per_s_nominal": 9 * r.completed / elapsed,
        "records_written": rec1 - rec0, "records_per_run": (rec1 - rec0) / done,
        "cpu_s_per_1000_runs": 1000 * total_cpu / done,
        "cpu_s_per_1000_runs_workers": 1000 * sum(wcpu) / done,
        "cpu_s_per_1000_runs_driver": 1000 * dcpu / done,
        "cpu_s_per_1000_runs_broker": 1000 * bcpu / done if bcpu is not None else None,
        "worker_cpu_s": wcpu, "driver_cpu_s": dcpu, "broker_cpu_s": bcpu,
        "cpu_utilisation": (total_cpu + (bcpu or 0.0)) / elapsed,
        "cpus": os.cpu_count(),
        "rebalanced_during_run": owners_after != owners,
        "aim_runs_per_s": 1500, "vs_aim": r.completed / elapsed / 1500,
    }
    if not errors:
        import shutil

        shutil.rmtree(logdir, ignore_errors=True)
    else:
        errors.append(f"worker logs kept in {logdir}")
    return {"ok": not errors, "errors": errors, "metrics": metrics}


# --- raw aiokafka ----------------------------------------------------------------


def _producer(bootstrap: str) -> Any:
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                            client_id="bench-raw")


async def _make_topic(bootstrap: str, name: str, partitions: int) -> None:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        # -1 + an empty assignment map = the broker's default replication (as KafkaLog does)
        await admin.create_topics([NewTopic(name, partitions, -1, replica_assignments={})])
    finally:
        await admin.close()
    meta = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await meta.start()
    try:
        deadline = time.monotonic() + 30
        while len(meta.partitions_for_topic(name) or ()) < partitions:
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name} has no {partitions} partitions in metadata")
            await meta._client.force_metadata_update()
            await asyncio.sleep(0.05)
    finally:
        await meta.stop()


async def raw_produce(bootstrap: str, n: int, in_flight: int = RAW_IN_FLIGHT) -> dict[str, Any]:
    """N ~150-byte records, keyed round the 6 partitions, at most `in_flight`
    sends unacknowledged; a consumer reads them back concurrently."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    ns = fresh_namespace("bench-raw")
    topic = f"{ns}.events"
    errors: list[str] = []
    await _make_topic(bootstrap, topic, PARTITIONS)
    producer = _producer(bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", client_id="bench-raw-consumer")
    await producer.start()
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        await consumer.seek_to_beginning()
        # Warm the producer's connection and idempotence id.
        await producer.send_and_wait(topic, b"w" * RECORD_BYTES, partition=0)
        payload = os.urandom(RECORD_BYTES // 2).hex().encode()[:RECORD_BYTES]
        consumed = 0
        want = n + 1  # + the warm-up record
        consumed_at = 0.0

        async def consume() -> None:
            nonlocal consumed, consumed_at
            while consumed < want:
                batches = await consumer.getmany(timeout_ms=200, max_records=10000)
                for recs in batches.values():
                    for rec in recs:
                        if len(rec.value) != RECORD_BYTES:
                            errors.append(f"record of {len(rec.value)} bytes")
                consumed += sum(len(v) for v in batches.values())
            consumed_at = time.perf_counter()

        sem = asyncio.Semaphore(in_flight)
        acked = 0

        def done(fut: asyncio.Future[Any]) -> None:
            nonlocal acked
            sem.release()
            if fut.cancelled() or fut.exception() is not None:
                if len(errors) < 10:
                    errors.append(f"send failed: {fut.exception() if not fut.cancelled() else 'cancelled'}")
            else:
                acked += 1

        consumer_task = asyncio.create_task(consume())
        t0 = time.perf_counter()
        futs = []
        for i in range(n):
            await sem.acquire()
            fut = await producer.send(topic, payload, partition=i % PARTITIONS)
            fut.add_done_callback(done)
            futs.append(fut)
        await asyncio.gather(*futs, return_exceptions=True)
        produced_s = time.perf_counter() - t0
        await asyncio.wait_for(consumer_task, 120)
        e2e_s = consumed_at - t0
        if acked != n:
            errors.append(f"acked {acked}/{n}")
        if consumed != want:
            errors.append(f"consumed {consumed}/{want}")
    finally:
        await producer.stop()
        await consumer.stop()
        await delete_namespace(bootstrap, ns)
    return {"ok": not errors, "errors": errors[:10], "metrics": {
        "records": n, "completed": acked, "record_bytes": RECORD_BYTES, "in_flight": in_flight,
        "produce_s": produced_s, "produced_per_s": acked / produced_s,
        "e2e_s": e2e_s, "e2e_per_s": (consumed - 1) / e2e_s,
        "consumed": consumed - 1,
    }}


async def raw_single(bootstrap: str, n: int) -> dict[str, Any]:
    """One ~150-byte record at a time, acks=all: produce -> ack latency."""
    ns = fresh_namespace("bench-raw")
    topic = f"{ns}.single"
    await _make_topic(bootstrap, topic, PARTITIONS)
    producer = _producer(bootstrap)
    await producer.start()
    payload = b"x" * RECORD_BYTES
    lat: list[float] = []
    try:
        for i in range(5):  # warm-up
            await producer.send_and_wait(topic, payload, partition=i % PARTITIONS)
        for i in range(n):
            t0 = time.perf_counter()
            await producer.send_and_wait(topic, payload, partition=i % PARTITIONS)
            lat.append((time.perf_counter() - t0) * 1000)
    finally:
        await producer.stop()
        await delete_namespace(bootstrap, ns)
    pct = workloads._pct
    return {"ok": len(lat) == n, "errors": [] if len(lat) == n else [f"{len(lat)}/{n} sent"],
            "metrics": {"records": n, "completed": len(lat), "p50_ms": pct(lat, 0.5),
                        "p99_ms": pct(lat, 0.99), "mean_ms": statistics.fmean(lat)}}


# --- wiring into run.py ------------------------------------------------------------

SYSTEM = "stepline-kafka"
RAW = "aiokafka-raw"

HEADLINES: dict[str, list[tuple[str, str, str]]] = {
    "k_throughput": [("runs_per_s", "runs/s", "{:,.0f}"),
                     ("events_per_s_measured", "events/s", "{:,.0f}"),
                     ("events_per_append", "events/append", "{:.1f}"),
                     ("cpu_s_per_1000_runs", "CPU s/1k runs", "{:.2f}"),
                     ("cpu_s_per_1000_runs_broker", "CPU s/1k runs, broker", "{:.2f}")],
    "k_latency": [("p50_ms", "p50 ms", "{:.2f}"), ("p99_ms", "p99 ms", "{:.2f}"),
                  ("appends_per_run", "appends/run", "{:.1f}")],
    "k_slope": [("ms_per_step", "ms/step (slope of p50)", "{:.3f}"),
                ("intercept_ms", "intercept ms", "{:.2f}")],
    "k_workers": [("runs_per_s", "runs/s", "{:,.0f}"),
                  ("events_per_s_nominal", "events/s (9 per run)", "{:,.0f}"),
                  ("vs_aim", "runs/s ÷ aim 1,500", "{:.2f}"),
                  ("cpu_s_per_1000_runs", "CPU s/1k runs, workers + driver", "{:.2f}"),
                  ("cpu_s_per_1000_runs_workers", "  of which workers", "{:.2f}"),
                  ("cpu_s_per_1000_runs_driver", "  of which driver", "{:.2f}"),
                  ("cpu_s_per_1000_runs_broker", "CPU s/1k runs, broker", "{:.2f}"),
                  ("settle_s", "s to settle", "{:.1f}")],
    "k_raw_produce": [("produced_per_s", "records/s produced (acked)", "{:,.0f}"),
                      ("e2e_per_s", "records/s produce->consume", "{:,.0f}")],
    "k_raw_single": [("p50_ms", "single produce p50 ms", "{:.2f}"),
                     ("p99_ms", "single produce p99 ms", "{:.2f}")],
    "k_ratio": [("events_vs_raw", "stepline events/s ÷ raw records/s", "{:.2f}"),
                ("raw_over_events", "raw ÷ stepline (aim ≤ 2)", "{:.2f}"),
                ("slope_vs_single_p50", "stepline ms/step ÷ raw single p50", "{:.2f}"),
                ("step1_p50_vs_single_p50", "stepline 1-step p50 ÷ raw single p50", "{:.2f}")],
}


def one_rep(rec: Any, rep: int, sz: dict[str, Any], bootstrap: str, timeout: float,
            run_async: Any) -> None:
    def measure(system: str, workload: str, params: dict[str, Any], make: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        result = run_async(make, timeout)
        return rec.add(system, workload, params, rep, result, time.perf_counter() - t0)

    # The raw limit first, on the same broker.
    raw = measure(RAW, "k_raw_produce",
                  {"partitions": PARTITIONS, "in_flight": RAW_IN_FLIGHT, "bytes": RECORD_BYTES},
                  lambda: raw_produce(bootstrap, sz["raw_records"]))
    single = measure(RAW, "k_raw_single", {"partitions": PARTITIONS, "in_flight": 1,
                                           "bytes": RECORD_BYTES},
                     lambda: raw_single(bootstrap, sz["raw_single"]))
    tput: dict[int, dict[str, Any]] = {}
    for cap in CAPS:
        tput[cap] = measure(SYSTEM, "k_throughput",
                            {"in_flight": cap, "steps": 3, "partitions": PARTITIONS},
                            lambda c=cap: throughput(bootstrap, c, sz["a_runs"][c], sz["a_warmup"][c]))
    measure(SYSTEM, "k_workers", {"workers": WORKERS, "in_flight": WORKERS_IN_FLIGHT, "steps": 3,
                                  "partitions": PARTITIONS},
            lambda: workers_throughput(bootstrap, sz["w_runs"], sz["w_warmup"]))
    lat: dict[int, dict[str, Any]] = {}
    for n in STEP_COUNTS:
        lat[n] = measure(SYSTEM, "k_latency", {"steps": n, "in_flight": 1, "partitions": PARTITIONS},
                         lambda n=n: step_latency(bootstrap, n, sz["b_runs"][n], sz["b_warmup"]))
    if all(r["ok"] for r in lat.values()):
        b, a = workloads.slope([float(n) for n in STEP_COUNTS],
                               [lat[n]["metrics"]["p50_ms"] for n in STEP_COUNTS])
        slope_res = {"ok": True, "errors": [], "metrics": {
            "ms_per_step": b, "intercept_ms": a,
            "p50_ms_by_steps": {n: lat[n]["metrics"]["p50_ms"] for n in STEP_COUNTS}}}
    else:
        slope_res = {"ok": False, "errors": ["a k_latency point failed; no slope"], "metrics": {}}
    slope_row = rec.add(SYSTEM, "k_slope", {"steps": list(STEP_COUNTS), "partitions": PARTITIONS},
                        rep, slope_res, 0.0)

    ratios: dict[str, float] = {}
    errors: list[str] = []
    if tput[256]["ok"] and raw["ok"]:
        ev, rw = tput[256]["metrics"]["events_per_s_measured"], raw["metrics"]["produced_per_s"]
        ratios["events_vs_raw"] = ev / rw
        ratios["raw_over_events"] = rw / ev
    else:
        errors.append("no throughput ratio (a point failed)")
    if slope_row["ok"] and single["ok"]:
        sp = single["metrics"]["p50_ms"]
        ratios["slope_vs_single_p50"] = slope_row["metrics"]["ms_per_step"] / sp
        ratios["step1_p50_vs_single_p50"] = lat[1]["metrics"]["p50_ms"] / sp
    else:
        errors.append("no latency ratio (a point failed)")
    rec.add(SYSTEM + " vs " + RAW, "k_ratio", {"in_flight": 256}, rep,
            {"ok": not errors, "errors": errors, "metrics": ratios}, 0.0)
