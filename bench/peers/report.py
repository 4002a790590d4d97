"""The peers' summary, from a results file: medians with min–max over
repetitions, ratios Stepline / peer paired by repetition (the systems ran
interleaved, so rep k of each saw the same machine), the issue's targets
met or missed, and the durability of each system as the rows record it.

    python bench/peers/report.py bench/results/<stamp>.jsonl

Standard library only (runs under .venv or .bench-venv); bench/plot.py
reads results through `load` and `groups` here too.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as c  # noqa: E402

ORDER = [c.SL_FULL, c.SL_NORMAL, c.SL_KAFKA, c.DBOS_SQLITE, c.DBOS_PG, c.CELERY, c.CELERY_ALWAYS,
         c.TEMPORAL, c.RESTATE]
KEY_PARAM = {"a_throughput": "in_flight", "b_latency": "steps", "c_start_latency": "rate_per_s"}

# (numerator, denominator, target or None, what the comparison is worth)
THROUGHPUT_RATIOS: list[tuple[str, str, float | None, str]] = [
    (c.SL_FULL, c.DBOS_SQLITE, 20.0, "equal durability: both fsync every commit"),
    (c.SL_FULL, c.CELERY, 5.0, "Stepline stricter: it fsyncs, Redis everysec does not"),
    (c.SL_NORMAL, c.CELERY, None, "equal durability: neither fsyncs per write"),
    (c.SL_FULL, c.CELERY_ALWAYS, None, "equal durability: both fsync"),
    (c.SL_KAFKA, c.DBOS_PG, 10.0, "NOT equal: the single-node broker does not fsync, PostgreSQL does"),
    (c.SL_KAFKA, c.DBOS_SQLITE, None, "not equal durability (as above)"),
    (c.SL_FULL, c.TEMPORAL, None, "equal durability: both fsync every commit"),
    (c.SL_FULL, c.RESTATE, None, "equal durability: both fsync before a step is acknowledged"),
    (c.SL_KAFKA, c.TEMPORAL, None, "NOT equal: the single-node broker does not fsync"),
    (c.SL_KAFKA, c.RESTATE, None, "NOT equal: the single-node broker does not fsync"),
]


def load(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def key(row: dict[str, Any]) -> Any:
    p = KEY_PARAM.get(row["workload"])
    return row["params"].get(p) if p else None


def groups(rows: Iterable[dict[str, Any]], workload: str) -> dict[tuple[str, Any], list[dict[str, Any]]]:
    out: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in rows:
        if r["workload"] == workload:
            out.setdefault((r["system"], key(r)), []).append(r)
    return out


def values(rs: list[dict[str, Any]], metric: str, ok_only: bool = True) -> list[float]:
    return [r["metrics"][metric] for r in rs
            if (r["ok"] or not ok_only) and isinstance(r["metrics"].get(metric), int | float)]


def fmt_range(vals: list[float], fmt: str = "{:,.0f}") -> str:
    if not vals:
        return "—"
    med = fmt.format(statistics.median(vals))
    if len(vals) == 1:
        return med
    return f"{med} [{fmt.format(min(vals))}–{fmt.format(max(vals))}]"


def _status(rs: list[dict[str, Any]]) -> str:
    bad = sum(1 for r in rs if not r["ok"])
    return f" ({bad}/{len(rs)} FAILED)" if bad else ""


def systems(rows: list[dict[str, Any]]) -> list[str]:
    seen = {r["system"] for r in rows}
    return [s for s in ORDER if s in seen] + sorted(seen - set(ORDER))


def by_rep(rs: list[dict[str, Any]], metric: str) -> dict[int, float]:
    return {r["rep"]: r["metrics"][metric] for r in rs
            if r["ok"] and isinstance(r["metrics"].get(metric), int | float)}


def peak_by_rep(rows: list[dict[str, Any]], system: str) -> dict[int, float]:
    """Per repetition, the system's best runs/s over the in-flight caps."""
    best: dict[int, float] = {}
    for (s, _cap), rs in groups(rows, "a_throughput").items():
        if s == system:
            for rep, v in by_rep(rs, "runs_per_s").items():
                best[rep] = max(best.get(rep, 0.0), v)
    return best


def ratio_cell(num: dict[int, float], den: dict[int, float]) -> tuple[str, float | None]:
    rs = [num[k] / den[k] for k in num.keys() & den.keys() if den[k] > 0]
    if not rs:
        return "—", None
    return fmt_range(rs, "{:.1f}x"), statistics.median(rs)


def kill_cell(r: dict[str, Any] | None) -> str:
    if r is None:
        return "not run"
    if not r["ok"]:
        return "FAILED to run: " + "; ".join(str(e) for e in r["errors"][:1])[:120]
    m = r["metrics"]
    n = m.get("calls", {})
    ran = f"step 1 ran {n.get('one')}x, step 2 {n.get('two')}x, step 3 {n.get('three')}x"
    probe = m.get("fsync_probe") or {}
    if "sync_calls_per_run" in probe:
        ran += f"; {probe['sync_calls_per_run']:g} fsync-family calls per 3-step run (strace)"
    elif probe.get("error"):
        ran += f"; fsync count failed: {probe['error']}"
    if m.get("killed"):
        ran += f"; killed: {m['killed']}"
    if m.get("finished_after_restart"):
        return f"resumed and finished (output {'right' if m.get('completed_step_survived') else 'WRONG'}); {ran}"
    kept = m.get("first_task_result_kept")
    return (f"did NOT finish after restart ({ran}"
            + ("; step 1's stored result kept" if kept else "") + ")")


