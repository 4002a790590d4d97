"""`stepline runs why RUN`: what holds a run back (engine/client/why.py explains).

Registered on the CLI's `runs` group by `engine/cli/main.py`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from stepline.cli._common import _print_json, _require_log, _run, out
from stepline.cli.options import JsonOpt, LogOpt
from stepline.client import Client
from stepline.log import DEFAULT_LOG_URL
from stepline.projections.runs import RunState
from stepline.projections.why import Reason


def runs_why(
    run_id: Annotated[str, typer.Argument(help="The run.")],
    log: LogOpt = DEFAULT_LOG_URL,
    as_json: JsonOpt = False,
) -> None:
    """Why is this run not running? Its queue place and the slots' holders, the concurrency
    key's holders, the rate limit, a pause, the sleep or wait and since when, the TTL left."""
    _require_log(log)
    async def go() -> tuple[RunState, list[Reason]]:
        async with Client(log) as client:
            return await client.get_run(run_id), await client.why(run_id)

    state, reasons = _run(go())
    if as_json:
        _print_json({"run_id": run_id, "task_id": state.task_id, "status": state.status,
                     "reasons": [r.to_dict() for r in reasons]})
        return
    out.print(f"{run_id} ({state.task_id}) is {state.status}:", highlight=False, markup=False)
    for r in reasons:
        out.print(f"  - {r.message}", highlight=False, markup=False)


def register(runs_app: typer.Typer) -> None:
    runs_app.command("why")(runs_why)


__all__ = ["register"]
