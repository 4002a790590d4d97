"""Sensitive fields around an attempt: opened for the task body, scrubbed from what it records.

The ciphers, the key store and the envelopes are `stepline.security`'s; this
module applies them to a run's attempt, whose context and task are the sdk's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any
from weakref import WeakKeyDictionary

import structlog

from stepline.core.events import JSON, Body, Payload
from stepline.projections.runs import RunState
from stepline.sdk.context import Emitter, RunContext
from stepline.sdk.task import Task
from stepline.security.keystore import KeyStore
from stepline.security.sensitive import ERASED, Scrubber, unseal, values_at

_log = structlog.get_logger("stepline.sensitive")


# The scrubber of each attempt that has sensitive values, for its log lines.
_scrubbers: WeakKeyDictionary[RunContext, Scrubber] = WeakKeyDictionary()


def scrub_line(ctx: RunContext, message: str, fields: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A structlog line of a run with its sensitive values cut out."""
    scrubber = _scrubbers.get(ctx) if _scrubbers else None
    if scrubber is None:
        return message, fields
    return scrubber.text(message), {k: scrubber.value(v) for k, v in fields.items()}


def _scrubbing(emit: Emitter, scrubber: Scrubber) -> Emitter:
    def scrubbed(body: Body) -> asyncio.Future[int]:
        return emit(scrubber.body(body))

    return scrubbed


async def open_run(task: Task[Any, Any], state: RunState, ctx: RunContext) -> RunState:
    """The run as its attempt sees it: sensitive fields decrypted, and the
    attempt's recordings and log lines scrubbed of them from here on.

    Raises SubjectErased when the subject was forgotten (the attempt fails
    without retry), KeyStoreError when the key store cannot answer.
    """
    spec = task.sensitive
    if spec is None:
        return state
    payload, values, _ = await unseal(spec, state.payload, ctx.keys, f"run {state.run_id} of task {task.id!r}")
    if payload is state.payload and any(v is not None for v in values):
        # Triggered by a process that did not know the task (a bare task id
        # without its app), or before the fields were marked: say so, once per attempt.
        _log.warning("sensitive fields of this run are in plaintext on the log; trigger it where "
                     "the task's definition is loaded", run_id=state.run_id, task_id=task.id,
                     fields=spec.describe())
    scrubber = Scrubber(values)
    if scrubber:
        _scrubbers[ctx] = scrubber
        ctx.emit = _scrubbing(ctx.emit, scrubber)
    return dataclasses.replace(state, payload=payload)


def watch_values(task: Task[Any, Any], state: RunState, ctx: RunContext) -> None:
    """Scrub the structlog lines of an attempt whose payload is already plain:
    an isolated child's (its worker opened the run and scrubs what it records)."""
    spec = task.sensitive
    if spec is None or ctx in _scrubbers or state.payload.content_type != JSON:
        return
    doc = json.loads(state.payload.data)
    scrubber = Scrubber(values_at(spec, doc))
    if scrubber:
        _scrubbers[ctx] = scrubber


async def open_for_replay(task: Task[Any, Any], payload: Payload, keys: KeyStore | None) -> tuple[Payload, bool]:
    """A recorded payload for a replay check: decrypted where the key lives,
    "[erased]" where it was forgotten; and whether anything was erased."""
    spec = task.sensitive
    if spec is None:
        return payload, False
    opened, _, erased = await unseal(spec, payload, keys, f"replay of task {task.id!r}", erased_as=ERASED)
    return opened, erased


__all__ = ["open_for_replay", "open_run", "scrub_line", "watch_values"]
