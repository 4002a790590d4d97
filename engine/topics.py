"""Topic names and shapes, under a namespace prefix so apps can share a cluster."""

from __future__ import annotations

from dataclasses import dataclass

from stepline.log.base import TopicSpec

DEFAULT_NAMESPACE = "stepline"
DEFAULT_PARTITIONS = 4


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
    def worker_group(self) -> str:
        return f"{self.namespace}.workers"

    def specs(self) -> list[TopicSpec]:
        return [
            TopicSpec(self.runs, self.partitions),
            TopicSpec(self.events, self.partitions),
            TopicSpec(self.queues, self.partitions),
        ]
