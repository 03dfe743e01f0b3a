"""The learner stage: labels -> join the snapshot the event was scored with and the
prediction served for it -> test, then train every candidate.

It holds no I/O of its own beyond the store and the lineage it is given (which
publishes versions and keeps the checkpoint, ``riverflow.stages.lineage``), so
the Kafka runtime, the embedded runtime and the benchmark run it unchanged.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from riverflow.features.definitions import FeaturePlan
from riverflow.features.store import Claim, FeatureSnapshot, FeatureStore
from riverflow.models.checkpoint import LearnerCheckpoint
from riverflow.monitors.prequential import PrequentialMetrics
from riverflow.stages.common import StageCounters, dead_letter, model_inputs, monitor_only_field
from riverflow.stages.lineage import Candidate, Lineage
from riverflow.streams.contracts import CandidatePrediction, Evaluation, Message, Output
from riverflow.streams.schema import FieldType, LabelSpec
from riverflow.streams.topics import Topics
from riverflow.streams.validation import Invalid, RecordValidator


@dataclass
class _Pending:
    msg: Message
    label: bool
    deadline: float


@dataclass(frozen=True)
class LabelJoin:
    """How a label becomes a training example: the label's fields and size limit, the
    features and event fields (``inputs``) of the event it joins, and the
    ``segment`` field passed on to the monitor."""

    label: LabelSpec
    max_bytes: int
    plan: FeaturePlan
    inputs: tuple[str, ...]
    segment: str | None


@dataclass(frozen=True)
class LearnerTiming:
    """How long a label waits for its event; how often candidates are published
    (every ``snapshot_every`` labels and every ``snapshot_every_s`` seconds; 0: never)."""

    label_wait_s: float
    snapshot_every: int
    snapshot_every_s: float


class Learner:
    """labels -> join the snapshot the event was scored with and the prediction
    served for it -> test, then train.

    Every candidate sees every label in the same order: predict (prequential),
    update its metrics, ``learn_one``. Each label is claimed once in the store,
    so a duplicate label is never learned twice. A label whose event has not
    been scored yet waits up to ``label_wait_s``, then goes to the DLQ as an
    orphan. Every ``snapshot_every`` labels or ``snapshot_every_s`` seconds the
    lineage publishes each candidate as a new version and stages the
    checkpoint. The host calls ``commit`` once a batch's outputs are written.
    """

    stage = "learner"

    def __init__(
        self,
        topics: Topics,
        store: FeatureStore,
        lineage: Lineage,
        join: LabelJoin,
        timing: LearnerTiming,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self.store = store
        self.lineage = lineage
        self.join = join
        self.timing = timing
        self.clock = clock
        self.extra = monitor_only_field(join.segment, join.inputs)
        self.validate = RecordValidator(
            {join.label.event_id: FieldType.STR, join.label.field: FieldType.BOOL},
            join.max_bytes,
        )
        self.pending: dict[str, _Pending] = {}
        self.learned = 0
        self.positions: dict[int, int] = {}
        self.duplicates = 0
        self.counters = StageCounters()
        self._since_snapshot = 0
        self._last_snapshot = clock()
        # labels are marked learned under "run:partition:offset"; see _stale
        self.run = uuid.uuid4().hex[:12]
        self._saved_positions: dict[int, int] = {}
        self._base: dict[int, int] = {}
        self._base_pending: set[tuple[int, int]] = set()

    def _stale(self, token: str) -> bool:
        """Whether a learned-marker names a label that the models do not contain.

        This run's marks are in the models. Another run's mark is in them only if
        the checkpoint we started from covers its label: read before the saved
        position and not among the labels still waiting then. Otherwise that run
        died before its next snapshot, and this run learns the label again.
        """
        parts = token.split(":")
        if len(parts) != 3 or parts[0] == self.run:
            return False  # ours, or a mark from before run tokens: trust it
        p, o = int(parts[1]), int(parts[2])
        return not (o < self._base.get(p, 0) and (p, o) not in self._base_pending)

    @property
    def candidates(self) -> dict[str, Candidate]:
        """The candidates trained on every label, by name."""
        return self.lineage.candidates

    @property
    def metrics(self) -> PrequentialMetrics:
        """The lead candidate's metrics (the spec's champion)."""
        return self.candidates[self.lineage.lead].metrics

    @property
    def version(self) -> int:
        """The lead candidate's last published version."""
        return self.candidates[self.lineage.lead].version

    def process(self, batch: Sequence[Message]) -> list[Output]:
        """Learn from a batch of labels (an empty batch retries waiting labels).

        Labels are handled in order (waiting ones first), and the read position
        advances label by label, so a snapshot taken mid-batch records exactly
        the labels its models have learned.
        """
        self.counters.consumed += len(batch)
        now = self.clock()
        label, wait_s = self.join.label, self.timing.label_wait_s
        out: list[Output] = self.lineage.follow(now)
        todo: dict[str, _Pending] = dict(self.pending)
        order: list[tuple[Message, str | None]] = [(p.msg, e) for e, p in todo.items()]
        for msg in batch:
            record = self.validate(msg.value)
            if isinstance(record, Invalid):
                out.append(dead_letter(self.topics, self.stage, msg, record.kind, record.message))
                order.append((msg, None))
                continue
            event_id = record[label.event_id]
            if event_id in todo:  # the same label twice in flight: learn it once
                self.duplicates += 1
                order.append((msg, None))
                continue
            todo[event_id] = _Pending(msg, record[label.field], now + wait_s)
            order.append((msg, event_id))
        ids = list(todo)
        tokens = [f"{self.run}:{todo[e].msg.partition}:{todo[e].msg.offset}" for e in ids]
        claims = dict(zip(ids, self.store.claim_snapshots(ids, tokens, self._stale), strict=True))
        self.pending.clear()  # after the claims: a batch run again (streams.guard) keeps them
        every = self.timing.snapshot_every
        for msg, event_id in order:
            if event_id is not None:
                item, claim = todo[event_id], claims[event_id]
                if claim is Claim.DUPLICATE:
                    self.duplicates += 1
                elif claim is Claim.MISSING:
                    if now >= item.deadline:
                        why = f"no scored event {event_id!r} within {wait_s}s"
                        out.append(
                            dead_letter(self.topics, self.stage, item.msg, "orphan_label", why)
                        )
                    else:
                        self.pending[event_id] = item
                else:
                    out.append(self._learn(claim, item.label))
            if msg.offset >= self.positions.get(msg.partition, 0):
                self.positions[msg.partition] = msg.offset + 1
            if every and self._since_snapshot >= every:
                out += self.publish()
        every_s = self.timing.snapshot_every_s
        if every_s and self._since_snapshot and now - self._last_snapshot >= every_s:
            out += self.publish()
        self.counters.dead_letters += sum(o.topic == self.topics.dlq for o in out)
        self.counters.produced += len(out)
        return out

    def _learn(self, snap: FeatureSnapshot, label: bool) -> Output:
        segment = None if self.join.segment is None else snap.inputs.get(self.join.segment)
        x = {**model_inputs(snap.inputs, self.extra), **self.join.plan.values(snap.aggregates)}
        predictions: dict[str, CandidatePrediction] = {}
        for c in self.candidates.values():
            proba = c.model.predict_proba_one(x)
            probability = float(proba.get(True, 0.0))
            c.metrics.update(label, proba)
            c.model.learn_one(x, label)
            predictions[c.name] = CandidatePrediction(c.version, probability)
        self.learned += 1
        self._since_snapshot += 1
        record = Evaluation(
            event_id=snap.event_id,
            label=label,
            labels_seen=self.learned,
            predictions=predictions,
            served=snap.served,
            segment=segment,
        )
        return Output(self.topics.evaluations, snap.event_id.encode(), record.encode())

    def status(self) -> dict[str, float]:
        out = {
            "labels_learned": float(self.learned),
            "labels_duplicate": float(self.duplicates),
            "labels_waiting": float(len(self.pending)),
            "model_version": float(self.version),  # the lead candidate's
            **{f"prequential_{k}": v for k, v in self.metrics.as_dict().items()},
        }
        for c in self.candidates.values():
            out[f"{c.name}:version"] = float(c.version)
            out.update({f"{c.name}:prequential_{k}": v for k, v in c.metrics.as_dict().items()})
        return out

    def publish(self) -> list[Output]:
        """Publish every candidate as a new version (see ``Lineage.publish``); returns
        the model-events to write."""
        pending = [(p.msg, p.label) for p in self.pending.values()]
        out = self.lineage.publish(self.clock(), self.learned, self.positions, pending)
        self._saved_positions = dict(self.positions)
        self._since_snapshot = 0
        self._last_snapshot = self.clock()
        return out

    def commit(self) -> None:
        """Save the checkpoint of the last snapshot; call once its outputs are written.

        Saved only then, so a learner that dies before its evaluations and
        model-events are acknowledged restarts from the previous checkpoint
        and writes them again (at least once) instead of losing them.
        """
        self.lineage.commit()

    def has_unpublished(self) -> bool:
        """Labels were read since the last snapshot (learned, refused or waiting)."""
        return self.positions != self._saved_positions

    def restore(self, saved: LearnerCheckpoint) -> None:
        """Continue from a checkpoint: its candidates' versions and metrics (in the
        lineage), its label count, read positions and waiting labels."""
        self.lineage.restore(saved)
        self.learned = saved.labels_seen
        self.positions = dict(saved.positions)
        self._base = dict(saved.positions)
        self._saved_positions = dict(saved.positions)
        self._base_pending = {(msg.partition, msg.offset) for msg, _ in saved.pending}
        deadline = self.clock() + self.timing.label_wait_s
        for msg, label in saved.pending:
            record = self.validate(msg.value)
            assert not isinstance(record, Invalid)  # it was valid when it was saved
            self.pending[record[self.join.label.event_id]] = _Pending(msg, label, deadline)
