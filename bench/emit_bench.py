"""What `stepline.emit` costs on Kafka: a one-step task whose step emits one
record, against the same task without the emit, in one process.

    latency     one run at a time, 100 runs each, twice (warm): p50 / p90 ms
    throughput  500 runs triggered at once: seconds to finish them all
    claim       worker start on 4 partitions, each fenced by its own
                transactional producer

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:19092 .venv/bin/python bench/emit_bench.py

Figures on a shared machine move by 2x between runs; compare the two
columns of one run, not runs of different days.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import stepline as sl
from stepline.log.topics import Topics


async def main() -> None:
    servers = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    topic = f"emit-bench-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=servers)
    await admin.start()
    await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    registry = sl.Registry()

    @sl.step
    async def plain(i: int) -> int:
        return i

    @sl.step
    async def emitting(i: int) -> int:
        await sl.emit(topic, {"i": i})
        return i

    @sl.task(id="plain", registry=registry)
    async def plain_task(payload: dict[str, int]) -> int:
        return await plain(payload["i"])

    @sl.task(id="emitting", registry=registry)
    async def emitting_task(payload: dict[str, int]) -> int:
        return await emitting(payload["i"])

    url = f"kafka://{servers}?namespace=emit-bench-{uuid.uuid4().hex[:8]}"
    topics = Topics(partitions=4)
    try:
        async with sl.Client(url, registry=registry, topics=topics) as client, sl.open_log(url) as log_:
            worker = sl.Worker(registry, log_, topics=topics, client=client)
            started = time.perf_counter()
            await worker.start()
            print(f"claim: worker start with 4 fenced partitions {time.perf_counter() - started:.2f} s")
            for task in ("plain", "emitting", "plain", "emitting"):
                took = []
                for i in range(100):
                    t0 = time.perf_counter()
                    await (await client.trigger(task, {"i": i})).result(timeout=30)
                    took.append((time.perf_counter() - t0) * 1000)
                took.sort()
                print(f"latency {task:9s} p50 {statistics.median(took):6.1f} ms  p90 {took[89]:6.1f} ms")
            for task in ("plain", "emitting"):
                t0 = time.perf_counter()
                handles = [await client.trigger(task, {"i": i}) for i in range(500)]
                await asyncio.gather(*(h.result(timeout=120) for h in handles))
                print(f"throughput {task:9s} 500 runs in {time.perf_counter() - t0:.2f} s")
            await worker.close()
    finally:
        await admin.delete_topics([topic])
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
