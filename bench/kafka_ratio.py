"""The issue-3 ratio alone: Stepline events/s on Kafka against raw aiokafka,
interleaved in one run on one broker, with optional profiling.

    .venv/bin/python bench/kafka_ratio.py [--reps 3] [--runs 3000] [--raw 50000]
                                          [--in-flight 256] [--profile FILE.html]

Each repetition measures, in alternating order (raw first on even reps,
Stepline first on odd ones, so neither always runs on a cooler machine):

* raw: `kafka_bench.raw_produce` unchanged (acks=all + idempotence,
  150-byte records, 256 sends in flight, a concurrent consumer);
* stepline: `kafka_bench.throughput` unchanged (Client + Worker in one
  process, 3-step no-op task, `--in-flight` runs in flight).

It prints per rep and as median [min-max]: raw ÷ Stepline events/s (the
issue's aim: <= 2), and the CPU this process spent per record / per event
(time.process_time(): steadier than rates on a shared 2-core machine).
`--profile` samples one extra Stepline measurement with pyinstrument.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kafka_bench  # noqa: E402


async def _raw(bootstrap: str, n: int) -> dict[str, Any]:
    cpu0 = time.process_time()
    res = await kafka_bench.raw_produce(bootstrap, n)
    res["metrics"]["cpu_us_per_record"] = 1e6 * (time.process_time() - cpu0) / n
    return res


async def _engine(bootstrap: str, cap: int, n: int, warmup: int) -> dict[str, Any]:
    res = await kafka_bench.throughput(bootstrap, cap, n, warmup)
    m = res["metrics"]
    m["cpu_us_per_event"] = 1e6 * m["cpu_s_per_1000_runs"] / 1000 / max(m["events_per_run_measured"], 1)
    return res


def _fmt(xs: list[float], f: str = "{:.2f}") -> str:
    if not xs:
        return "—"
    return f"{f.format(statistics.median(xs))} [{f.format(min(xs))}–{f.format(max(xs))}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=256)
    ap.add_argument("--raw", type=int, default=50000)
    ap.add_argument("--in-flight", type=int, default=256)
    ap.add_argument("--profile", default=None, help="pyinstrument HTML of one extra Stepline rep")
    args = ap.parse_args()
    bootstrap = kafka_bench.get_broker()
    ratios: list[float] = []
    raw_rates: list[float] = []
    sl_rates: list[float] = []
    raw_cpu: list[float] = []
    sl_cpu: list[float] = []
    per_append: list[float] = []
    for rep in range(args.reps):
        order = ("raw", "sl") if rep % 2 == 0 else ("sl", "raw")
        got: dict[str, dict[str, Any]] = {}
        for which in order:
            if which == "raw":
                got[which] = asyncio.run(_raw(bootstrap, args.raw))
            else:
                got[which] = asyncio.run(_engine(bootstrap, args.in_flight, args.runs, args.warmup))
        raw, sl = got["raw"], got["sl"]
        if not (raw["ok"] and sl["ok"]):
            print(f"rep {rep}: FAILED raw={raw['errors'][:3]} stepline={sl['errors'][:3]}")
            continue
        rr = raw["metrics"]["produced_per_s"]
        se = sl["metrics"]["events_per_s_measured"]
        raw_rates.append(rr)
        sl_rates.append(se)
        ratios.append(rr / se)
        raw_cpu.append(raw["metrics"]["cpu_us_per_record"])
        sl_cpu.append(sl["metrics"]["cpu_us_per_event"])
        per_append.append(sl["metrics"]["events_per_append"])
        print(f"rep {rep} ({'/'.join(order)}): raw {rr:,.0f} rec/s ({raw_cpu[-1]:.1f} CPU µs/rec, "
              f"e2e {raw['metrics']['e2e_per_s']:,.0f}/s); stepline {se:,.0f} ev/s = "
              f"{sl['metrics']['runs_per_s']:,.0f} runs/s ({sl_cpu[-1]:.1f} CPU µs/ev, "
              f"{per_append[-1]:.1f} ev/append); raw ÷ stepline {rr / se:.2f}", flush=True)
    print(f"raw records/s      {_fmt(raw_rates, '{:,.0f}')}")
    print(f"stepline events/s  {_fmt(sl_rates, '{:,.0f}')}")
    print(f"raw ÷ stepline     {_fmt(ratios)}   (aim <= 2)")
    print(f"CPU µs per raw record   {_fmt(raw_cpu, '{:.1f}')}")
    print(f"CPU µs per engine event {_fmt(sl_cpu, '{:.1f}')}")
    print(f"events per append  {_fmt(per_append, '{:.1f}')}")
    if args.profile:
        from pyinstrument import Profiler

        prof = Profiler(interval=0.0005, async_mode="disabled")
        prof.start()
        asyncio.run(_engine(bootstrap, args.in_flight, args.runs, args.warmup))
        prof.stop()
        Path(args.profile).write_text(prof.output_html())
        print(prof.output_text(unicode=False, color=False, show_all=False)[:20000])
    return 0 if len(ratios) == args.reps else 1


if __name__ == "__main__":
    sys.exit(main())
