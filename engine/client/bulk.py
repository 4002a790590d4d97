"""Bulk cancel, retry and replay of the runs a filter selects.

The filter is the run list's own (`RunFilter`: task, statuses, tags, a
creation window, payload text, dead letter, parent, error type), and the
runs acted on are read page by page from the same query projection that
`GET /v1/runs` and the dashboard list: what the list shows is what the
action touches. A page is acted on, then the next one is read (keyset, 500
at a time), so a million matching runs never sit in memory at once.

* `cancel`: a live run (pending, running, suspended, retrying) gets a
  `RunCancelled` request; an ended one is skipped.
* `retry`: a failed or cancelled run gets a `RunRetriggered` request, as
  `stepline dlq retry` does: it resumes from its last completed step.
* `replay`: an ended run (completed, failed, cancelled, expired) gets a new
  run of the same task with the same payload, tags and priority, from
  scratch: a fork at step 0 (`forked_from` names the original). Its run id
  is the idempotent id of `stepline/replay/<request id>/<run id>`.

Each action is idempotent per (request id, run): a cancel or retrigger
carries an event id derived from both, and the fold applies a request id
once (`RunState.requests`); a replay maps to one run id. Repeating a
request, after a timeout or a double click, acts on nothing twice. A run
whose state changed since the projection saw it is decided by the fold
when the request is read: a cancel of a run that completed meanwhile, or
a retrigger of one that is not failed any more, changes nothing.

Runs created after the request began are never included: without an
explicit `created_to`, the window ends when the request starts (and the
report says where), so replays the request itself creates stay out; and a
repeated replay request skips the runs it made the first time.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from stepline.core.events import Body, Event, RunCancelled, RunRetriggered
from stepline.core.ids import idempotent_run_id
from stepline.errors import SteplineError
from stepline.projections.query_store import QueryStore, RunFilter
from stepline.projections.runs import CANCELLED, FAILED, LIVE, TERMINAL

if TYPE_CHECKING:
    from stepline.client._client import Client

CANCEL = "cancel"
RETRY = "retry"
REPLAY = "replay"
ACTIONS = (CANCEL, RETRY, REPLAY)

# Runs read (and acted on) per page.
PAGE = 500
# Run ids the report names; the counts cover the rest.
SAMPLE = 20


class InvalidBulkRequest(SteplineError, ValueError):
    """A bulk action or filter that makes no sense (unknown action, bad field)."""


def bulk_event_id(request_id: str, action: str, run_id: str) -> str:
    """The event id of a bulk request's cancel or retrigger of one run.

    NEVER change this format: a repeated request must carry the same ids,
    so the fold recognises them as applied already.
    """
    digest = hashlib.sha256(f"stepline/bulk/v1\x00{request_id}\x00{action}\x00{run_id}".encode()).hexdigest()
    return digest[:32]


def replay_key(request_id: str, run_id: str) -> str:
    """The idempotency key of a replay: one new run per (request, original).

    NEVER change this format: a repeated request must map to the same runs.
    """
    return f"stepline/replay/{request_id}/{run_id}"


def skip_reason(action: str, status: str) -> str | None:
    """Why a run in `status` is skipped by `action`, or None when it is acted on."""
    if action == CANCEL:
        return None if status in LIVE else f"already {status}"
    if action == RETRY:
        return None if status in (FAILED, CANCELLED) else f"{status}, not failed or cancelled"
    return None if status in TERMINAL else f"still {status}"


@dataclass(frozen=True)
class BulkReport:
    action: str
    request_id: str
    dry_run: bool
    where: RunFilter
    matched: int = 0  # runs the filter selected
    acted: int = 0  # requests appended (on a dry run: would be)
    skipped: Mapping[str, int] = field(default_factory=dict)  # reason -> runs
    sample: tuple[str, ...] = ()  # the first run ids acted on (replays: the new runs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action, "request_id": self.request_id, "dry_run": self.dry_run,
            "filter": filter_dict(self.where), "matched": self.matched, "acted": self.acted,
            "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values()),
            "sample": list(self.sample),
        }


def filter_dict(f: RunFilter) -> dict[str, Any]:
    """A filter in the API's names (`GET /v1/runs` query parameters); unset fields left out."""
    out: dict[str, Any] = {
        "task": f.task, "status": list(f.statuses) or None, "tag": list(f.tags) or None,
        "from": f.created_from, "to": f.created_to, "q": f.text, "dead_letter": f.dead_letter,
        "parent": f.parent, "error_type": f.error_type,
    }
    return {k: v for k, v in out.items() if v is not None}


