"""What riverflow writes to its topics, as pydantic models for consumers.

Processors build these messages as plain dicts serialised with orjson (the hot
path); consumers and tests parse them with the models below, which is what
keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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
    # when the spec asks (models.explain): linear terms or the tree's decision path
    explanation: list[dict[str, Any]] | None = None


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


class CandidatePrediction(BaseModel):
    """One candidate's prequential prediction: made before it learned the label."""

    version: int  # the candidate's last published version its live model descends from
    probability: float


class ServedPrediction(BaseModel):
    """The prediction the scorer served for the event: the first one emitted for it."""

    model: str
    version: int
    probability: float


class Evaluation(BaseModel):
    """``{ns}.evaluations``: a label, every candidate's prequential prediction for it,
    and the prediction that was served."""

    event_id: str
    label: bool
    labels_seen: int
    predictions: dict[str, CandidatePrediction]
    segment: str | int | float | bool | None = None  # the spec's monitors.segment field, if set
    # None only if the label was claimed after the scorer stored the event's snapshot
    # and before it recorded the prediction (between its two store calls for the
    # batch, or, if the scorer died there, until its replay), or if the event was
    # scored by a version of riverflow that did not record served predictions
    served: ServedPrediction | None = None


class ModelEvent(BaseModel):
    """``{ns}.model-events``: the audit log of the registry.

    ``published`` (a new version; ``parent`` and ``labels_seen`` set) or a move
    of the champion pointer: ``advance`` (the learner), ``promote``, ``rollback``
    (``previous`` set to where it pointed before). The learner also writes
    ``started`` / ``dropped`` (a fresh challenger it began / stopped training)
    and ``rebased`` (a candidate continued from the version it was rolled back
    to). The monitor (``by: monitor``) writes its decisions with their
    ``evidence``: ``drift``, ``feature_drift``, ``challenger``, ``retire``,
    ``promote``, ``rollback``.
    """

    kind: str
    model: str
    version: int
    parent: int | None = None
    labels_seen: int | None = None
    previous: dict[str, str | int] | None = None
    at: float | None = None
    reason: str = ""
    evidence: dict[str, Any] | None = None
    by: str | None = None
