"""`stepline fork`, `shadow`, `diff` and `debug`: the history as something to branch from, compare and step through.

Registered on the CLI's app by `engine/cli/main.py` (`register(app)`), over
the helpers of engine/cli/_common.py.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from stepline.cli._common import (
    TIMEOUT_HELP,
    WAIT_HELP,
    CliError,
    _await_outcome,
    _fail,
    _parse_json,
    _print_json,
    _print_started,
    _print_table,
    _progress,
    _require_log,
    _run,
    err,
    out,
)
from stepline.cli.options import AppOpt, JsonOpt, LogOpt
from stepline.client import Client
from stepline.history.debug import DebugSession, debug_run
from stepline.history.replay import iso_ms, parse_point
from stepline.history.shadow import ShadowResult, ShadowSummary, shadow_runs, shadow_task
from stepline.history.shadow_code import load_code
from stepline.log import DEFAULT_LOG_URL
from stepline.projections.diff import RunDiff, diff_runs
from stepline.sdk.task import load_app


def _step_outputs(entries: list[str]) -> dict[int, Any]:
    outputs: dict[int, Any] = {}
    for entry in entries:
        pos, sep, value = entry.partition("=")
        if not sep or not pos.strip().isdigit():
            raise CliError(f"--step-output must be N=JSON (e.g. 2='{{\"price\": 10}}'), got {entry!r}")
        outputs[int(pos)] = _parse_json(value, f"--step-output {pos.strip()}")
    return outputs


def fork(
    run_id: Annotated[str, typer.Argument(help="The run to fork.")],
    at_step: Annotated[int, typer.Option("--at-step", help="First journal position to run live; "
                                                           "the ones before it are copied.")],
    payload: Annotated[str | None, typer.Option(help="Replacement payload as JSON.")] = None,
    step_output: Annotated[list[str] | None, typer.Option(
        "--step-output", help="N=JSON: replace the recorded output of copied step N (repeatable).")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Makes a repeated fork a no-op.")] = None,
    app_module: AppOpt = None,
    log: LogOpt = DEFAULT_LOG_URL,
    wait: Annotated[bool, typer.Option("--wait", help=WAIT_HELP)] = False,
    timeout: Annotated[float | None, typer.Option(help=TIMEOUT_HELP)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Start a new run from RUN's history up to --at-step, then live (with edits)."""
    async def go() -> dict[str, Any]:
        registry = load_app(app_module) if app_module else None
        new_value = _parse_json(payload, "--payload") if payload is not None else None
        outputs = _step_outputs(step_output or [])
        async with Client(log, registry=registry) as client:
            handle = await client.fork(run_id, at_step, payload=new_value, new_payload=payload is not None,
                                       step_outputs=outputs, idempotency_key=idempotency_key)
            result: dict[str, Any] = {"run_id": handle.run_id, "task_id": handle.task_id,
                                      "forked_from": run_id, "at_step": at_step}
            if wait:
                await _await_outcome(client, handle.run_id, handle.offset, timeout, result)
            return result

    res = _run(go())
    _print_started(res, f"forked {run_id} at step {at_step}: [bold]{res['run_id']}[/] ({res['task_id']})",
                   wait, as_json)


def parse_since(text: str, now_ms: int) -> int:
    """`24h`, `30m`, `7d` (also with a leading `-`), or an ISO-8601 time: ms since the epoch."""
    value = text.strip()
    relative = value if value.startswith("-") else f"-{value}"
    try:
        point = parse_point(relative, now_ms)
        if point.time is not None:
            return point.time
    except ValueError:
        pass
    problem = ValueError(f"--since {text!r} is neither a duration (e.g. 24h, 30m, 7d) nor an ISO-8601 time")
    try:
        point = parse_point(value, now_ms)
    except ValueError:
        raise problem from None
    if point.time is None:  # a bare number is an offset to parse_point, not a time
        raise problem
    return point.time