async def bulk_action(
    client: Client, store: QueryStore, action: str, where: RunFilter, *, dry_run: bool = False,
    request_id: str | None = None, requested_by: str = "api", page_size: int = PAGE,
) -> BulkReport:
    """Cancel, retry or replay every run `where` selects in `store`; a dry run only counts.

    Reads the store a page at a time, newest first; acts on a page (its
    appends in flight together) before reading the next. Returns the counts.
    """
    if action not in ACTIONS:
        raise InvalidBulkRequest(f"unknown bulk action {action!r}; one of {', '.join(ACTIONS)}")
    if request_id is not None and (not request_id.strip() or len(request_id) > 200):
        raise InvalidBulkRequest("request_id must be a non-empty string of at most 200 characters")
    request_id = request_id or uuid.uuid4().hex
    if where.created_to is None:
        where = replace(where, created_to=client.clock() + 1)
    matched = acted = 0
    skipped: dict[str, int] = {}
    sample: list[str] = []
    cursor: str | None = None
    while True:
        page = await store.list_runs(where, page_size, cursor)
        todo: list[dict[str, Any]] = []
        own = replay_key(request_id, "")
        for run in page.items:
            matched += 1
            key = run.get("idempotency_key")
            # A repeated replay request must not replay the runs it made.
            reason = ("made by this request" if key is not None and key.startswith(own)
                      else skip_reason(action, run["status"]))
            if reason is None:
                todo.append(run)
            else:
                skipped[reason] = skipped.get(reason, 0) + 1
        if todo and not dry_run:
            done = await _act(client, store, action, todo, request_id, requested_by)
        else:
            done = [run["run_id"] for run in todo]
        acted += len(done)
        sample.extend(done[: max(0, SAMPLE - len(sample))])
        cursor = page.next_cursor
        if cursor is None:
            break
    return BulkReport(action, request_id, dry_run, where, matched, acted, skipped, tuple(sample))


async def _act(client: Client, store: QueryStore, action: str, runs: Sequence[dict[str, Any]],
               request_id: str, requested_by: str) -> list[str]:
    """Append one page's requests together; the run ids acted on (for replays, the new runs)."""
    if action == REPLAY:
        return await _replay(client, store, runs, request_id)
    now = client.clock()
    appends = []
    for run in runs:
        body: Body = (RunCancelled(f"bulk cancel {request_id}", requested_by) if action == CANCEL
                      else RunRetriggered(None, requested_by))
        ev = Event(bulk_event_id(request_id, action, run["run_id"]), body.TYPE, run["run_id"], run["task_id"],
                   0, now, 0, body)
        appends.append(client._append(ev))
    await asyncio.gather(*appends)
    return [run["run_id"] for run in runs]


async def _replay(client: Client, store: QueryStore, runs: Sequence[dict[str, Any]], request_id: str) -> list[str]:
    from stepline.client.fork import fork_trigger

    states = await store.load_runs([run["run_id"] for run in runs])
    now = client.clock()
    appends, new_ids = [], []
    for run in runs:
        state = states.get(run["run_id"])
        if state is None:
            continue  # listed but not stored: the row and its state are written together, so never
        key = replay_key(request_id, state.run_id)
        body = fork_trigger(state, 0, idempotency_key=key)
        new_id = idempotent_run_id(state.task_id, key)
        pool = (client.registry.pool_of(state.task_id) if client.registry is not None else None) \
            or await client.home(state.run_id)
        appends.append(client._append_trigger(Event(
            bulk_event_id(request_id, REPLAY, state.run_id), body.TYPE, new_id, state.task_id, 1, now, 0, body),
            pool))
        new_ids.append(new_id)
    await asyncio.gather(*appends)
    return new_ids


__all__ = [
    "ACTIONS",
    "BulkReport",
    "InvalidBulkRequest",
    "bulk_action",
    "bulk_event_id",
    "filter_dict",
    "replay_key",
    "skip_reason",
]
