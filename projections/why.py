"""Why is this run not running? (`stepline runs why`, the API, the dashboard.)

`explain` turns what the log knows of a run into the reasons it is not
executing now, each a kind, one sentence and the facts behind it: an
ended run says how it ended; a delayed one until when; a retrying one its
last error and the next attempt's time; a paused task or queue who paused
it, when and why; a limited queue the run's place among the waiters and
the runs holding the slots, the concurrency key's holders and the rate
limit's next free time; a suspended run what each open wait waits for and
since when (the sleep's wake time, the event and its match, the token, the
child run); and for every live run the time to live left. A pending run
with none of these is ready: it waits for a worker of its pool, and the
log says whether any worker of that pool is running.

Pure: the caller reads the run, its queue's admission fold and the pauses
(engine/client/why.py), and the clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from stepline.core.events import PAUSE_QUEUE, PAUSE_TASK
from stepline.projections.queues import QueueState
from stepline.projections.runs import (
    CANCELLED,
    COMPLETED,
    EXPIRED,
    FAILED,
    PENDING,
    RETRYING,
    RUNNING,
    SUSPENDED,
    RunState,
)


@dataclass(frozen=True, slots=True)
class Pause:
    scope: str  # PAUSE_TASK | PAUSE_QUEUE
    name: str
    reason: str
    requested_by: str
    time: int


@dataclass(frozen=True, slots=True)
class Reason:
    kind: str  # ended | running | delayed | retrying | paused | queue | concurrency_key | rate_limit | wait | ttl
    #            | ready | no_worker
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, **self.details}


def _in(ms: int, now: int) -> str:
    """`in 4.2 s` / `4.2 s ago`, for people."""
    delta = (ms - now) / 1000
    if abs(delta) < 0.05:
        return "now"
    text = f"{abs(delta):.1f} s" if abs(delta) < 120 else f"{abs(delta) / 60:.1f} min"
    return f"in {text}" if delta > 0 else f"{text} ago"


def _wait_reason(step: int, name: str, condition: str | None, since: int | None, wake_at: int | None,
                 now: int) -> Reason:
    cond: dict[str, Any] = json.loads(condition) if condition else {}
    details: dict[str, Any] = {"step": step, "wait": name, "since": since, "timeout_at": wake_at, **cond}
    since_text = f" since {_in(since, now)}" if since is not None else ""
    timeout = f"; it times out {_in(wake_at, now)}" if wake_at is not None and name != "sleep" else ""
    if name == "sleep":
        message = f"sleeping at step {step}{since_text}: it wakes {_in(wake_at, now) if wake_at else 'never'}"
    elif "event" in cond:
        match = cond.get("match")
        shown = f" matching {json.dumps(match, sort_keys=True)}" if match else ""
        message = f"waiting at step {step} for an event {cond['event']!r}{shown}{since_text}{timeout}"
    elif "token" in cond:
        message = f"waiting at step {step} for token {cond['token']}{since_text}{timeout}"
    elif "child" in cond:
        message = f"waiting at step {step} for child run {cond['child']} ({cond.get('task')}){since_text}{timeout}"
    else:
        message = f"waiting at step {step} ({name}){since_text}{timeout}"
    return Reason("wait", message, details)


def _queue_reasons(state: RunState, q: QueueState, now: int) -> list[Reason]:
    out: list[Reason] = []
    if state.run_id in q.holders:
        return out  # it holds its slot: the queue is not what holds it back
    waiting = sorted(q.waiting.values(), key=lambda w: (-w.priority, w.created_at, w.run_id))
    place = next((i for i, w in enumerate(waiting) if w.run_id == state.run_id), None)
    holders = sorted(q.holders)
    if place is not None:
        limit = f"its limit {q.limit}" if q.limit is not None else "no run limit"
        out.append(Reason("queue", f"queued in {q.name!r}: place {place + 1} of {len(waiting)}; "
                                   f"{len(holders)} run(s) hold its slots ({limit})",
                          {"queue": q.name, "position": place + 1, "waiting": len(waiting), "limit": q.limit,
                           "holders": holders}))
    key = state.concurrency_key
    if key is not None and q.key_limit is not None and q.per_key[key] >= q.key_limit:
        key_holders = sorted(r for r, k in q.holders.items() if k == key)
        out.append(Reason("concurrency_key", f"concurrency key {key!r} is at its limit {q.key_limit}: held by "
                                             + ", ".join(key_holders),
                          {"key": key, "key_limit": q.key_limit, "holders": key_holders}))
    allowed, free_at = q.rate_allows(now)
    if allowed == 0 and free_at is not None:
        out.append(Reason("rate_limit", f"{q.name!r}'s rate limit ({q.rate_limit} per {q.rate_period_ms} ms) "
                                        f"allows the next start {_in(free_at, now)}",
                          {"queue": q.name, "rate_limit": q.rate_limit, "period_ms": q.rate_period_ms,
                           "next_free_at": free_at}))
    return out


def explain(state: RunState, now: int, *, queue: QueueState | None = None,
            pauses: dict[tuple[str, str], Pause] | None = None, pool: str = "default",
            workers_alive: bool | None = None) -> list[Reason]:
    """The reasons `state`'s run is not executing at `now` (ms), most telling first."""
    status = state.status
    if status in (COMPLETED, FAILED, CANCELLED, EXPIRED):
        at = f" {_in(state.ended_at, now)}" if state.ended_at is not None else ""
        extra = " (dead-lettered: `stepline dlq retry` runs it again)" if state.dead_lettered else ""
        return [Reason("ended", f"it is not waiting: it ended {status}{at}{extra}",
                       {"status": status, "ended_at": state.ended_at})]
    out: list[Reason] = []
    if status == RUNNING:
        running = [s for s in state.steps.values() if s.status == "running"]
        where = ", ".join(f"step {s.step} ({s.name})" for s in sorted(running, key=lambda s: s.step))
        out.append(Reason("running", f"it is running: attempt {state.attempt_in_trigger}"
                                     + (f", in {where}" if where else ""),
                          {"attempt": state.attempt_in_trigger, "steps": [s.step for s in running]}))
    for scope, name in ((PAUSE_TASK, state.task_id), (PAUSE_QUEUE, state.queue)):
        pause = (pauses or {}).get((scope, name)) if name is not None else None
        if pause is not None and status != RUNNING:
            why = f": {pause.reason}" if pause.reason else ""
            out.append(Reason("paused", f"{scope} {name!r} is paused (by {pause.requested_by}, "
                                        f"{_in(pause.time, now)}{why})",
                              {"scope": scope, "name": name, "by": pause.requested_by, "at": pause.time,
                               "reason": pause.reason}))
    if status == PENDING and state.not_before is not None and state.not_before > now:
        out.append(Reason("delayed", f"delayed: it may start {_in(state.not_before, now)}",
                          {"not_before": state.not_before}))
    if status == RETRYING:
        last = state.errors[-1] if state.errors else None
        error = f" after {last.error.type}: {last.error.message}" if last is not None else ""
        at = _in(state.retry_at, now) if state.retry_at is not None else "when its owner schedules it"
        out.append(Reason("retrying", f"retrying{error}: attempt {state.attempt_in_trigger + 1} starts {at}",
                          {"retry_at": state.retry_at, "attempt": state.attempt_in_trigger + 1,
                           "error": None if last is None else f"{last.error.type}: {last.error.message}"}))
    if status in (PENDING, RETRYING) and queue is not None:
        out.extend(_queue_reasons(state, queue, now))
    if status == SUSPENDED:
        for s in sorted(state.steps.values(), key=lambda s: s.step):
            if s.status == "waiting":
                out.append(_wait_reason(s.step, s.name, s.condition, s.started_at, s.wake_at, now))
    if status == PENDING and not any(r.kind in ("paused", "delayed", "queue", "concurrency_key", "rate_limit")
                                     for r in out):
        whose = "a worker" if pool == "default" else f"a worker of pool {pool!r} (`stepline worker --pool {pool}`)"
        out.append(Reason("ready", f"ready to start: it waits for {whose} to pick it up", {"pool": pool}))
    if workers_alive is False and status in (PENDING, RETRYING, SUSPENDED):
        start = "stepline worker" + ("" if pool == "default" else f" --pool {pool}")
        out.append(Reason("no_worker", f"no worker of pool {pool!r} is running: nothing will start or wake it "
                                       f"until one does (`{start}`)", {"pool": pool}))
    if state.expires_at is not None and status == PENDING and state.started_at is None:
        out.append(Reason("ttl", f"unless it starts first, it expires {_in(state.expires_at, now)} (its TTL)",
                          {"expires_at": state.expires_at}))
    return out


__all__ = ["Pause", "Reason", "explain"]
