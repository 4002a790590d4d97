"""The messages between a worker and an isolated attempt's child process
(engine/runtime/isolation.py, engine/runtime/isolation_child.py): how they
are framed on the socket, and the first one, `Init`.

Messages are pickles: both ends run the same build for the length of one
attempt, so the format never outlives the code (unlike events on the log).
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

from stepline.errors import IsolationError
from stepline.projections.runs import RunState

_LEN = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class Init:
    target: str  # what load_app imports in the child: a file path or a module name
    task_id: str
    state: RunState  # with the journal as a plain dict (a mapping proxy does not pickle)
    seed: int
    clock_offset_ms: int  # the worker's clock minus the wall clock, kept in the child
    memory_limit_mb: int | None
    sys_path: tuple[str, ...]
    parent_pid: int
    can_register_waits: bool
    can_request: bool
    has_client: bool
    # The attempt span's context (traceparent, tracestate, propagation
    # fields); None when the worker does not trace.
    trace: dict[str, str] | None = None


def frame(msg: Any) -> bytes:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


async def recv(reader: asyncio.StreamReader) -> Any:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    return pickle.loads(await reader.readexactly(size))


def portable_error(exc: BaseException) -> BaseException:
    """The exception itself if it survives a round trip through pickle
    (custom __init__ signatures often do not), else its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return IsolationError(f"{type(exc).__qualname__}: {exc}")
    return exc
