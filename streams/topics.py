"""Topic names of one pipeline namespace."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    """``{ns}.events``, ``{ns}.labels`` and the topics riverflow writes."""

    namespace: str

    @property
    def events(self) -> str:
        return f"{self.namespace}.events"

    @property
    def labels(self) -> str:
        return f"{self.namespace}.labels"

    @property
    def predictions(self) -> str:
        return f"{self.namespace}.predictions"

    @property
    def evaluations(self) -> str:
        return f"{self.namespace}.evaluations"

    @property
    def dlq(self) -> str:
        return f"{self.namespace}.dlq"

    @property
    def model_events(self) -> str:
        return f"{self.namespace}.model-events"

    def all(self) -> list[str]:
        return [
            self.events, self.labels, self.predictions, self.evaluations, self.dlq,
            self.model_events,
        ]  # fmt: skip