def shadow(
    run_ids: Annotated[list[str] | None, typer.Argument(help="Runs to shadow (or --task).", show_default=False)] = None,
    module: Annotated[str, typer.Option("--module", help="The new code: a file or dotted module declaring the task.")] = "",
    task: Annotated[str | None, typer.Option("--task", help="Shadow every recent run of this task.")] = None,
    since: Annotated[str, typer.Option(help="With --task: runs created within this (24h, 7d) or since an ISO time.")] = "24h",
    timeout: Annotated[float, typer.Option(help="Seconds one run's shadow may take.")] = 30.0,
    log: LogOpt = DEFAULT_LOG_URL,
    as_json: JsonOpt = False,
) -> None:
    """Re-execute recorded runs against new code, outputs served from the journal
    (no side effects), and diff step names, inputs and outputs. Exits 1 if any diverges."""
    if not module:
        _fail("stepline shadow needs --module NEW_CODE (a .py file or a dotted module name)")
    if bool(run_ids) == (task is not None):
        _fail("pass run ids, or --task ID (with --since), not both and not neither")
    _require_log(log)

    async def go() -> list[ShadowResult] | ShadowSummary:
        registry = load_code(module)
        async with Client(log) as client:
            if task is None:
                return await shadow_runs(client, registry, run_ids or [], timeout)
            if task not in registry:
                raise CliError(f"{module} declares no task {task!r} (it declares: {', '.join(registry.ids()) or 'none'})")
            try:
                start = parse_since(since, client.clock())
            except ValueError as exc:
                raise CliError(str(exc)) from None
            with _progress("shadowing runs", threshold=1) as progress:
                return await shadow_task(client, registry, task, start, timeout=timeout, progress=progress)

    found = _run(go())
    if isinstance(found, ShadowSummary):
        _print_summary(found, as_json)
        diverged = bool(found.diverged)
    else:
        if as_json:
            _print_json([r.to_dict() for r in found] if len(found) > 1 else found[0].to_dict())
        else:
            for r in found:
                _print_result(r)
        diverged = any(r.diverged for r in found)
    if diverged:
        raise typer.Exit(1)


_MARK = {"same": " ", "input-changed": "~", "name-changed": "!", "new-step": "+", "missing-step": "-"}


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


def _print_result(r: Any) -> None:
    verdict = "[bold red]DIVERGES[/]" if r.diverged else "[bold green]same[/]"
    out.print(f"shadow of [bold]{r.run_id}[/] ({r.task_id}, {r.status}): {verdict}", highlight=False)
    versions = f"version {r.recorded_version or '-'} → {r.shadow_version or '-'}"
    out.print(versions + ("  (changed)" if r.version_changed else "  (unchanged)"), highlight=False, markup=False)
    table = Table(show_edge=False)
    for col in ("", "#", "recorded", "shadow", "verdict", "input (recorded → shadow)", "output served"):
        table.add_column(col)
    for s in r.steps:
        inputs = _short(s.recorded_input, 40)
        if s.verdict == "input-changed":
            inputs = f"{_short(s.recorded_input, 30)} → {_short(s.shadow_input, 30)}"
        table.add_row(_MARK.get(s.verdict, "?"), str(s.step), s.recorded_name or "-", s.shadow_name or "-",
                      s.verdict, inputs, _short(s.output, 40) if s.recorded_name else "")
    _print_table(table)
    if r.recorded_output is not None or r.shadow_output is not None:
        out.print(f"output: {_short(r.recorded_output, 200)} → {_short(r.shadow_output, 200)}",
                  highlight=False, markup=False)
    first = r.first_divergence()
    if first is not None:
        out.print(f"first divergence: {first['message']}", highlight=False, markup=False)


def _print_summary(summary: Any, as_json: bool) -> None:
    if as_json:
        _print_json(summary.to_dict())
        return
    c = summary.counts()
    out.print(f"shadowed {c['checked']} run(s) of {summary.task_id} since {iso_ms(summary.since)}: "
              f"{c['same']} same, {c['diverged']} would diverge, {c['version_changed']} on another version",
              highlight=False, markup=False)
    kinds = {k: v for k, v in c.items() if k not in ("checked", "same", "diverged", "version_changed")}
    if kinds:
        out.print("by first divergence: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())),
                  highlight=False, markup=False)
    for r in summary.diverged:
        first = r.first_divergence()
        out.print(f"  {r.run_id} ({r.status}): {first['message'] if first else '?'}", highlight=False, markup=False)


def diff(
    run_a: Annotated[str, typer.Argument(help="The first run (e.g. the original, or yesterday's good run).")],
    run_b: Annotated[str, typer.Argument(help="The second run (e.g. its fork, or today's failed run).")],
    log: LogOpt = DEFAULT_LOG_URL,
    as_json: JsonOpt = False,
) -> None:
    """Two runs step by step: names, inputs, outputs, errors, durations and versions side
    by side, the first divergence marked. Exits 1 when they differ."""
    async def go() -> RunDiff:
        async with Client(log) as client:
            return diff_runs(await client.get_run(run_a), await client.get_run(run_b))

    found = _run(go())
    if as_json:
        _print_json(found.to_dict())
    else:
        _print_diff(found)
    if not found.same:
        raise typer.Exit(1)


