"""`stepline debug RUN --module app.py`: a recorded run's body again, in this
process, under the user's debugger.

The body runs in the sandbox of replays and shadows (_sandbox.py): every
position the history completed answers from the run's journal (no step body
runs, nothing reaches the log, a trigger or publish in the body fails), and
the session stops in the debugger at the *break step*: the step that failed
(the highest failed position), or the one `--break-at` names.

* A break step with no recorded output (the failed one) runs its body in
  this process: that is the code being debugged. The debugger opens on the
  line that calls it, with `name`, `position`, `args`, `kwargs` and the
  recorded `error` in scope; stepping in (`s` in pdb) enters the body.
* A break step the history completed opens the debugger before its
  recorded output is handed back (`recorded_output` in scope); its body does
  not run unless `live_from` says so.
* From `live_from` on, positions are not answered: steps run for real,
  side effects and all (the CLI asks for `--yes`), still appending nothing.
* A run that failed outside any step gets a post-mortem on what the body
  raises.

Which debugger: `breakpoint()`, so `PYTHONBREAKPOINT` chooses (pdb by
default; `debugpy`, `pydevd_pycharm` and others attach as they do to any
program; `PYTHONBREAKPOINT=0` runs the session with no stop).
"""

from __future__ import annotations

import os
import pdb
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from stepline.core.payloads import describe_args, payload_json
from stepline.history._sandbox import Ending, Stop, run_sandboxed, sandbox_context
from stepline.projections.runs import DONE_STEPS, FAILED, RunState, StepState
from stepline.sdk.context import RunContext
from stepline.sdk.task import Task
from stepline.security.keystore import KeyStore
from stepline.security.sensitive import ERASED, unseal


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _default_debugger() -> bool:
    """True when `breakpoint()` opens pdb (no PYTHONBREAKPOINT, or pdb's own)."""
    hook = os.environ.get("PYTHONBREAKPOINT", "")
    return hook in ("", "pdb.set_trace", "pdb.Pdb.set_trace")


@dataclass
class DebugSession:
    """What a session did: where it broke, how the body ended."""

    run_id: str
    break_at: int | None  # the position it broke at (None: it never reached one)
    stopped: str | None = None  # why the body was cut short, if it was
    ending: Ending | None = None
    inputs_differ: list[int] = field(default_factory=list)  # positions whose re-made inputs are not the recorded ones

    @property
    def raised(self) -> BaseException | None:
        return None if self.ending is None else self.ending.raised


