"""JSON views of run state and events, the one shape the HTTP API, the dashboard and the CLI's `--json` share."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from stepline.core.events import Event, Payload
from stepline.core.payloads import payload_json
from stepline.projections.runs import RunState


def state_dict(s: RunState) -> dict[str, Any]:
    return {
        "run_id": s.run_id,
        "task_id": s.task_id,
        "status": s.status,
        "dead_lettered": s.dead_lettered,
        "attempt": s.attempt,
        "created_at": s.created_at,
        "updated_at": s.updated_at,
        "ended_at": s.ended_at,
        "priority": s.priority,
        "tags": list(s.tags),
        "idempotency_key": s.idempotency_key,
        "payload": payload_json(s.payload),
        "output": payload_json(s.output),
        "error": None if s.error is None else {
            "type": s.error.type, "message": s.error.message, "stack": s.error.stack,
        },
        "wake_at": s.wake_at,
        "retry_at": s.retry_at,
        "started_at": s.started_at,
        "expires_at": s.expires_at,
        "queue": s.queue,
        "concurrency_key": s.concurrency_key,
        "parent_run_id": s.parent_run_id,
        "parent_step": s.parent_step,
        "forked_from": s.forked_from,
        "forked_at_step": s.forked_at_step,
        "task_version": s.task_version,
        "patches": [{"patch": x.patch, "applied": x.applied, "step": x.step} for x in s.patches],
        "errors": [
            {"attempt": e.attempt, "step": e.step, "step_name": e.step_name, "time": e.time,
             "type": e.error.type, "message": e.error.message, "stack": e.error.stack}
            for e in s.errors
        ],
        "steps": [
            {
                "step": st.step, "name": st.name, "status": st.status, "attempt": st.attempt,
                "started_at": st.started_at, "ended_at": st.ended_at,
                "input": payload_json(st.input), "output": payload_json(st.output),
                "error": None if st.error is None else f"{st.error.type}: {st.error.message}",
                "wake_at": st.wake_at,
                "condition": None if st.condition is None else json.loads(st.condition),
            }
            for st in sorted(s.steps.values(), key=lambda x: x.step)
        ],
        "retries": [
            {"attempt": r.attempt, "retry_at": r.retry_at, "delay_ms": r.delay_ms, "reason": r.reason}
            for r in s.retries
        ],
        "logs": [{"time": lg.time, "level": lg.level, "message": lg.message, "attempt": lg.attempt,
                  "step": lg.step, "fields": json.loads(lg.fields) if lg.fields else {}} for lg in s.logs],
        "logs_dropped": s.logs_dropped,
    }


def _plain(v: Any, stacks: bool) -> Any:
    """A body field as JSON: payloads parsed, records as objects (a fork's copied journal)."""
    if isinstance(v, Payload):
        return payload_json(v)
    if hasattr(v, "__slots__"):
        return {k: _plain(getattr(v, k), stacks) for k in v.__slots__ if k != "stack" or stacks}
    if isinstance(v, tuple):
        return [_plain(x, stacks) for x in v]
    return v


def event_dict(offset: int, ev: Event, stacks: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for f in dataclasses.fields(ev.body):
        body[f.name] = _plain(getattr(ev.body, f.name), stacks)
    return {"offset": offset, "time": ev.time, "type": ev.type, "seq": ev.seq, "epoch": ev.epoch,
            "run_id": ev.run_id, "task_id": ev.task_id, "body": body}


__all__ = ["event_dict", "state_dict"]
