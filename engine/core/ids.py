"""Identifiers. Random ones sort by creation time; derived ones are frozen.

Run ids are `run_` + 26 characters of Crockford base32 (ULID layout: 48 bits
of milliseconds, then 80 random bits), so listing by id lists by age.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# Two base32 digits per table entry: ids are made once per trigger.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def _b32(value: int, length: int) -> str:
    """`length` Crockford base32 digits of `value`, most significant first."""
    out = []
    if length % 2:
        out.append(_ALPHABET[value & 31])
        value >>= 5
    for _ in range(length // 2):
        out.append(_PAIRS[value & 1023][::-1])
        value >>= 10
    return "".join(out)[::-1]


_last_run: tuple[int, int] = (0, 0)


def new_run_id(now_ms: int | None = None) -> str:
    """Monotonic within a process (ULID's rule): a second id in the same
    millisecond is the previous one plus one, so ids triggered one after
    another sort in trigger order, which is how queues break priority ties."""
    global _last_run
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    last_ms, last_rand = _last_run
    if ms == last_ms and last_rand < (1 << 80) - 1:
        rand = last_rand + 1
    else:
        rand = _random.getrandbits(79)  # headroom for the increments
    _last_run = (ms, rand)
    return "run_" + _b32((ms << 80) | rand, 26)


def idempotent_run_id(task_id: str, idempotency_key: str) -> str:
    """The run id a trigger with an idempotency key always maps to.

    NEVER change this format: existing logs hold runs under these ids, and
    a repeated trigger must land on the same run forever.
    """
    digest = hashlib.sha256(f"stepline/idem/v1\x00{task_id}\x00{idempotency_key}".encode()).digest()
    return "run_" + _b32(int.from_bytes(digest[:16], "big") >> 2, 26)


# Seeded from the OS, renewed in a forked child. Run ids need uniqueness,
# not secrecy; os.urandom per id released the GIL on every trigger.
_random = random.Random(os.urandom(16))
_event_prefix = os.urandom(8).hex()
_event_counter = itertools.count()


def _after_fork() -> None:
    global _event_prefix, _last_run
    _random.seed(os.urandom(16))
    _last_run = (0, 0)
    _event_prefix = os.urandom(8).hex()


# A forked child must not continue its parent's sequence under its prefix.
os.register_at_fork(after_in_child=_after_fork)


def new_event_id() -> str:
    """64 random bits per process, then a counter: unique without a syscall.

    os.urandom per event cost more than its microsecond: it releases the
    GIL, and a worker writes about ten events per run.
    """
    return f"{_event_prefix}{next(_event_counter):016x}"


def step_idempotency_key(run_id: str, step: int) -> str:
    """Stable key for a step's external side effect: the same on every retry.

    NEVER change this format: users pass it to payment and email APIs.
    """
    return f"{run_id}:{step}"


TOKEN = "token"


def wait_token(run_id: str, step: int) -> str:
    """The token of the `wait_for_token` at journal position `step`: the same
    on every replay, so a token handed to a human stays valid across retries.

    NEVER change this format: tokens sit in emails and approval queues.
    """
    return f"tok_{run_id}_{step}"


def parse_token(token: str) -> tuple[str, int]:
    """(run_id, step) of a token; InvalidToken when it is not one."""
    from stepline.errors import InvalidToken

    body = token[4:] if token.startswith("tok_") else ""
    run_id, _, step = body.rpartition("_")
    # isascii: str.isdigit() also holds for digits int() refuses, such as "²".
    if not run_id.startswith("run_") or not (step.isascii() and step.isdigit()):
        raise InvalidToken(f"not a Stepline wait token: {token!r} (expected tok_<run id>_<step>)")
    return run_id, int(step)


def child_idempotency_key(parent_run_id: str, step: int) -> str:
    """The idempotency key of the child a parent starts at `step`, so that
    replaying the parent finds the same child instead of starting another.

    NEVER change this format: existing parents find their children by it.
    """
    return f"stepline/child/{parent_run_id}/{step}"


def fanout_key(event_id: str) -> str:
    """The idempotency key of a fan-out run; with the task id it fixes the run id.

    NEVER change this format: redelivered events must map to existing runs.
    """
    return f"stepline/event/{event_id}"


def record_key(topic: str, partition: int, offset: int) -> str:
    """The idempotency key of the run a record of a Kafka topic Stepline does
    not own starts (`stepline.KafkaTopic`); with the task id it fixes the run id.

    NEVER change this format: a record delivered again (a restart before its
    offset was committed, a rebalance) must map to the run it already started.
    Topic names cannot hold '/', so the key is unambiguous.
    """
    return f"stepline/record/{topic}/{partition}/{offset}"