class _DebugContext(RunContext):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.break_pos: int | None = None
        self.break_name: str | None = None
        self.live_from: int | None = None
        self.broke: int | None = None
        self.stopped: str | None = None
        self.inputs_differ: list[int] = []
        self._args: tuple[str, Any] | None = None
        self.call_step = self._call_step

    def _is_break(self, pos: int, name: str) -> bool:
        if self.broke is not None:
            return False
        if self.break_pos is None and self.break_name == name:
            self.break_pos = pos
        return pos == self.break_pos

    def observe_step(self, name: str, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        self._args = (name, payload_json(describe_args(args, kwargs)))

    def next_position(self, name: str) -> tuple[int, StepState | None]:
        if self.stopped is not None:
            raise Stop  # a parallel branch went past where another stopped
        pos = self._next
        self._next += 1
        rec = self.journal.get(pos)
        made = self._args[1] if self._args is not None and self._args[0] == name else None
        self._args = None
        if rec is not None and rec.name != name:
            self.stopped = (f"position {pos} is {name!r} in this code but {rec.name!r} in the history: "
                            f"the code changed since the run (`stepline shadow` says how)")
            raise Stop
        if rec is not None and made is not None and rec.input is not None and payload_json(rec.input) != made:
            self.inputs_differ.append(pos)
        if self.live_from is not None and pos >= self.live_from:
            self._is_break(pos, name)  # a live break step stops in _call_step
            return pos, None
        if rec is not None and rec.status in DONE_STEPS:
            if self._is_break(pos, name):
                self.broke = pos
                _at_recorded_step(pos, name, rec)
            return pos, rec
        if rec is not None and rec.status == FAILED:
            self._is_break(pos, name)
            return pos, None  # no output to answer with: the body runs (under the debugger at the break)
        if rec is None and self._is_break(pos, name):
            return pos, None
        where = "is still open in the history" if rec is not None else "is past the end of the history"
        self.stopped = (f"position {pos} ({name}) {where}: the session ends there "
                        f"(`--live-from {pos} --yes` runs on from it for real)")
        raise Stop

    async def _call_step(self, pos: int, name: str, fn: Callable[..., Awaitable[Any]],
                         args: tuple[object, ...], kwargs: dict[str, object]) -> Any:
        if pos != self.break_pos or self.broke is not None:
            return await fn(*args, **kwargs)
        self.broke = pos
        rec = self.journal.get(pos)
        position = pos  # noqa: F841 -- in scope for the debugger
        error = None if rec is None or rec.error is None else f"{rec.error.type}: {rec.error.message}"
        _say(f"stepline debug: stopped before step {pos} ({name}); its body runs in this process when you go on.")
        if error is not None:
            _say(f"  it failed in the run with {error}")
        _say("  in scope: name, position, args, kwargs, error."
             + ("  `s` steps into the step's body, `c` runs it." if _default_debugger() else ""))
        breakpoint()  # the step's call is the next line: step into it
        return await fn(*args, **kwargs)


def _at_recorded_step(pos: int, name: str, rec: StepState) -> None:
    """The debugger's stop at a break step the history completed."""
    position = pos  # noqa: F841 -- in scope for the debugger
    inputs = payload_json(rec.input)  # noqa: F841
    recorded_output = payload_json(rec.output)  # noqa: F841
    _say(f"stepline debug: stopped at step {pos} ({name}), completed in the run; its recorded output is "
         "handed back when you go on (`--live-from` runs its body instead).")
    _say("  in scope: name, position, inputs, recorded_output.")
    breakpoint()


def break_target(state: RunState, break_at: str | None) -> tuple[int | None, str | None]:
    """(position, name) to break at: `break_at` as a position or a step name,
    else the run's failed step (the highest failed position); (None, None)
    when there is none (a failure outside steps gets a post-mortem)."""
    if break_at is not None:
        if break_at.strip().isdigit():
            return int(break_at), None
        named = sorted(p for p, s in state.steps.items() if s.name == break_at)
        return (named[0], None) if named else (None, break_at)
    failed = sorted(p for p, s in state.steps.items() if s.status == FAILED)
    return (failed[-1], None) if failed else (None, None)


async def _payload(task: Task[Any, Any], state: RunState, keys: KeyStore | None) -> Any:
    recorded = state.payload
    if task.sensitive is not None:
        recorded, _, _ = await unseal(task.sensitive, state.payload, keys, f"debug of run {state.run_id}",
                                      erased_as=ERASED)
    return task.payload_codec.load(recorded, f"payload of run {state.run_id}")


async def debug_run(task: Task[Any, Any], state: RunState, *, break_at: str | None = None,
                    live_from: int | None = None, keys: KeyStore | None = None) -> DebugSession:
    """Re-execute `state`'s run through `task` under the debugger (see the module)."""
    # A payload this code refuses (PayloadValidationError) or cannot unseal
    # (KeyStoreError) raises here: the CLI prints it as one line.
    payload = await _payload(task, state, keys)
    ctx = sandbox_context(_DebugContext, state)  # emits into nothing: a debug session appends no event
    ctx.break_pos, ctx.break_name = break_target(state, break_at)
    ctx.live_from = live_from
    end = await run_sandboxed(task, payload, ctx, None)
    session = DebugSession(state.run_id, ctx.broke, ctx.stopped, end, ctx.inputs_differ)
    if end.suspended is not None and ctx.stopped is None:
        wait = end.suspended.waits[0]
        session.stopped = f"the body waits at position {wait.step} ({wait.reason}): a debug session does not wait"
    if end.raised is not None and ctx.broke is None and break_at is None:
        _post_mortem(end.raised)
    return session


def _post_mortem(exc: BaseException) -> None:
    _say(f"stepline debug: the body raised {type(exc).__qualname__}: {exc}; post-mortem.")
    if _default_debugger():
        pdb.post_mortem(exc.__traceback__)
    else:
        error = exc  # noqa: F841 -- in scope for the debugger
        breakpoint()


__all__ = ["DebugSession", "break_target", "debug_run"]
