"""Where the CPU goes when Stepline runs on Kafka: a CPU-time sampler over
the measured window of `kafka_bench.throughput` (Client + Worker in one
process, 3-step no-op task, 256 in flight), start-up and warm-up excluded.

    .venv/bin/python bench/kafka_profile.py [--runs 6000] [--in-flight 256]
                                            [--interval 0.001] [--raw-out FILE] [--top 40]

Why not py-spy or pyinstrument: both sample wall-clock time, and on this
shared 2-core machine a thread that is runnable but waiting for a core
(typically right after a socket write woke the broker) looks busy to them;
a tracing profiler inflates call-heavy code. `CpuSampler` takes the main
thread's stack on SIGPROF, i.e. every `--interval` s of CPU the process
used, so the shares are shares of CPU. (All of the engine's and aiokafka's
Python runs on the event-loop thread.) The samples are grouped by area
(first matching frame from the leaf up, see AREAS) and by function (self
time), in py-spy's collapsed-stack format. `--from FILE` re-reads an
earlier `--raw-out` instead of running.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# (area, substrings of a frame): the first area whose pattern matches a frame,
# scanning from the leaf to the root, gets the sample. Order matters: the
# narrow areas (codec, fold) come before the callers that contain them.
AREAS: list[tuple[str, tuple[str, ...]]] = [
    ("codec: engine events (encode/decode)", ("engine/core/codec.py", "stepline.codec generated")),
    ("payload codec (pydantic)", ("engine/core/payloads.py", "pydantic")),
    ("structlog / logging", ("structlog", "logging/__init__")),
    ("tracing", ("engine/observability/tracing.py", "opentelemetry")),
    ("aiokafka producer: batch build", ("message_accumulator.py", "record/default_records",
                                        "record/_crecords", "BatchBuilder")),
    ("aiokafka consumer: fetch + record decode", ("consumer/fetcher.py", "ConsumerRecord")),
    ("aiokafka protocol + connection", ("aiokafka/conn.py", "aiokafka/protocol",
                                        "aiokafka/client.py", "producer/sender.py",
                                        "producer/producer.py")),
    ("aiokafka consumer: other", ("aiokafka/consumer",)),
    ("KafkaLog append (engine/log/kafka_append.py)", ("engine/log/kafka_append.py",
                                                       "KafkaLog.append", "_size (")),
    ("KafkaLog read (engine/log/kafka_cursors.py)", ("engine/log/kafka_cursors.py", "KafkaLog.read",
                                                      "KafkaLog.end_offset")),
    ("appender", ("engine/log/appender.py",)),
    ("projection fold", ("projections/runs.py", "projections/snapshot.py", "evolve (<string>")),
    # Dataclass __init__s: @dataclass's own (__create_fn__) and engine/core/frozen.py's.
    ("event + id construction", ("engine/core/events.py", "engine/core/ids.py", "__create_fn__",
                                 "__init__ (<string>)")),
    ("client (trigger, watcher, result)", ("engine/client/_client.py",)),
    ("worker (emit, run, tail, dispatch)", ("engine/runtime/worker.py", "engine/runtime/runner.py",
                                             "engine/sdk/context.py", "engine/runtime/dispatch.py",
                                             "engine/sdk/task.py")),
    ("bench load driver", ("workloads.py", "sl_tasks.py")),
    ("socket I/O (transport write/read, epoll)", ("selector_events.py", "selectors.py")),
    ("asyncio machinery", ("asyncio/",)),
]


# Coarser: a sample whose stack holds any of these frames (first match wins).
SIDES: list[tuple[str, tuple[str, ...]]] = [
    ("Kafka read side (KafkaLog.read, tail, consumers, fetcher)",
     ("KafkaLog.read", "engine/log/kafka_cursors.py", "Tails.", "kafka_tail.py", "Fetcher.", "AIOKafkaConsumer", "consumer/")),
    ("Kafka produce side (KafkaLog.append, KafkaAppends, aiokafka producer)",
     ("engine/log/kafka_append.py", "KafkaLog.append", "producer/", "Sender.")),
    ("Kafka other (group heartbeats, metadata)", ("group_coordinator", "_metadata_update")),
    ("Kafka connections (reading responses)", ("AIOKafkaConnection._read", "_read_ready")),
]


def area_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pats in AREAS:
            if any(p in frame for p in pats):
                return name
    return "other"


def analyse(path: Path, top: int) -> str:
    sides: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    selfs: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        areas[area_of(frames)] += n
        sides[next((name for name, pats in SIDES if any(p in stack for p in pats)),
                   "engine, client and the event loop")] += n
        selfs[re.sub(r":\d+\)", ")", frames[-1])] += n
        for f in {re.sub(r":\d+\)", ")", f) for f in frames}:
            incl[f] += n
    out = [f"samples: {total}", "", "share by side (any matching frame in the stack):"]
    out += [f"  {100 * v / total:5.1f}%  {k}" for k, v in sides.most_common()]
    out += ["", "share by area (leaf-most matching frame):"]
    out += [f"  {100 * v / total:5.1f}%  {k}" for k, v in areas.most_common()]
    out += ["", f"top {top} by self time:"]
    out += [f"  {100 * v / total:5.1f}%  {k}" for k, v in selfs.most_common(top)]
    out += ["", f"top {top} by inclusive time:"]
    out += [f"  {100 * v / total:5.1f}%  {k}" for k, v in incl.most_common(top + 10)[10:]]
    return "\n".join(out)


class CpuSampler:
    """Samples the main thread's Python stack every `interval` s of this
    process's CPU time (ITIMER_PROF/SIGPROF): time spent waiting, for I/O
    or for a core on a busy machine, is never sampled, and time in a C
    call or a syscall goes to the Python frame that made it."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stacks: collections.Counter[str] = collections.Counter()

    def _sample(self, signum: int, frame: Any) -> None:
        names = []
        while frame is not None:
            code = frame.f_code
            names.append(f"{code.co_qualname} ({_short(code.co_filename)})")
            frame = frame.f_back
        self.stacks[";".join(reversed(names))] += 1

    def __enter__(self) -> CpuSampler:
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, signal.SIG_DFL)

    def write(self, path: Path) -> None:
        path.write_text("".join(f"{k} {v}\n" for k, v in self.stacks.items()))


