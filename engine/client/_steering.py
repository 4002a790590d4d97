"""Steering runs that exist: cancel, retry from the dead letters, pause, fork, complete waits and tokens."""

from __future__ import annotations

from typing import Any

from stepline.client._reading import Reading
from stepline.client.pause import pauses, scope_of, set_paused
from stepline.core.events import (
    ErrorInfo,
    Event,
    Payload,
    RunCancelled,
    RunRetriggered,
    WaitCompleted,
)
from stepline.core.ids import TOKEN, new_event_id, parse_token
from stepline.core.payloads import ANY
from stepline.errors import (
    InvalidRunState,
    InvalidToken,
)
from stepline.projections.runs import (
    CANCELLED,
    FAILED,
    LIVE,
    TERMINAL,
    RunState,
)
from stepline.sdk.task import Task


class Steering(Reading):
    """Requests about runs that exist (any process may append them)."""

    async def cancel(self, run_id: str, reason: str = "cancelled by request") -> RunState:
        state = await self.get_run(run_id)
        if state.status not in LIVE:
            raise InvalidRunState(f"run {run_id} is already {state.status}; nothing to cancel")
        body = RunCancelled(reason, "client")
        await self._append(Event(new_event_id(), body.TYPE, run_id, state.task_id, 0, self.clock(), 0, body))
        return state

    async def retry(self, run_id: str, payload: Any = None, *, new_payload: bool = False) -> RunState:
        """Re-trigger a failed (dead-lettered) or cancelled run.

        It resumes from its last completed step; with `new_payload=True` the
        given payload replaces the original (validated against the task when
        the client knows it).
        """
        state = await self.get_run(run_id)
        if state.status not in (FAILED, CANCELLED):
            raise InvalidRunState(
                f"run {run_id} is {state.status}; only failed or cancelled runs can be retried"
            )
        replacement: Payload | None = None
        if new_payload:
            t: Task[Any, Any] | None = None
            if self.registry is not None and state.task_id in self.registry:
                t = self.registry.get(state.task_id)
            pcodec = t.payload_codec if t else ANY
            replacement = pcodec.check_and_dump(payload, f"payload for task {state.task_id!r}")
            replacement = await self._seal(t, replacement, f"payload for task {state.task_id!r}")
        body = RunRetriggered(replacement, "client")
        await self._append(Event(new_event_id(), body.TYPE, run_id, state.task_id, 0, self.clock(), 0, body))
        return state

    async def pause(self, *, task: str | None = None, queue: str | None = None, reason: str = "",
                    requested_by: str = "api") -> None:
        """Pause a task or a queue (name one): its runs stay queued, new
        triggers are still recorded, attempts under way finish. Holds across
        every worker and restart until `resume`; see engine/client/pause.py."""
        scope, name = scope_of(task, queue)
        await set_paused(self, scope, name, True, reason=reason, requested_by=requested_by)

    async def resume(self, *, task: str | None = None, queue: str | None = None,
                     requested_by: str = "api") -> None:
        """Resume a paused task or queue: its held runs start in their usual order."""
        scope, name = scope_of(task, queue)
        await set_paused(self, scope, name, False, requested_by=requested_by)

    async def paused(self) -> dict[tuple[str, str], str]:
        """What is paused: (scope, name) -> the reason given."""
        return {key: body.reason for key, body in (await pauses(self)).items()}

    async def resolve_wait(
        self, run_id: str, task_id: str, step: int, reason: str, source: str,
        output: Payload | None = None, error: ErrorInfo | None = None, *, pool: str | None = None,
    ) -> int:
        """Append WaitCompleted: the first resolution of a wait wins, repeats are no-ops.
        `pool`: the run's worker pool when the caller knows it (else it is looked up)."""
        body = WaitCompleted(step, reason, source, output, error)
        return await self._append(Event(new_event_id(), body.TYPE, run_id, task_id, 0, self.clock(), 0, body), pool)

    async def complete_token(self, token: str, data: Any = None) -> RunState:
        """Resume the run waiting on `token` (`wait_for_token`) with `data`.

        Raises InvalidToken for a malformed token or one that was already
        completed or timed out, and InvalidRunState when its run has ended.
        """
        run_id, step = parse_token(token)
        state = await self.get_run(run_id)
        if state.status in TERMINAL:
            raise InvalidRunState(f"run {run_id} is already {state.status}; token {token} cannot complete it")
        rec = state.steps.get(step)
        if rec is not None and rec.status != "waiting":
            raise InvalidToken(f"token {token} was already {'completed' if rec.output else 'resolved or timed out'}")
        if rec is not None and rec.name != TOKEN:
            raise InvalidToken(f"token {token} does not name a token wait (step {step} is {rec.name!r})")
        output = ANY.dump(data, f"data for token {token}")
        await self.resolve_wait(run_id, state.task_id, step, TOKEN, token, output=output)
        return state

    # --- reading -------------------------------------------------------------
