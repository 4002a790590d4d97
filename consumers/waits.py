"""Open event waits, as a table every router instance holds whole.

A run that calls `wait_for_event` registers the wait on the waits topic
(key `run_id:step`, a small JSON value) before it records RunSuspended. The
router instance that reads a matching domain event appends WaitCompleted to
the run's partition, then a tombstone for the wait.

Events are split between router instances by partition, but a wait may be
matched by an event in any partition, so every instance reads the whole
waits topic (Kafka Streams calls this a global table). The registration and
the event race: an instance may read the event before it learns of the
wait. It therefore keeps the events it routed in the last `recent_ms` and
checks a newly learned wait against them, so a wait matches every event
published at or after its registration, whichever arrived first here.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from stepline.consumers.patterns import Matcher, PatternError, compile_name, compile_where
from stepline.log.base import Log, partition_for

log = structlog.get_logger("stepline.waits")

FORMAT = 1


def wait_key(run_id: str, step: int) -> str:
    return f"{run_id}:{step}"


@dataclass(frozen=True, slots=True)
class WaitEntry:
    run_id: str
    task_id: str
    step: int
    event: str  # event name or name pattern (`order.*`)
    match: Mapping[str, Any] | None  # declarative data pattern, see consumers.patterns
    since: int  # ms: events at or after this time can resolve the wait
    deadline: int | None = None
    # ms the wait looks back before it was reached (`since` already includes
    # it). Not stored on the waits topic: only the registering worker uses
    # it, to search the events topic once (consumers/lookback.py).
    lookback: int = 0

    @property
    def key(self) -> str:
        return wait_key(self.run_id, self.step)

    def encode(self) -> bytes:
        return json.dumps({
            "v": FORMAT, "run_id": self.run_id, "task_id": self.task_id, "step": self.step,
            "event": self.event, "match": self.match, "since": self.since, "deadline": self.deadline,
        }, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes) -> WaitEntry:
        d = json.loads(value)
        if d.get("v") != FORMAT:
            raise ValueError(f"wait entry format {d.get('v')!r} is unknown")
        return cls(d["run_id"], d["task_id"], d["step"], d["event"], d["match"], d["since"], d["deadline"])


def check_wait_pattern(event: str, match: Mapping[str, Any] | None) -> None:
    """Raise PatternError now, in the task, for a wait no event could match."""
    compile_name(event)
    if match is not None and not isinstance(match, Mapping):
        raise PatternError("match", "a wait's match must be a pattern object (it is stored on the log)")
    compile_where(match)
    json.dumps(match)


async def register(log_: Log, topic: str, entry: WaitEntry) -> None:
    key = entry.key.encode()
    await log_.append(topic, partition_for(key, await log_.partitions(topic)), [(key, entry.encode())])


async def unregister(log_: Log, topic: str, run_id: str, step: int) -> None:
    key = wait_key(run_id, step).encode()
    await log_.append(topic, partition_for(key, await log_.partitions(topic)), [(key, b"")])


@dataclass(slots=True)
class _Compiled:
    entry: WaitEntry
    name: Callable[[str], bool]
    data: Matcher


@dataclass(frozen=True, slots=True)
class SeenEvent:
    event_id: str
    name: str
    time: int
    data: Any
    raw: Any  # the DomainEvent's Payload, passed on as the wait's output unchanged


OnMatch = Callable[[WaitEntry, SeenEvent], Awaitable[None]]


class WaitsTable:
    """Every open wait, kept current by tailing all partitions of the waits topic."""

    def __init__(self, log_: Log, topic: str, on_match: OnMatch, *, recent_ms: int = 60_000,
                 recent_max: int = 50_000, clock: Callable[[], int] | None = None) -> None:
        self.log = log_
        self.topic = topic
        self._on_match = on_match
        self._waits: dict[str, _Compiled] = {}
        # Most waits name one event exactly: index those by name, so an
        # event is only tried against waits that could take it.
        self._by_name: dict[str, dict[str, _Compiled]] = {}
        self._patterned: dict[str, _Compiled] = {}
        self._recent: deque[tuple[int, SeenEvent]] = deque(maxlen=recent_max)
        self._recent_ms = recent_ms
        self._clock = clock
        self._readers: list[asyncio.Task[None]] = []
        self._offsets: dict[int, int] = {}
        self.matched = 0

    def __len__(self) -> int:
        return len(self._waits)

    async def start(self) -> None:
        """Load the table to the current end, then keep tailing it."""
        n = await self.log.partitions(self.topic)
        for p in range(n):
            self._offsets[p] = 0
            end = await self.log.end_offset(self.topic, p)
            while self._offsets[p] < end:
                await self._read(p, timeout=0.0, initial=True)
        self._readers = [asyncio.create_task(self._tail(p), name=f"stepline-waits-{p}") for p in range(n)]

    async def close(self) -> None:
        for t in self._readers:
            t.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._readers = []

    async def _tail(self, p: int) -> None:
        while True:
            try:
                await self._read(p, timeout=1.0, initial=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the log hiccuped: retry, never lose the tail
                log.warning("waits table read failed; retrying", partition=p, error=str(exc))
                await asyncio.sleep(0.5)

    async def _read(self, p: int, timeout: float, initial: bool) -> None:
        recs = await self.log.read(self.topic, p, self._offsets[p], 1000, timeout=timeout)
        for r in recs:
            self._offsets[p] = r.offset + 1
            key = r.key.decode()
            if not r.value:
                self._forget(key)
                continue
            try:
                entry = WaitEntry.decode(r.value)
                compiled = _Compiled(entry, compile_name(entry.event), compile_where(entry.match))
            except (ValueError, KeyError, TypeError, PatternError) as exc:
                log.error("unreadable wait entry skipped", partition=p, offset=r.offset, error=str(exc))
                continue
            self._forget(key)
            self._waits[key] = compiled
            if "*" in entry.event:
                self._patterned[key] = compiled
            else:
                self._by_name.setdefault(entry.event, {})[key] = compiled
            if not initial:
                await self._check_recent(compiled)

    async def _check_recent(self, c: _Compiled) -> None:
        """A wait learned after its event went by: look back."""
        for _, seen in list(self._recent):
            if seen.time >= c.entry.since and self._matches(c, seen):
                await self._resolve(c, seen)
                return

    def _matches(self, c: _Compiled, seen: SeenEvent) -> bool:
        if not c.name(seen.name):
            return False
        try:
            return c.data(seen.data if isinstance(seen.data, dict) else {})
        except Exception:
            return False

    async def _resolve(self, c: _Compiled, seen: SeenEvent) -> None:
        # Forget first: a second event must not resolve it again here. The
        # fold would ignore it anyway; this saves the append.
        if self._waits.get(c.entry.key) is c:
            self._forget(c.entry.key)
        self.matched += 1
        await self._on_match(c.entry, seen)

    async def offer(self, seen: SeenEvent, now_ms: int) -> None:
        """Match one routed event against the open waits, and remember it."""
        self._recent.append((now_ms, seen))
        horizon = now_ms - self._recent_ms
        while self._recent and self._recent[0][0] < horizon:
            self._recent.popleft()
        for c in self._candidates(seen.name):
            if seen.time >= c.entry.since and self._matches(c, seen):
                await self._resolve(c, seen)

    def _candidates(self, name: str) -> Iterable[_Compiled]:
        exact = self._by_name.get(name)
        return [*(exact.values() if exact else ()), *self._patterned.values()]

    def _forget(self, key: str) -> None:
        c = self._waits.pop(key, None)
        if c is None:
            return
        self._patterned.pop(key, None)
        named = self._by_name.get(c.entry.event)
        if named is not None:
            named.pop(key, None)
            if not named:
                del self._by_name[c.entry.event]