def _short(filename: str) -> str:
    for marker in ("/site-packages/", "/lib/python3", "/work/main/"):
        if marker in filename:
            rest = filename.split(marker, 1)[1]
            return rest.split("/", 1)[1] if marker == "/lib/python3" else rest
    return filename


async def profiled(bootstrap: str, cap: int, n: int, warmup: int, interval: float,
                   raw_out: Path) -> dict[str, Any]:
    import kafka_bench
    import sl_tasks
    import workloads

    async with kafka_bench.embedded(bootstrap, kafka_bench.fresh_namespace()) as (client, worker, ctr):
        await workloads.drive(client, sl_tasks.noop3, sl_tasks.expected_noop3, warmup, cap,
                              base=10**9)
        with CpuSampler(interval) as sampler:
            r0, cpu0, t0 = ctr.records, time.process_time(), time.perf_counter()
            r = await workloads.drive(client, sl_tasks.noop3, sl_tasks.expected_noop3, n, cap)
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        sampler.write(raw_out)
        events = ctr.records - r0
    return {"completed": r.completed, "errors": r.errors[:3], "events_per_s": events / elapsed,
            "cpu_us_per_event": 1e6 * cpu / max(events, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=6000)
    ap.add_argument("--warmup", type=int, default=256)
    ap.add_argument("--in-flight", type=int, default=256)
    ap.add_argument("--interval", type=float, default=0.001, help="CPU seconds between samples")
    ap.add_argument("--raw-out", default="/tmp/stepline-kafka-profile.txt")
    ap.add_argument("--from", dest="from_file", default=None)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    path = Path(args.from_file or args.raw_out)
    if not args.from_file:
        import kafka_bench

        got = asyncio.run(profiled(kafka_bench.get_broker(), args.in_flight, args.runs,
                                   args.warmup, args.interval, path))
        print(f"completed {got['completed']}/{args.runs} {got['errors']}; "
              f"{got['events_per_s']:,.0f} events/s (profiled), "
              f"{got['cpu_us_per_event']:.1f} CPU µs/event")
    print(analyse(path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
