"""How `stepline worker` and `stepline dev` stop: signals, the grace, the drain.

The first SIGTERM or SIGINT stops the worker gracefully (`Worker.drain`): it
starts no attempt any more, its running attempts end before their next step
(or by finishing) within the grace, and it gives its partitions up. A second
signal, or the end of the grace, cancels what still runs; those steps run
again on the next owner. A worker that has not started yet, such as a
standby waiting for the sqlite group lock, stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal

from stepline.cli._common import CliError, _say
from stepline.runtime.worker import Worker


def parse_grace(value: str | float) -> float:
    """`--grace` (or the `shutdown_grace` setting) as seconds ≥ 0."""
    try:
        seconds = float(value)
    except ValueError:
        raise CliError(f"--grace {value!r} is not a number of seconds (e.g. 30 or 2.5)") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise CliError(f"--grace {value!r} must be a number of seconds ≥ 0 (0 cancels running steps at once)")
    return seconds


class Stop:
    """SIGINT and SIGTERM: the first asks for a graceful stop, the second to stop now."""

    def __init__(self, json_logs: bool = False) -> None:
        self.requested = asyncio.Event()
        self.now = asyncio.Event()
        # How the process says what it does while stopping (--json-logs: JSON lines).
        self.json_logs = json_logs

    @classmethod
    def on_signals(cls, json_logs: bool = False) -> Stop:
        stop = cls(json_logs)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.signalled)
        return stop

    def signalled(self) -> None:
        (self.now if self.requested.is_set() else self.requested).set()


async def start_unless_stopped(worker: Worker, stop: Stop) -> bool:
    """Start `worker`; False (and nothing left running) if a signal came first.

    Starting waits to join the worker group, which on sqlite lasts as long
    as another process holds the group's lock (the log says so): a signal
    must end that wait, not queue behind it.
    """
    starting = asyncio.ensure_future(worker.start())
    signalled = asyncio.ensure_future(stop.requested.wait())
    try:
        await asyncio.wait({starting, signalled}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
        await asyncio.gather(signalled, return_exceptions=True)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await worker.close()  # what start() had set up before the join (timers, schedules)
        _say("stopped before joining the worker group", stop.json_logs)
        return False
    starting.result()  # a start that failed raises here
    return True


async def drain(worker: Worker, grace: float, stop: Stop) -> None:
    """Let the running attempts end for up to `grace` seconds, or until a
    second signal; the caller's `worker.close()` cancels what is left and
    gives the partitions up."""
    running = worker.active
    if running and grace > 0:
        _say(f"stopping: no new attempts; {running} running attempt(s) get up to {grace:g} s to "
             "finish their step (signal again to stop now)", stop.json_logs)
    draining = asyncio.ensure_future(worker.drain(grace))
    hurry = asyncio.ensure_future(stop.now.wait())
    try:
        await asyncio.wait({draining, hurry}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hurry.cancel()
        draining.cancel()
        await asyncio.gather(draining, hurry, return_exceptions=True)
    left = worker.active
    if left:
        _say(f"stopping: cancelling {left} attempt(s) still running; their current step runs again "
             "on the next owner", stop.json_logs)
    _say("stopping: giving the partitions up", stop.json_logs)
