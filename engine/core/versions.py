"""Task versions: which code ran a run.

Every attempt records the version of the task code that runs it on its
RunStarted (schema v5): the version a task declares
(`@sl.task(version="2")`), or else `code:` and the first 12 hex digits of
the SHA-256 of the task function's source. The hash covers the task
function alone, not the steps it calls nor the modules it imports: it
changes when the function's text changes, which is what decides the order
of its journal positions. Declare a version to say more (or less).

What keeps a deploy safe for runs already in flight is `stepline.patched`
(engine/sdk/context.py) and the shadow check (engine/history/shadow.py), which reports
the recorded version beside the new one.
"""

from __future__ import annotations

import hashlib
import inspect
import textwrap
from collections.abc import Callable
from typing import Any

from stepline.errors import TaskDefinitionError

CODE_PREFIX = "code:"
# 48 bits: versions of one task never number enough to collide.
_HASH_CHARS = 12


def code_hash(fn: Callable[..., Any]) -> str:
    """`code:<12 hex>` of the function's source (dedented, so nesting does not count).

    Code without a source file (exec'd, a REPL) hashes its bytecode and
    constants instead: stable within one Python version, which is all a
    version needs there.
    """
    try:
        text = textwrap.dedent(inspect.getsource(fn)).encode()
    except (OSError, TypeError):
        code = fn.__code__
        text = code.co_code + repr(code.co_consts).encode() + repr(code.co_names).encode()
    return CODE_PREFIX + hashlib.sha256(text).hexdigest()[:_HASH_CHARS]


def task_version(task_id: str, fn: Callable[..., Any], declared: str | None) -> str:
    """The version a task records: `declared`, or the hash of `fn`'s source."""
    if declared is None:
        return code_hash(fn)
    if not isinstance(declared, str) or not declared.strip():
        raise TaskDefinitionError(f"task {task_id!r}: version must be a non-empty string, got {declared!r}")
    if declared.startswith(CODE_PREFIX):
        raise TaskDefinitionError(
            f"task {task_id!r}: version {declared!r} starts with {CODE_PREFIX!r}, which marks "
            f"computed source hashes; declare another name"
        )
    return declared


__all__ = ["CODE_PREFIX", "code_hash", "task_version"]
