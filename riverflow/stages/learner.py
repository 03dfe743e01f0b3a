"""The learner stage: labels -> join the snapshot the event was scored with and the
prediction served for it -> test, then train every candidate; publish versions.

It holds no I/O of its own beyond the store and registry it is given, so the
Kafka runtime, the embedded runtime and the benchmark run it unchanged.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from riverflow.features.definitions import FeaturePlan
from riverflow.features.store import Claim, FeatureSnapshot, FeatureStore
from riverflow.models.registry import ChampionPointer, ModelRegistry
from riverflow.monitors.prequential import PrequentialMetrics
from riverflow.stages.common import StageCounters, dead_letter, model_inputs
from riverflow.streams.contracts import CandidatePrediction, Evaluation, Message, ModelEvent, Output
from riverflow.streams.schema import FieldType, LabelSpec
from riverflow.streams.topics import Topics
from riverflow.streams.validation import Invalid, RecordValidator


@dataclass
class _Pending:
    msg: Message
    label: bool
    deadline: float


@dataclass
class Candidate:
    """One candidate as the learner holds it: its live model and its prequential metrics."""

    name: str
    model: Any
    version: int  # the last published version this model descends from (0: fresh)
    metrics: PrequentialMetrics


@dataclass
class LearnerState:
    """What the learner restarts from (saved signed, with every snapshot)."""

    versions: dict[str, int]
    metrics: dict[str, PrequentialMetrics]
    labels_seen: int
    positions: dict[int, int]  # label partition -> next offset to read
    pending: list[tuple[Message, bool]]
    saved_at: float = 0.0  # unix seconds: a rollback after this is applied on restore


class Learner:
    """labels -> join the snapshot the event was scored with and the prediction
    served for it -> test, then train.

    Every candidate sees every label in the same order: predict (prequential),
    update its metrics, ``learn_one``. Each label is claimed once in the store,
    so a duplicate label is never learned twice. A label whose event has not
    been scored yet waits up to ``label_wait_s``, then goes to the DLQ as an
    orphan. Every ``snapshot_every`` labels or ``snapshot_every_s`` seconds each
    candidate is published as a new version; the champion pointer follows the
    learner while it points at the version the learner last published. The
    host calls ``commit`` once a batch's outputs are written.
    """

    stage = "learner"

    def __init__(
        self,
        topics: Topics,
        label: LabelSpec,
        plan: FeaturePlan,
        store: FeatureStore,
        registry: ModelRegistry,
        candidates: Sequence[Candidate],
        lead: str,
        max_bytes: int,
        label_wait_s: float,
        snapshot_every: int,
        snapshot_every_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        fresh_model: Callable[[str], Any] | None = None,
        registry_poll_s: float = 0.0,
        inputs: Sequence[str] | None = None,
        segment: str | None = None,
    ) -> None:
        self.topics = topics
        self.fresh_model = fresh_model
        self.registry_poll_s = registry_poll_s
        self.segment = segment
        # a segment field that is no model input is in the snapshot for the monitor only
        self.extra = segment if segment and inputs is not None and segment not in inputs else None
        self.label = label
        self.plan = plan
        self.store = store
        self.registry = registry
        self.candidates = {c.name: c for c in candidates}
        self.lead = lead
        self.label_wait_s = label_wait_s
        self.snapshot_every = snapshot_every
        self.snapshot_every_s = snapshot_every_s
        self.clock = clock
        self.validate = RecordValidator(
            {label.event_id: FieldType.STR, label.field: FieldType.BOOL}, max_bytes
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
        self._staged: LearnerState | None = None
        self._base: dict[int, int] = {}
        self._base_pending: set[tuple[int, int]] = set()
        self.dynamic: dict[str, str] = {}  # fresh challengers the monitor started -> base
        self._rollbacks_after = 0.0  # unix seconds: rollbacks after this are not applied yet
        self._next_poll = 0.0

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
    def metrics(self) -> PrequentialMetrics:
        """The lead candidate's metrics (the spec's champion)."""
        return self.candidates[self.lead].metrics

    @property
    def version(self) -> int:
        """The lead candidate's last published version."""
        return self.candidates[self.lead].version

    def process(self, batch: Sequence[Message]) -> list[Output]:
        """Learn from a batch of labels (an empty batch retries waiting labels).

        Labels are handled in order (waiting ones first), and the read position
        advances label by label, so a snapshot taken mid-batch records exactly
        the labels its models have learned.
        """
        self.counters.consumed += len(batch)
        now = self.clock()
        out: list[Output] = self.follow_registry(now)
        todo: dict[str, _Pending] = dict(self.pending)
        self.pending.clear()
        order: list[tuple[Message, str | None]] = [(p.msg, e) for e, p in todo.items()]
        for msg in batch:
            record = self.validate(msg.value)
            if isinstance(record, Invalid):
                out.append(dead_letter(self.topics, self.stage, msg, record.kind, record.message))
                order.append((msg, None))
                continue
            event_id = record[self.label.event_id]
            if event_id in todo:  # the same label twice in flight: learn it once
                self.duplicates += 1
                order.append((msg, None))
                continue
            todo[event_id] = _Pending(msg, record[self.label.field], now + self.label_wait_s)
            order.append((msg, event_id))
        ids = list(todo)
        tokens = [f"{self.run}:{todo[e].msg.partition}:{todo[e].msg.offset}" for e in ids]
        claims = dict(zip(ids, self.store.claim_snapshots(ids, tokens, self._stale), strict=True))
        for msg, event_id in order:
            if event_id is not None:
                item, claim = todo[event_id], claims[event_id]
                if claim is Claim.DUPLICATE:
                    self.duplicates += 1
                elif claim is Claim.MISSING:
                    if now >= item.deadline:
                        why = f"no scored event {event_id!r} within {self.label_wait_s}s"
                        out.append(
                            dead_letter(self.topics, self.stage, item.msg, "orphan_label", why)
                        )
                    else:
                        self.pending[event_id] = item
                else:
                    out.append(self._learn(claim, item.label))
            if msg.offset >= self.positions.get(msg.partition, 0):
                self.positions[msg.partition] = msg.offset + 1
            if self.snapshot_every and self._since_snapshot >= self.snapshot_every:
                out += self.publish()
        if (
            self.snapshot_every_s
            and self._since_snapshot
            and now - self._last_snapshot >= self.snapshot_every_s
        ):
            out += self.publish()
        self.counters.dead_letters += sum(o.topic == self.topics.dlq for o in out)
        self.counters.produced += len(out)
        return out

    def follow_registry(self, now: float, force: bool = False) -> list[Output]:
        """Train the fresh challengers the monitor started, drop the retired ones, and
        continue a rolled-back candidate from the version it was rolled back to.

        Reads the registry at most every ``registry_poll_s``; returns model-events.
        """
        if self.fresh_model is None or (now < self._next_poll and not force):
            return []
        self._next_poll = now + self.registry_poll_s
        out = []
        wanted = {name: info["base"] for name, info in self.registry.challengers().items()}
        pointer = self.registry.champion()
        for name in [n for n in self.dynamic if n not in wanted]:
            if pointer is not None and pointer.model == name:
                continue  # retired while champion: keep training what is served
            del self.candidates[name], self.dynamic[name]
            out.append(self._model_event(ModelEvent(kind="dropped", model=name,
                                                    version=0, reason="retired")))  # fmt: skip
        for name, base in wanted.items():
            if name in self.candidates:
                continue
            self.candidates[name] = Candidate(name, self.fresh_model(base), 0,
                                              PrequentialMetrics())  # fmt: skip
            self.dynamic[name] = base
            out.append(self._model_event(ModelEvent(kind="started", model=name, version=0,
                                                    reason=f"fresh {base}")))  # fmt: skip
        out += self._follow_rollback(pointer)
        return out

    def _follow_rollback(self, pointer: ChampionPointer | None) -> list[Output]:
        """Continue a rolled-back candidate from the version it was rolled back to.

        Looks at the last moves, not only the last one: a snapshot published just
        after a rollback to the version it continued may have advanced the
        pointer again; that advance is rolled back too.
        """
        moves = self.registry.recent_moves(10)
        new = [m for m in moves if m.at > self._rollbacks_after]
        self._rollbacks_after = max([self._rollbacks_after, *(m.at for m in moves)])
        back = next((m for m in reversed(new) if m.kind == "rollback"), None)
        if back is None or back.to.model not in self.candidates:
            return []
        c, to = self.candidates[back.to.model], back.to
        c.model, c.version = self.registry.load(to.model, to.version).model, to.version
        out = [self._model_event(ModelEvent(kind="rebased", model=c.name, version=c.version,
                                            reason=back.reason))]  # fmt: skip
        if pointer is not None and pointer.model == to.model and pointer.version > to.version:
            again = self.registry.move(to, "rollback", pointer, f"re-applied: {back.reason}")
            if again is not None:
                self._rollbacks_after = again.at
                out.append(self._model_event(again.as_event()))
        return out

    def _learn(self, snap: FeatureSnapshot, label: bool) -> Output:
        segment = None if self.segment is None else snap.inputs.get(self.segment)
        x = {**model_inputs(snap.inputs, self.extra), **self.plan.values(snap.aggregates)}
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
        """Publish every candidate as a new version; returns the model-events to write.

        The champion pointer advances to a candidate's new version only if it
        still points at that candidate's previous version (or, before any
        version exists, if the candidate is the lead): a promotion or rollback
        made meanwhile is never overwritten by the learner.
        """
        out: list[Output] = self.follow_registry(self.clock(), force=True)
        offsets = {self.topics.labels: {str(p): o for p, o in sorted(self.positions.items())}}
        for c in self.candidates.values():
            meta = {
                "model": c.name,
                "parent": c.version,
                "labels_seen": self.learned,
                "offsets": offsets,
                "metrics": c.metrics.as_dict(),
            }
            parent, c.version = c.version, self.registry.publish(c.name, c.model, meta)
            out.append(self._model_event(ModelEvent(kind="published", model=c.name,
                                                    version=c.version, parent=parent,
                                                    labels_seen=self.learned)))  # fmt: skip
            if parent or c.name == self.lead:
                expect = ChampionPointer(c.name, parent) if parent else None
                to = ChampionPointer(c.name, c.version)
                moved = self.registry.move(to, "advance", expect)
                current = self.registry.champion()
                if moved is None and current and self._orphan_of(current, c.name, parent):
                    moved = self.registry.move(to, "advance", current)
                if moved is not None:
                    out.append(self._model_event(moved.as_event()))
        self._staged = self.state()
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
        if self._staged is not None:
            self.registry.save_checkpoint(self._staged)
            self._staged = None

    def _orphan_of(self, pointer: ChampionPointer, name: str, parent: int) -> bool:
        """Whether ``pointer`` is a version of ``name`` that a dead run of this learner
        published after ``parent`` without committing it: it still follows the learner."""
        if pointer.model != name or not parent or pointer.version <= parent:
            return False
        version = pointer.version
        while version > parent:
            version = int(self.registry.meta(pointer.model, version).get("parent", 0))
        return version == parent

    def has_unpublished(self) -> bool:
        """Labels were read since the last snapshot (learned, refused or waiting)."""
        return self.positions != self._saved_positions

    def restore(self, saved: LearnerState) -> None:
        """Continue from a checkpoint: its label count, read positions and waiting labels."""
        self.learned = saved.labels_seen
        self.positions = dict(saved.positions)
        self._base = dict(saved.positions)
        self._saved_positions = dict(saved.positions)
        self._base_pending = {(msg.partition, msg.offset) for msg, _ in saved.pending}
        self._rollbacks_after = getattr(saved, "saved_at", 0.0)
        deadline = self.clock() + self.label_wait_s
        for msg, label in saved.pending:
            record = self.validate(msg.value)
            assert not isinstance(record, Invalid)  # it was valid when it was saved
            self.pending[record[self.label.event_id]] = _Pending(msg, label, deadline)

    def state(self) -> LearnerState:
        return LearnerState(
            versions={c.name: c.version for c in self.candidates.values()},
            metrics={c.name: c.metrics for c in self.candidates.values()},
            labels_seen=self.learned,
            positions=dict(self.positions),
            pending=[(p.msg, p.label) for p in self.pending.values()],
            saved_at=time.time(),
        )

    def _model_event(self, event: ModelEvent) -> Output:
        return Output(self.topics.model_events, event.model.encode(), event.encode())
