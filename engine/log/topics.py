"""Topic names and shapes, under a namespace prefix so apps can share a cluster.

A worker pool (`@task(pool="gpu")`) has topics of its own for what its
workers own: runs, snapshots, queues and open waits, and its own groups.
The default pool keeps the names without a suffix (`stepline.runs`), so a
log written before pools existed is the default pool's; another pool's
names end in `.<pool>` (`stepline.runs.gpu`). Domain events and the
quarantine are shared by every pool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from stepline.errors import UnknownPool
from stepline.log.base import TopicSpec

DEFAULT_NAMESPACE = "stepline"
DEFAULT_POOL = "default"
# A pool name becomes part of topic and group names (Kafka allows letters,
# digits, `.`, `_` and `-`); no dot, so a topic name splits back unambiguously.
_POOL_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def check_pool(name: str) -> str:
    """`name` if it can name a worker pool; UnknownPool saying why not."""
    if not _POOL_NAME.fullmatch(name):
        raise UnknownPool(name, reason=f"pool name {name!r} is not valid: use 1-64 lower-case letters, "
                          "digits, '-' or '_', starting with a letter or digit")
    return name
DEFAULT_PARTITIONS = 4
# Snapshots are shortcuts, refreshed as partitions advance; a week keeps the
# last one of a quiet partition around (past that, rebuild from offset 0).
SNAPSHOT_RETENTION_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Topics:
    namespace: str = DEFAULT_NAMESPACE
    partitions: int = DEFAULT_PARTITIONS
    # The worker pool whose runs, snapshots, queues and waits these name.
    pool: str = DEFAULT_POOL

    def _pooled(self, name: str) -> str:
        return f"{self.namespace}.{name}" if self.pool == DEFAULT_POOL else f"{self.namespace}.{name}.{self.pool}"

    def of_pool(self, pool: str) -> Topics:
        """The same namespace's topics for another pool."""
        return self if pool == self.pool else replace(self, pool=pool)

    def pool_of(self, topic: str) -> str | None:
        """The pool whose runs topic `topic` is, or None for any other topic."""
        base = f"{self.namespace}.runs"
        if topic == base:
            return DEFAULT_POOL
        if topic.startswith(base + ".") and _POOL_NAME.fullmatch(topic[len(base) + 1:]):
            return topic[len(base) + 1:]
        return None

    @property
    def runs_prefix(self) -> str:
        """What every pool's runs topic starts with (to find them on a log)."""
        return f"{self.namespace}.runs"

    @property
    def runs(self) -> str:
        return self._pooled("runs")

    @property
    def events(self) -> str:
        return f"{self.namespace}.events"

    @property
    def queues(self) -> str:
        return self._pooled("queues")

    @property
    def waits(self) -> str:
        return self._pooled("waits")

    @property
    def quarantine(self) -> str:
        return f"{self.namespace}.quarantine"

    @property
    def snapshots(self) -> str:
        return self._pooled("snapshots")

    @property
    def worker_group(self) -> str:
        return self._pooled("workers")

    @property
    def queues_group(self) -> str:
        return self._pooled("queues")

    @property
    def router_group(self) -> str:
        return self._pooled("router")

    def pool_specs(self) -> list[TopicSpec]:
        """The topics of this pool alone."""
        return [
            TopicSpec(self.runs, self.partitions),
            TopicSpec(self.queues, self.partitions),
            TopicSpec(self.snapshots, self.partitions, SNAPSHOT_RETENTION_MS),
            # Open event waits, keyed by run and step; a wait's tombstone
            # follows when it resolves, so compaction keeps the open ones.
            TopicSpec(self.waits, self.partitions, compact=True),
        ]

    def specs(self) -> list[TopicSpec]:
        """This pool's topics, the default pool's, and the shared ones."""
        pools = [self] if self.pool == DEFAULT_POOL else [self.of_pool(DEFAULT_POOL), self]
        return [
            *(spec for t in pools for spec in t.pool_specs()),
            TopicSpec(self.events, self.partitions),
            # Undecodable records, copied aside with the reason; kept forever.
            TopicSpec(self.quarantine, 1),
        ]
