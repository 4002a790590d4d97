"""Topic names and shapes, under a namespace prefix so apps can share a cluster."""

from __future__ import annotations

from dataclasses import dataclass

from stepline.log.base import TopicSpec

DEFAULT_NAMESPACE = "stepline"
DEFAULT_PARTITIONS = 4
# Snapshots are shortcuts, refreshed as partitions advance; a week keeps the
# last one of a quiet partition around (past that, rebuild from offset 0).
SNAPSHOT_RETENTION_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Topics:
    namespace: str = DEFAULT_NAMESPACE
    partitions: int = DEFAULT_PARTITIONS

    @property
    def runs(self) -> str:
        return f"{self.namespace}.runs"

    @property
    def events(self) -> str:
        return f"{self.namespace}.events"

    @property
    def queues(self) -> str:
        return f"{self.namespace}.queues"

    @property
    def waits(self) -> str:
        return f"{self.namespace}.waits"

    @property
    def quarantine(self) -> str:
        return f"{self.namespace}.quarantine"

    @property
    def snapshots(self) -> str:
        return f"{self.namespace}.snapshots"

    @property
    def worker_group(self) -> str:
        return f"{self.namespace}.workers"

    def specs(self) -> list[TopicSpec]:
        return [
            TopicSpec(self.runs, self.partitions),
            TopicSpec(self.events, self.partitions),
            TopicSpec(self.queues, self.partitions),
            TopicSpec(self.snapshots, self.partitions, SNAPSHOT_RETENTION_MS),
            # Open event waits, keyed by run and step; a wait's tombstone
            # follows when it resolves, so compaction keeps the open ones.
            TopicSpec(self.waits, self.partitions, compact=True),
            # Undecodable records, copied aside with the reason; kept forever.
            TopicSpec(self.quarantine, 1),
        ]
