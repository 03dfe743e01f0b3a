"""The processors: a batch of messages in, the messages to write out.

They hold no I/O of their own beyond the store and registry they are given, so
the Kafka runtime, the embedded runtime and the benchmark run them unchanged.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from features.definitions import FeaturePlan
from features.store import Claim, FeatureRequest, FeatureSnapshot, FeatureStore, feature_request
from models.champion import ChampionReplica, positive_probability
from models.registry import ModelRegistry, ModelVersion
from monitors.prequential import PrequentialMetrics
from streams.contracts import Message, Output
from streams.schema import EventSchema, FieldType, LabelSpec
from streams.topics import Topics
from streams.validation import Invalid, RecordValidator


def dead_letter(topics: Topics, stage: str, msg: Message, kind: str, error: str) -> Output:
    """The DLQ record of a refused message: its bytes, its origin, the reason."""
    b64 = base64.b64encode
    record = {
        "stage": stage,
        "error_kind": kind,
        "error": error,
        "topic": msg.topic,
        "partition": msg.partition,
        "offset": msg.offset,
        "key_b64": None if msg.key is None else b64(msg.key).decode(),
        "payload_b64": None if msg.value is None else b64(msg.value).decode(),
    }
    return Output(topics.dlq, msg.key, orjson.dumps(record))


@dataclass
class StageCounters:
    """What a stage has done so far (the demo summary and, later, metrics read these)."""

    consumed: int = 0
    produced: int = 0
    dead_letters: int = 0
    late_events: int = 0  # scored, but too late to count in some feature window


class Scorer:
    """events -> validate -> features (one store call) -> champion -> predictions."""

    stage = "scorer"

    def __init__(
        self,
        topics: Topics,
        schema: EventSchema,
        plan: FeaturePlan,
        inputs: Sequence[str],
        store: FeatureStore,
        champion: ChampionReplica,
        max_event_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topics = topics
        self.schema = schema
        self.plan = plan
        self.inputs = list(inputs)
        self.store = store
        self.champion = champion
        self.clock = clock
        self.validate = RecordValidator(schema.fields, max_event_bytes)
        self.counters = StageCounters()

    def process(self, batch: Sequence[Message]) -> list[Output]:
        self.counters.consumed += len(batch)
        out: list[Output] = []
        events: list[dict[str, Any]] = []
        requests: list[FeatureRequest] = []
        for msg in batch:
            event = self.validate(msg.value)
            if isinstance(event, Invalid):
                out.append(dead_letter(self.topics, self.stage, msg, event.kind, event.message))
                continue
            events.append(event)
            requests.append(self._request(event))
        self.counters.dead_letters += len(out)
        snapshots = self.store.update_and_read(requests)
        self.counters.late_events += sum(s.late and not s.replayed for s in snapshots)
        self.champion.refresh()
        model = self.champion.current
        now = self.clock()
        for event, snap in zip(events, snapshots, strict=True):
            out.append(self._predict(event, snap, model, now))
        self.counters.produced += len(out)
        return out

    def _request(self, event: dict[str, Any]) -> FeatureRequest:
        s = self.schema
        context = orjson.dumps({name: event[name] for name in self.inputs})
        return feature_request(self.plan, event, event[s.event_id], event[s.time], context)

    def _predict(
        self, event: dict[str, Any], snap: FeatureSnapshot, model: ModelVersion, now: float
    ) -> Output:
        features = self.plan.values(snap.aggregates)
        probability = positive_probability(model.model, {**snap.inputs, **features})
        key = str(event[self.schema.key]).encode()
        record = {
            "event_id": snap.event_id,
            "entity": key.decode(),
            "probability": probability,
            "model": model.name,
            "version": model.version,
            "features": features,
            "event_time": event[self.schema.time],
            "scored_at": now,
            "replayed": snap.replayed,
        }
        return Output(self.topics.predictions, key, orjson.dumps(record))


@dataclass
class _Pending:
    msg: Message
    label: bool
    deadline: float


class Learner:
    """labels -> join the snapshot the event was scored with -> test, then train.

    Each label is claimed once in the store, so a duplicate label is never
    learned twice. A label whose event has not been scored yet waits up to
    ``label_wait_s``, then goes to the DLQ as an orphan. Every
    ``snapshot_every`` labels the model is published as a new champion version.
    """

    stage = "learner"

    def __init__(
        self,
        topics: Topics,
        label: LabelSpec,
        plan: FeaturePlan,
        store: FeatureStore,
        registry: ModelRegistry,
        start: ModelVersion,
        max_bytes: int,
        label_wait_s: float,
        snapshot_every: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self.label = label
        self.plan = plan
        self.store = store
        self.registry = registry
        self.name = start.name
        self.model = start.model
        self.version = start.version
        self.label_wait_s = label_wait_s
        self.snapshot_every = snapshot_every
        self.clock = clock
        self.validate = RecordValidator(
            {label.event_id: FieldType.STR, label.field: FieldType.BOOL}, max_bytes
        )
        self.metrics = PrequentialMetrics()
        self.pending: dict[str, _Pending] = {}
        self.learned = 0
        self.duplicates = 0
        self.counters = StageCounters()
        self._since_snapshot = 0

    def process(self, batch: Sequence[Message]) -> list[Output]:
        """Learn from a batch of labels (an empty batch retries waiting labels)."""
        self.counters.consumed += len(batch)
        now = self.clock()
        out: list[Output] = []
        todo: dict[str, _Pending] = dict(self.pending)
        self.pending.clear()
        for msg in batch:
            record = self.validate(msg.value)
            if isinstance(record, Invalid):
                out.append(dead_letter(self.topics, self.stage, msg, record.kind, record.message))
                continue
            event_id = record[self.label.event_id]
            if event_id in todo:  # the same label twice in flight: learn it once
                self.duplicates += 1
                continue
            todo[event_id] = _Pending(msg, record[self.label.field], now + self.label_wait_s)
        ids = list(todo)
        for event_id, claim in zip(ids, self.store.claim_snapshots(ids), strict=True):
            item = todo[event_id]
            if claim is Claim.DUPLICATE:
                self.duplicates += 1
            elif claim is Claim.MISSING:
                if now >= item.deadline:
                    why = f"no scored event {event_id!r} within {self.label_wait_s}s"
                    out.append(dead_letter(self.topics, self.stage, item.msg, "orphan_label", why))
                else:
                    self.pending[event_id] = item
            else:
                out.append(self._learn(claim, item.label))
        self.counters.dead_letters += sum(o.topic == self.topics.dlq for o in out)
        self.counters.produced += len(out)
        return out

    def _learn(self, snap: FeatureSnapshot, label: bool) -> Output:
        x = {**snap.inputs, **self.plan.values(snap.aggregates)}
        probability = positive_probability(self.model, x)
        self.metrics.update(label, probability)
        self.model.learn_one(x, label)
        self.learned += 1
        self._since_snapshot += 1
        record = {
            "event_id": snap.event_id,
            "label": label,
            "model": self.name,
            "version": self.version,
            "probability": probability,
            "labels_seen": self.learned,
        }
        if self.snapshot_every and self._since_snapshot >= self.snapshot_every:
            self.publish()
        return Output(self.topics.evaluations, snap.event_id.encode(), orjson.dumps(record))

    def publish(self) -> int:
        """Publish the model as a new version and make it the champion."""
        meta = {"parent": self.version, "labels_seen": self.learned, **self.metrics.as_dict()}
        self.version = self.registry.publish(self.name, self.model, meta)
        self._since_snapshot = 0
        return self.version
