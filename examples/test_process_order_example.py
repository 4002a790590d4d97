"""Unit tests for examples/process_order.py, written the way a user would.

    .venv/bin/python -m pytest examples/test_process_order_example.py

`stepline_engine` (from `pytest_plugins = ["stepline.testing"]` in
conftest.py) is the real worker and client on an in-memory log and a
virtual clock: the payment retry's back-off and the durable sleep take no
real time.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import process_order as app
import pytest

from stepline.testing import TestEngine


@pytest.fixture(autouse=True)
def fresh_counters(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    app.calls.clear()
    # A long sleep costs nothing on the virtual clock.
    monkeypatch.setattr(app, "SLEEP", timedelta(hours=1))
    yield


async def test_the_order_completes_and_the_payment_is_retried_without_fetching_again(
    stepline_engine: TestEngine,
) -> None:
    result = await stepline_engine.run(app.process_order, app.OrderIn(order_id="order-7"))

    assert result["status"] == "completed" and result["orderId"] == "order-7"
    assert app.calls == {"fetch_order": 1, "charge_payment": 2, "send_confirmation_email": 1}
    assert stepline_engine.clock.elapsed >= timedelta(hours=1, seconds=1)  # back-off + sleep


async def test_the_retry_is_recorded_with_its_reason(stepline_engine: TestEngine) -> None:
    handle = await app.process_order.trigger(app.OrderIn(order_id="order-8"))
    await handle.result()

    state = await stepline_engine.get_run(handle)
    [retry] = state.retries
    assert retry.attempt == 2 and "GatewayTimeout" in retry.reason
    assert 1_000 <= retry.delay_ms < 2_000  # Retry(min_timeout=1), jittered


@pytest.mark.stepline(auto_advance=False)
async def test_no_confirmation_is_sent_before_the_sleep_ends(stepline_engine: TestEngine) -> None:
    handle = await app.process_order.trigger(app.OrderIn(order_id="order-9"))
    await stepline_engine.advance(timedelta(seconds=2))  # past the payment's back-off (1-2 s)

    state = await stepline_engine.get_run(handle)
    assert state.status == "suspended"
    assert app.calls["charge_payment"] == 2 and app.calls["send_confirmation_email"] == 0

    await stepline_engine.advance(timedelta(hours=1))
    assert (await handle.result())["status"] == "completed"
    assert app.calls["send_confirmation_email"] == 1
