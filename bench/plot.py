"""Plots of a peers results file (bench/peers/run_peers.py), regenerable:

    .bench-venv/bin/python bench/plot.py bench/results/<stamp>-peers.jsonl [--out docs/bench]

Writes, from the JSON lines alone:
  peers-throughput.png     three-step runs/s at 1 / 16 / 256 in flight, per system
  peers-ms-per-step.png    ms per step (slope of the one-at-a-time p50s), per system
  peers-start-latency.png  trigger-to-start p50 / p99 / p99.9 at 10 / 100 / 1000 per second
  stepline-scale.png       (d) kill -9 recovery, (e) replay, (f) fan-out, (g) sleeping runs,
                           for a bench/run.py results file that has them (--only ...)
Bars are medians over repetitions, whiskers min–max; log scales, since the
systems differ by orders of magnitude. matplotlib lives in .bench-venv
(bench/peers/setup.sh), not in the project's .venv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import report  # noqa: E402

COLORS = {
    "stepline-sqlite FULL (fsync)": "#1f5fa8", "stepline-sqlite NORMAL (no fsync)": "#6fa8dc",
    "stepline-kafka": "#0b3d6b", "dbos-sqlite": "#d9822b", "dbos-postgres": "#a0522d",
    "celery-redis (AOF everysec)": "#3a9a4a", "celery-redis (AOF always)": "#8cc68f",
    "temporal-devserver-sqlite": "#7b4fa0", "restate": "#c0392b",
}


def _stat(vals: list[float]) -> tuple[float, float, float] | None:
    if not vals:
        return None
    m = statistics.median(vals)
    return m, m - min(vals), max(vals) - m


def _bars(ax: Any, groups: list[Any], series: list[tuple[str, list[tuple[float, float, float] | None]]],
          fmt: str, hatched: set[str] | None = None) -> None:
    ax.set_yscale("log")  # every bar chart here is on a log axis
    width = 0.8 / max(len(series), 1)
    top = 0.0
    for j, (name, stats) in enumerate(series):
        xs, ys, lo, hi = [], [], [], []
        for i, st in enumerate(stats):
            if st is not None:
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                ys.append(st[0])
                lo.append(st[1])
                hi.append(st[2])
        label = name + (" (overloaded: runs left at drain end)" if hatched and name in hatched else "")
        bars = ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=label,
                      color=COLORS.get(name, None), edgecolor="black", linewidth=0.4,
                      hatch="///" if hatched and name in hatched else None)
        top = max([top, *(y + h for y, h in zip(ys, hi))])
        for b, y, h in zip(bars, ys, hi):  # above the whisker, so the two never overlap
            ax.annotate(fmt.format(y), (b.get_x() + b.get_width() / 2, y + h), ha="center", va="bottom",
                        fontsize=6, xytext=(0, 2), textcoords="offset points", rotation=90)
    ax.set_xticks(range(len(groups)))
    if top > 0:
        ax.set_ylim(top=top * 4)  # room for the labels above the tallest bar (log axes)


def throughput(rows: list[dict[str, Any]], out: Path, title: str) -> Path:
    g = report.groups(rows, "a_throughput")
    caps = sorted({k for (_, k) in g})
    systems = [s for s in report.systems(rows) if any((s, k) in g for k in caps)]
    fig, ax = plt.subplots(figsize=(10, 5.2))
    _bars(ax, caps, [(s, [_stat(report.values(g.get((s, k), []), "runs_per_s")) for k in caps])
                     for s in systems], "{:,.0f}")
    ax.set_xticklabels([f"{k} in flight" for k in caps])
    ax.set_yscale("log")
    ax.set_ylabel("three-step runs completed per second (log)")
    ax.set_title(f"(a) trigger -> completion throughput, 3-step no-op task\n{title}", fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper left")
    ax.grid(axis="y", which="both", alpha=0.3)
    return _save(fig, out / "peers-throughput.png")


def per_step(rows: list[dict[str, Any]], out: Path, title: str) -> Path:
    slope = report.groups(rows, "b_slope")
    lat = report.groups(rows, "b_latency")
    systems = [s for s in report.systems(rows) if (s, None) in slope]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [1, 1.4]})
    stats = [_stat(report.values(slope[(s, None)], "ms_per_step")) for s in systems]
    for i, (s, st) in enumerate(zip(systems, stats)):
        if st is None:
            continue
        ax1.bar(i, st[0], yerr=[[st[1]], [st[2]]], capsize=3, color=COLORS.get(s), edgecolor="black",
                linewidth=0.4)
        ax1.annotate(f"{st[0]:.2f}", (i, st[0] + st[2]), ha="center", va="bottom", fontsize=7,
                     xytext=(0, 2), textcoords="offset points")
    ax1.set_xticks(range(len(systems)))
    ax1.set_xticklabels([s.replace(" (", "\n(") for s in systems], fontsize=6, rotation=30, ha="right")
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax1.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax1.tick_params(axis="y", which="minor", labelsize=6)
    ax1.set_ylabel("ms per step (slope of p50, log)")
    ax1.set_title("(b) per-step checkpoint cost", fontsize=10)
    ax1.grid(axis="y", which="both", alpha=0.3)
    steps = sorted({k for (_, k) in lat})
    for s in systems:
        pts = [(n, _stat(report.values(lat.get((s, n), []), "p50_ms"))) for n in steps]
        pts = [(n, st) for n, st in pts if st]
        if pts:
            ax2.errorbar([n for n, _ in pts], [st[0] for _, st in pts],
                         yerr=[[st[1] for _, st in pts], [st[2] for _, st in pts]],
                         marker="o", ms=3, capsize=2, label=s, color=COLORS.get(s))
    ax2.set_xscale("symlog", linthresh=1)
    ax2.set_yscale("log")
    ax2.set_xticks(steps)
    ax2.set_xticklabels([str(n) for n in steps])
    ax2.set_xlabel("steps in the task")
    ax2.set_ylabel("trigger -> completion p50, ms (log)")
    ax2.set_title("one run at a time", fontsize=10)
    ax2.legend(fontsize=6)
    ax2.grid(which="both", alpha=0.3)
    fig.suptitle(title, fontsize=8)
    return _save(fig, out / "peers-ms-per-step.png")


def start_latency(rows: list[dict[str, Any]], out: Path, title: str) -> Path:
    g = report.groups(rows, "c_start_latency")
    rates = sorted({k for (_, k) in g})
    systems = [s for s in report.systems(rows) if any((s, r) in g for r in rates)]
    fig, axes = plt.subplots(1, max(len(rates), 1), figsize=(4.6 * max(len(rates), 1), 5.4), sharey=True)
    axes = axes if len(rates) > 1 else [axes]
    pcts = [("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")]
    for ax, rate in zip(axes, rates):
        series = []
        over = set()
        for s in systems:
            rs = g.get((s, rate), [])
            # Overloaded reps are measurements too (ok), so all reps count here.
            series.append((s, [_stat(report.values(rs, m, ok_only=False)) for m, _ in pcts]))
            if any(r["metrics"].get("overloaded") for r in rs):
                over.add(s)
        _bars(ax, [p for _, p in pcts], series, "{:,.0f}", over)
        ax.legend(fontsize=5.5, loc="upper left")
        ax.set_xticklabels([p for _, p in pcts])
        ax.set_yscale("log")
        ax.set_title(f"{rate} per second", fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("ms from the scheduled send to the task's first line (log)")
    fig.suptitle(f"(c) trigger-to-start latency, open loop (a missing bar: a percentile that fell on a "
                 f"run not started when the drain ended)\n{title}", fontsize=8)
    return _save(fig, out / "peers-start-latency.png")


SCALE_WORKLOADS = ("d_recovery", "e_replay", "f_subscriptions", "g_sleeping")


def scale(rows: list[dict[str, Any]], out: Path, title: str) -> Path:
    """Workloads d-g of bench/run.py, per system, against the issue's aims (dashed)."""
    systems = sorted({r["system"] for r in rows if r["workload"] in SCALE_WORKLOADS})

    def stat(workload: str, system: str, metric: str, **params: Any) -> tuple[float, float, float] | None:
        rs = [r for r in rows if r["workload"] == workload and r["system"] == system
              and all(r["params"].get(k) == v for k, v in params.items())]
        return _stat(report.values(rs, metric))

    def bars(ax: Any, labels: list[str], metrics: list[str], workload: str, fmt: str) -> None:
        _bars(ax, labels, [(s, [stat(workload, s, m) for m in metrics]) for s in systems], fmt)
        ax.set_xticklabels(labels, fontsize=7)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    (d_ax, e_ax, g_ax), (f1_ax, f2_ax, l_ax) = axes
    bars(d_ax, ["first step\nresumed", "all resumed", "all done", "app imported"],
         ["restart_to_first_resumed_s", "restart_to_all_resumed_s", "restart_to_all_done_s",
          "restart_to_app_loaded_s"], "d_recovery", "{:.2f}")
    d_ax.axhline(1.0, ls="--", color="grey", lw=0.8)
    d_ax.set_ylabel("s after the worker process was restarted (log)")
    d_ax.set_title("(d) kill -9 in step 2, restart: 1,000 runs (aim: all resumed ≤ 1 s)", fontsize=9)
    bars(e_ax, ["rebuild\n(read+decode+fold)", "read + decode", "read only"],
         ["events_per_s", "decode_events_per_s", "read_events_per_s"], "e_replay", "{:,.0f}")
    e_ax.axhline(100_000, ls="--", color="grey", lw=0.8)
    e_ax.set_ylabel("events/s (log)")
    e_ax.set_title("(e) worker projection rebuilt from 1,000,000 events (aim ≥ 100,000/s)", fontsize=9)
    bars(g_ax, ["RSS bytes per\nsleeping run"], ["bytes_per_sleeping_run"], "g_sleeping", "{:,.0f}")
    g_ax.axhline(1024, ls="--", color="grey", lw=0.8)
    g_ax.set_title("(g) memory per sleeping run, 10,000 runs (aim < 1 KiB)", fontsize=9)
    bars(l_ax, ["p50", "p99"], ["lateness_p50_ms", "lateness_p99_ms"], "g_sleeping", "{:,.0f}")
    l_ax.axhline(50, ls="--", color="grey", lw=0.8)
    l_ax.set_ylabel("ms after the scheduled wake (log)")
    l_ax.set_title("(g) timer lateness, 10,000 wakes spread over 20 s (aim p99 < 50 ms)", fontsize=9)
    subs = sorted({r["params"]["subscriptions"] for r in rows if r["workload"] == "f_subscriptions"})
    for s in systems:
        for ax, metrics in ((f1_ax, [("deliveries_per_s", "-")]),
                            (f2_ax, [("publish_to_start_p50_ms", "-"), ("publish_to_start_p99_ms", ":")])):
            for metric, ls in metrics:
                pts = [(n, stat("f_subscriptions", s, metric, subscriptions=n)) for n in subs]
                pts = [(n, st) for n, st in pts if st]
                if pts:
                    ax.errorbar([n for n, _ in pts], [st[0] for _, st in pts],
                                yerr=[[st[1] for _, st in pts], [st[2] for _, st in pts]], ls=ls,
                                marker="o", ms=3, capsize=2, color=COLORS.get(s),
                                label=f"{s} {metric.replace('publish_to_start_', '')}")
    for ax in (f1_ax, f2_ax):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(subs)
        ax.set_xticklabels([str(n) for n in subs])
        ax.set_xlabel("subscriptions (half of them match)")
        ax.grid(which="both", alpha=0.3)
        ax.legend(fontsize=6)
    f1_ax.set_ylabel("deliveries (task starts) per second, burst")
    f1_ax.set_title("(f) fan-out throughput", fontsize=9)
    f2_ax.set_ylabel("publish -> task start, ms, one event at a time")
    f2_ax.set_title("(f) fan-out latency", fontsize=9)
    fig.suptitle(title, fontsize=8)
    return _save(fig, out / "stepline-scale.png")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a bench/results/*-peers.jsonl file")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "bench"))
    args = ap.parse_args()
    rows = report.load(args.results)
    if not rows:
        print(f"{args.results}: no rows", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reps = len({r["rep"] for r in rows})
    env = rows[0].get("env", {})
    title = (f"{Path(args.results).name}: {reps} rep(s), median, whiskers min–max; "
             f"{env.get('cpus', '?')} cores, git {env.get('git', '?')}")
    if any(r["workload"] in SCALE_WORKLOADS for r in rows):
        print(f"wrote {scale(rows, out, title)}", file=sys.stderr)
    if any(r["workload"] == "a_throughput" for r in rows) and any(r["workload"] == "c_start_latency" for r in rows):
        for fn in (throughput, per_step, start_latency):
            print(f"wrote {fn(rows, out, title)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
