"""Changed runs for live listeners (the API's SSE stream), on the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, Self

from stepline.projections.query_sql import QueryProjectionError


class SubscriptionClosed(QueryProjectionError):
    """The feed subscription was closed (the server is shutting down)."""


class FeedSubscription:
    """One listener's changed runs, coalesced: the latest summary per run.

    Bounded: past MAX_PENDING waiting runs (a catch-up, a burst) it keeps
    none and says `overflowed`, and the listener reloads its list instead.
    """

    MAX_PENDING = 5000

    def __init__(self, feed: RunFeed) -> None:
        self._feed = feed
        self.pending: dict[str, dict[str, Any]] = {}
        self.overflowed = False
        self.closed = False
        self._wake = asyncio.Event()

    def offer(self, summaries: Iterable[dict[str, Any]]) -> None:
        if self.overflowed:
            return
        for s in summaries:
            self.pending[s["run_id"]] = s
        if len(self.pending) > self.MAX_PENDING:
            self.pending.clear()
            self.overflowed = True
        self._wake.set()

    async def next(self, timeout: float) -> tuple[list[dict[str, Any]], bool] | None:
        """(summaries, overflowed) once there is news; None after `timeout` s.

        Raises SubscriptionClosed once closed.
        """
        if not (self.pending or self.overflowed or self.closed):
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                return None
        self._wake.clear()
        if self.closed:
            raise SubscriptionClosed("the feed subscription was closed")
        items, overflowed = list(self.pending.values()), self.overflowed
        self.pending.clear()
        self.overflowed = False
        return items, overflowed

    def close(self) -> None:
        self.closed = True
        self._feed._subs.discard(self)
        self._wake.set()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunFeed:
    """Pub/sub of changed run summaries, on the event loop (the SSE stream's source)."""

    def __init__(self) -> None:
        self._subs: set[FeedSubscription] = set()

    def subscribe(self) -> FeedSubscription:
        sub = FeedSubscription(self)
        self._subs.add(sub)
        return sub

    @property
    def listening(self) -> bool:
        return bool(self._subs)

    def publish(self, summaries: list[dict[str, Any]]) -> None:
        for sub in list(self._subs):
            sub.offer(summaries)


__all__ = ["FeedSubscription", "RunFeed", "SubscriptionClosed"]