def markdown(rows: list[dict[str, Any]]) -> str:
    out: list[str] = []
    reps = sorted({r["rep"] for r in rows})
    syss = systems(rows)
    out.append(f"{len(rows)} rows, repetitions {reps[0]}–{reps[-1]}; median [min–max] over repetitions;"
               f" FAILED counts reps whose results were not all correct." if reps else "no rows")

    a = groups(rows, "a_throughput")
    caps = sorted({k for (_, k) in a})
    out += ["", "Three-step runs/s (trigger -> completion, closed loop):", "",
            "| system | " + " | ".join(f"{k} in flight" for k in caps) + " |",
            "|---|" + "---|" * len(caps)]
    for s in syss:
        if any((s, k) in a for k in caps):
            out.append(f"| {s} | " + " | ".join(
                fmt_range(values(a.get((s, k), []), "runs_per_s")) + _status(a.get((s, k), []))
                for k in caps) + " |")

    b = groups(rows, "b_latency")
    slope = groups(rows, "b_slope")
    steps = sorted({k for (_, k) in b})
    if b:
        out += ["", "Per-step cost, one run at a time (p50 ms by steps; slope of the p50s):", "",
                "| system | ms/step | " + " | ".join(f"{n} steps p50 / p99" for n in steps) + " |",
                "|---|---|" + "---|" * len(steps)]
        for s in syss:
            if not any((s, n) in b for n in steps):
                continue
            cells = []
            for n in steps:
                rs = b.get((s, n), [])
                cells.append(f"{fmt_range(values(rs, 'p50_ms'), '{:.1f}')} / "
                             f"{fmt_range(values(rs, 'p99_ms'), '{:.1f}')}{_status(rs)}")
            sl_rs = slope.get((s, None), [])
            out.append(f"| {s} | {fmt_range(values(sl_rs, 'ms_per_step'), '{:.2f}')}{_status(sl_rs)} | "
                       + " | ".join(cells) + " |")

    cl = groups(rows, "c_start_latency")
    rates = sorted({k for (_, k) in cl})
    if cl:
        out += ["", "Trigger-to-start latency, open loop, ms from the scheduled send (p50 / p99 / p99.9; "
                "'>drain' = some runs had not started when the drain ended):", "",
                "| system | " + " | ".join(f"{r}/s" for r in rates) + " |", "|---|" + "---|" * len(rates)]
        for s in syss:
            if not any((s, r) in cl for r in rates):
                continue
            cells = []
            for rate in rates:
                rs = cl.get((s, rate), [])
                if not rs:
                    cells.append("—")
                    continue
                # Latency is measured also when a rep was overloaded: show those
                # reps' figures too (null = a percentile that fell on a run
                # that never started).
                parts = []
                for m in ("p50_ms", "p99_ms", "p999_ms"):
                    v = values(rs, m, ok_only=False)
                    missing = sum(1 for r in rs if r["metrics"].get(m) is None and r["metrics"])
                    parts.append(fmt_range(v, "{:,.1f}") + (f" (>drain ×{missing})" if missing else ""))
                cells.append(" / ".join(parts) + _status(rs))
            out.append(f"| {s} | " + " | ".join(cells) + " |")

    out += ["", "Ratios, paired by repetition (Stepline ÷ peer, runs/s; 'peak' = each system's best cap):", "",
            "| ratio | " + " | ".join(f"{k} in flight" for k in caps) + " | peak | target | |",
            "|---|" + "---|" * len(caps) + "---|---|---|"]
    for num, den, target, why in THROUGHPUT_RATIOS:
        if num not in syss or den not in syss:
            continue
        cells = [ratio_cell(by_rep(a.get((num, k), []), "runs_per_s"),
                            by_rep(a.get((den, k), []), "runs_per_s"))[0] for k in caps]
        peak, med = ratio_cell(peak_by_rep(rows, num), peak_by_rep(rows, den))
        verdict = "—" if target is None else (
            "no data" if med is None else ("**met**" if med >= target else "**missed**"))
        out.append(f"| {num} ÷ {den} | " + " | ".join(cells) + f" | {peak} | "
                   + (f"≥ {target:.0f}x: {verdict}" if target else "—") + f" | {why} |")
    if slope:
        out += ["", "ms per step, peer ÷ Stepline FULL (paired by repetition):", ""]
        base = by_rep(slope.get((c.SL_FULL, None), []), "ms_per_step")
        for s in syss:
            if s != c.SL_FULL and (s, None) in slope:
                cell, _ = ratio_cell(by_rep(slope[(s, None)], "ms_per_step"), base)
                out.append(f"* {s}: {cell}")

    kills = {r["system"]: r for r in rows if r["workload"] == "d_kill9"}
    out += ["", "Durability as configured (recorded in every row), and the kill -9 check "
            "(bench/peers/kill9.py: SIGKILL while step two runs, restart, wait):", "",
            "| system | completed step survives kill -9 | survives power loss (fsync) | kill -9 check | how |",
            "|---|---|---|---|---|"]
    for s in syss:
        d = next((r["metrics"].get("durability") for r in rows
                  if r["system"] == s and r["metrics"].get("durability")), None) or c.DURABILITY.get(s)
        if d:
            out.append(f"| {s} | {d['kill9']} | {d['power_loss']} | {kill_cell(kills.get(s))} | {d['how']} |")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        out += ["", f"Failed results ({len(failed)}):", ""]
        for r in failed:
            out.append(f"* rep {r['rep']} {r['system']} {r['workload']} {key(r)}: "
                       + "; ".join(str(e) for e in r["errors"][:2])[:300])
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: report.py RESULTS.jsonl")
    print(markdown(load(sys.argv[1])))
