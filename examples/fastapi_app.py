"""A FastAPI app that starts a durable run per order and streams its status.

    .venv/bin/python examples/fastapi_app.py          # uvicorn on 127.0.0.1:$PORT (8000; 0 picks a free port)

    curl -s -X POST localhost:8000/orders -H 'content-type: application/json' -d '{"order_id": "42"}'
    curl -N localhost:8000/orders/RUN_ID/status

`POST /orders` triggers `place-order` and answers 202 `{"run_id": ...}`;
the order id is the idempotency key, so a client that repeats its POST gets
the same run. `GET /orders/{run_id}/status` streams the run's status as
NDJSON, one line per change (running, suspended while it waits for the
warehouse, running again, completed with the output) until the run ends.

The Stepline client opens in the app's lifespan. For the demo a Worker runs
in the same process; in production the web app keeps only the Client and
workers run apart: `stepline worker examples/fastapi_app.py`. Needs
`fastapi` and `uvicorn`. The log is `.stepline/stepline.db` unless
STEPLINE_LOG says otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

import stepline as sl

STEP_SECONDS = float(os.environ.get("ORDER_STEP_SECONDS", "0.5"))
WAREHOUSE_WAIT = timedelta(seconds=float(os.environ.get("ORDER_WAIT_SECONDS", "1")))
POLL_SECONDS = 0.1


class OrderIn(BaseModel):
    order_id: str


@sl.step
async def reserve_stock(order_id: str) -> str:
    await asyncio.sleep(STEP_SECONDS)  # the inventory service
    return f"res_{order_id}"


@sl.step
async def book_courier(reservation: str) -> str:
    await asyncio.sleep(STEP_SECONDS)  # the courier's API
    return f"trk_{reservation}"


@sl.task(id="place-order")
async def place_order(order: OrderIn) -> dict:
    reservation = await reserve_stock(order.order_id)
    await sl.sleep(WAREHOUSE_WAIT)  # durable: the run is suspended and holds no worker slot
    tracking = await book_courier(reservation)
    return {"order_id": order.order_id, "status": "shipped", "tracking": tracking}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with sl.Client(os.environ.get("STEPLINE_LOG", sl.DEFAULT_LOG_URL)) as client:
        # Demo only: in production, `stepline worker` runs the tasks in its own processes.
        async with sl.Worker(sl.default_registry, client.log, client=client):
            app.state.stepline = client
            yield


app = FastAPI(title="orders", lifespan=lifespan)


@app.post("/orders", status_code=202)
async def create_order(order: OrderIn, request: Request) -> dict[str, str]:
    client: sl.Client = request.app.state.stepline
    handle = await place_order.trigger(order, idempotency_key=f"order-{order.order_id}", client=client)
    return {"run_id": handle.run_id}


@app.get("/orders/{run_id}/status")
async def order_status(run_id: str, request: Request) -> StreamingResponse:
    client: sl.Client = request.app.state.stepline
    try:
        await client.get_run(run_id)
    except sl.UnknownRun:
        raise HTTPException(404, f"no run {run_id}") from None
    return StreamingResponse(status_changes(client, run_id), media_type="application/x-ndjson")


async def status_changes(client: sl.Client, run_id: str) -> AsyncIterator[str]:
    """One JSON line per status change, until the run ends.

    Polls `get_run`, which folds the run's events from the log: plenty for a
    demo; behind many watchers, `stepline serve`'s `/v1/stream` pushes run
    changes from a query projection instead.
    """
    last = None
    while True:
        state = await client.get_run(run_id)
        if state.status != last:
            last = state.status
            line: dict = {"run_id": run_id, "status": state.status, "attempt": state.attempt}
            if state.output is not None:
                line["output"] = json.loads(state.output.data)
            if state.error is not None:
                line["error"] = f"{state.error.type}: {state.error.message}"
            yield json.dumps(line) + "\n"
        if not state.live:
            return
        await asyncio.sleep(POLL_SECONDS)


def main() -> None:
    sl.configure_logging(json_logs=False, level=logging.WARNING)
    # Bound here rather than by uvicorn so that with PORT=0 the port below is the real one.
    sock = socket.create_server(("127.0.0.1", int(os.environ.get("PORT", "8000"))))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    print(f"listening on {base}", flush=True)
    print(f"  curl -s -X POST {base}/orders -H 'content-type: application/json' -d '{{\"order_id\": \"42\"}}'")
    print(f"  curl -N {base}/orders/RUN_ID/status", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # Ctrl+C: uvicorn has shut down (lifespan exited) and re-raised it


if __name__ == "__main__":
    main()
