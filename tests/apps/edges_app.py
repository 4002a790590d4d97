"""Tasks for tests/test_cli_edges.py."""

from __future__ import annotations

import stepline as sl


@sl.task(id="fails-at-once", retry=sl.Retry(max_attempts=1))
async def fails_at_once(p: dict[str, int]) -> int:
    # Before any step: a dead letter with no completed step.
    raise ValueError("no step ran")


@sl.task(id="a-task-with-a-rather-long-name-for-a-narrow-column")
async def long_name(p: dict[str, int]) -> str:
    sl.logger.info("greeting the pipe", n=p.get("n", 0))
    return "done"


@sl.task(id="hands-out-a-token")
async def hands_out_a_token(p: dict[str, int]) -> str:
    token = sl.create_token()
    sl.logger.info("approval requested", token=token.id, api_token="s3cr3t-value")
    return token.id
