"""What riverflow writes to its topics, as pydantic models for consumers.

Processors build these messages as plain dicts serialised with orjson (the hot
path); consumers and tests parse them with the models below, which is what
keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel


@dataclass(frozen=True)
class Message:
    """A consumed message, wherever it came from (Kafka or the embedded log)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None  # when it was produced (Kafka CreateTime), if known


@dataclass(frozen=True)
class Output:
    """A message a processor wants written."""

    topic: str
    key: bytes | None
    value: bytes


class Processor(Protocol):
    """What a host (Faust, the confluent loop, the embedded runtime) runs: a named
    stage turning a batch of messages into the messages to write."""

    stage: str

    def process(self, batch: Sequence[Message]) -> list[Output]: ...

    def status(self) -> dict[str, float]:
        """Numbers worth a gauge: the model version served, metrics, counts."""
        ...


class Prediction(BaseModel):
    """``{ns}.predictions``: one per valid event."""

    event_id: str
    entity: str
    probability: float
    model: str
    version: int
    features: dict[str, float]
    event_time: float
    scored_at: float
    replayed: bool = False  # the event id was seen before: features are the stored snapshot


class DeadLetter(BaseModel):
    """``{ns}.dlq``: a message a stage refused, with why and where it came from."""

    stage: str
    error_kind: str
    error: str
    topic: str
    partition: int
    offset: int
    key_b64: str | None
    payload_b64: str | None


class Evaluation(BaseModel):
    """``{ns}.evaluations``: a label and the learner's prequential prediction for it."""

    event_id: str
    label: bool
    model: str
    version: int
    probability: float
    labels_seen: int