def _duration(ms: int | None) -> str:
    if ms is None:
        return "-"
    return f"{ms} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def _print_diff(d: RunDiff) -> None:
    a, b = d.a, d.b
    verdict = "[bold green]same[/]" if d.same else "[bold red]differ[/]"
    out.print(f"[bold]A[/] {a['run_id']} ({a['task_id']}, {a['status']})  [bold]B[/] {b['run_id']} "
              f"({b['task_id']}, {b['status']}): {verdict}", highlight=False)
    for key in ("task_id", "payload", "task_version", "status", "output", "error"):
        if key in d.run_differs:
            out.print(f"{key}: {_short(a[key], 100)} → {_short(b[key], 100)}", highlight=False, markup=False)
    table = Table(show_edge=False)
    for col in ("", "#", "A step", "B step", "differs", "A (input → output / error)",
                "B (input → output / error)", "A time", "B time"):
        table.add_column(col)

    def side(s: dict[str, Any] | None) -> str:
        if s is None:
            return "-"
        result = s["error"] if s["error"] is not None else _short(s["output"], 30)
        return f"{_short(s['input'], 25)} → {result}"

    for p in d.steps:
        mark = "▶" if p.step == d.first_divergence else ("≠" if p.differs else " ")
        table.add_row(mark, str(p.step), p.a["name"] if p.a else "-", p.b["name"] if p.b else "-",
                      ",".join(p.differs) or "", side(p.a), side(p.b),
                      _duration(p.a["duration_ms"]) if p.a else "", _duration(p.b["duration_ms"]) if p.b else "")
    _print_table(table)
    out.print(f"run time: A {_duration(a['duration_ms'])}, B {_duration(b['duration_ms'])}",
              highlight=False, markup=False)
    first = d.first_divergence
    if first is None:
        out.print("no divergence: same steps, inputs, outputs and errors", highlight=False, markup=False)
    elif isinstance(first, int):
        pair = next(p for p in d.steps if p.step == first)
        out.print(f"first divergence: step {first} ({', '.join(pair.differs)})", highlight=False, markup=False)
    else:
        out.print(f"first divergence: the run's {first}", highlight=False, markup=False)


def debug(
    run_id: Annotated[str, typer.Argument(help="The recorded run to debug.")],
    module: Annotated[str, typer.Option("--module", help="The code: a file or dotted module declaring the task.")] = "",
    break_at: Annotated[str | None, typer.Option(
        "--break-at", help="Stop at this step: a journal position or a step name (default: the failed step).")] = None,
    live_from: Annotated[int | None, typer.Option(
        "--live-from", help="Run the steps from this position for real instead of answering them (needs --yes).")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Accept that --live-from runs step bodies (side effects).")] = False,
    log: LogOpt = DEFAULT_LOG_URL,
) -> None:
    """Re-execute RUN's task body in this process with its completed steps answered from
    the journal (nothing appended), and stop in the debugger (pdb, or PYTHONBREAKPOINT's)
    at the step that failed or at --break-at. Exits 1 when the body raises."""
    if not module:
        _fail("stepline debug needs --module CODE (a .py file or a dotted module name declaring the task)")
    if live_from is not None and live_from < 0:
        _fail(f"--live-from must be a journal position (0 or more), got {live_from}")
    if live_from is not None and not yes:
        _fail(f"--live-from {live_from} runs the bodies of steps {live_from} and after for real, side effects "
              "and all (nothing is appended to the log): add --yes to do that")

    async def go() -> DebugSession:
        registry = load_code(module)
        async with Client(log) as client:
            state = await client.get_run(run_id)
            task = registry.find(state.task_id)
            if task is None:
                raise CliError(f"{module} declares no task {state.task_id!r}, the task of {run_id}")
            if break_at is None and state.status != "failed" and live_from is None:
                raise CliError(f"{run_id} is {state.status}, not failed: name the step to stop at with --break-at")
            return await debug_run(task, state, break_at=break_at, live_from=live_from, keys=client.keys)

    session = _run(go())
    if session.break_at is None and break_at is not None:
        err.print(f"stepline debug: the body never reached step {break_at!r}", highlight=False, markup=False)
    if session.inputs_differ:
        err.print("stepline debug: the inputs this code made differ from the recorded ones at position(s) "
                  + ", ".join(map(str, session.inputs_differ)), highlight=False, markup=False)
    if session.stopped is not None:
        err.print(f"stepline debug: {session.stopped}", highlight=False, markup=False)
    ending = session.ending
    if ending is not None and ending.raised is not None:
        err.print(f"stepline debug: the body raised {type(ending.raised).__qualname__}: {ending.raised}",
                  highlight=False, markup=False)
        raise typer.Exit(1)
    if ending is not None and session.stopped is None and ending.suspended is None:
        err.print(f"stepline debug: the body returned {_short(ending.returned, 200)}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("fork")(fork)
    app.command("shadow")(shadow)
    app.command("diff")(diff)
    app.command("debug")(debug)


__all__ = ["parse_since", "register"]
