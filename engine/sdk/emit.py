"""`stepline.emit`: records for your own Kafka topics, exactly once per step.

    @sl.step
    async def charge(order: Order) -> str:
        receipt = await payments.charge(order)          # idempotent by sl.idempotency_key()
        await sl.emit("billing.charged", {"order": order.id, "receipt": receipt}, key=order.id)
        return receipt

What a step emits is held in the attempt until the step returns, then
produced in ONE Kafka transaction with the step's checkpoint
(StepCompleted). Consumers of the topic that read with
isolation_level=read_committed see the records if and only if the step
completed:

* a step that raises emits nothing (its records never leave the process);
* a worker killed before the commit leaves an open transaction that the
  partition's next owner aborts when it claims the partition; the step
  runs again and emits again, and only that copy commits;
* a completed step is never executed again (journal replay returns its
  recorded output), so its records are never produced twice.

Needs a kafka:// log with transactions (the default); elsewhere `emit`
raises EmitUnsupported. See docs/emit.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic_core import to_json

from stepline.errors import EmitUnsupported, NotInRunContext, PayloadValidationError
from stepline.log.base import Outgoing
from stepline.sdk.context import _step_position, require_run

Headers = Mapping[str, str | bytes] | Sequence[tuple[str, str | bytes]]


async def emit(
    topic: str,
    value: Any,
    key: str | bytes | None = None,
    headers: Headers | None = None,
) -> None:
    """Produce `value` to the Kafka topic `topic` when, and only when, the
    current step's checkpoint commits (one transaction for both).

    `value` and `key`: bytes are sent as they are, str as UTF-8, anything
    else as JSON. The record goes to the topic by its broker name (no
    namespace prefix), partitioned by key as Kafka's default partitioner
    does. The topic must exist. Call it inside a `@stepline.step`.
    """
    ctx = require_run("stepline.emit()")
    pos = _step_position.get()
    if pos is None:
        raise NotInRunContext(
            "stepline.emit() must be called inside a @stepline.step: its records are "
            "committed together with that step's checkpoint"
        )
    log_ = ctx.emit_log
    if log_ is None:  # an isolated child process, a test kit, a shadow replay
        raise EmitUnsupported(f"run {ctx.run_id} of task {ctx.task_id!r} has no worker log to emit through")
    if not log_.transactional:
        raise EmitUnsupported(f"the worker's log is {log_.url}")
    where = f"stepline.emit to {topic!r} in step {pos} of run {ctx.run_id}"
    record = Outgoing(
        topic,
        None if key is None else _bytes(key, f"key of {where}"),
        _bytes(value, f"value of {where}"),
        _headers(headers, where),
    )
    await log_.check_outgoing(topic)
    ctx.outbox.setdefault(pos, []).append(record)


def _bytes(value: Any, where: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    try:
        return to_json(value)
    except Exception as exc:  # pydantic_core raises several kinds
        raise PayloadValidationError(where, f"not bytes, str or JSON-serialisable: {exc}") from exc


def _headers(headers: Headers | None, where: str) -> tuple[tuple[str, bytes], ...]:
    if headers is None:
        return ()
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    out: list[tuple[str, bytes]] = []
    for name, value in pairs:
        if not isinstance(name, str):
            raise PayloadValidationError(f"headers of {where}", f"header name {name!r} is not a str")
        out.append((name, value if isinstance(value, bytes) else str(value).encode()))
    return tuple(out)
