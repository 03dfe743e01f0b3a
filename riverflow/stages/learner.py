"""The learner stage: labels -> join the event as it was scored (its model inputs,
features and the prediction served, read back from the predictions topic:
``features.scored``) -> test, then train every candidate.

It holds no I/O of its own beyond the scored events, the store (the labels'
learned-marks) and the lineage it is given (which publishes versions and keeps
the checkpoint, ``riverflow.stages.lineage``), so the Kafka runtime, the
embedded runtime and the benchmark run it unchanged.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson

from riverflow.features.definitions import FeaturePlan
from riverflow.features.labelled import LabelFeatures, LearnedLabel
from riverflow.features.scored import ScoredEvent, ScoredEvents
from riverflow.features.store import ORPHAN, Claim, FeatureStore
from riverflow.models.batched import fm_proba_one
from riverflow.models.checkpoint import LearnerCheckpoint
from riverflow.models.target import Target
from riverflow.monitors.prequential import Metrics
from riverflow.stages.common import (
    DLQ_KEEP_BYTES,
    StageCounters,
    dead_letter,
    model_inputs,
    monitor_only_field,
)
from riverflow.stages.lineage import Candidate, Lineage
from riverflow.stages.search import Searches
from riverflow.stages.timeouts import DEFAULT_MARK, DueDefault, Timeouts, is_default_token
from riverflow.streams.contracts import (
    CandidatePrediction,
    Evaluation,
    Label,
    LabelPosition,
    LabelType,
    Message,
    Output,
)
from riverflow.streams.schema import LabelSpec
from riverflow.streams.topics import Topics
from riverflow.streams.validation import Invalid, label_validator


@dataclass
class _Pending:
    msg: Message
    label: Label
    since: float  # when this run started waiting for its event (the learner's clock)


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
    (every ``snapshot_every`` labels and every ``snapshot_every_s`` seconds; 0: never),
    at most once every ``snapshot_min_interval_s`` seconds (0: no floor), further apart
    while publishing takes over ``PUBLISH_SHARE`` of the time between versions.

    A version is a whole copy of every candidate: the learner pickles and signs each,
    and every scorer loads the champion's (a Hoeffding tree grows without end: ~2 MB
    after 100,000 labels, ~35 ms to publish and ~40 ms for a scorer to load, on its
    main thread). Published every 1,000 labels, a learner at thousands of labels a
    second spent a tenth of its CPU publishing, and each scorer stalled that often:
    the floor bounds both by time, whatever the label rate (docs/benchmarks.md,
    "Versions at most once a second").

    A label waits at least ``label_wait_s`` *and* until the scorer has scored every
    event produced by then and the learner has indexed their predictions; one
    older than ``label_horizon_s`` (its Kafka timestamp) is an orphan at once.
    At most ``max_waiting`` labels wait (``Learner.accepting``); past twice that, the
    oldest waiting label becomes an orphan (``orphan_label``, reason "waiting list
    full") and the oldest label held for its prediction's timeout (``label.learn:
    at_timeout``) is learned at once (``Learner._overflow``).
    ``keep_learned_s``: how long a learned label's mark stays in the store once
    the checkpoint covering it is committed (0: deleted then); its scored event
    is forgotten then.
    """

    label_wait_s: float
    snapshot_every: int
    snapshot_every_s: float
    label_horizon_s: float = 7 * 24 * 3600.0
    max_waiting: int = 50_000
    keep_learned_s: float = 600.0
    snapshot_min_interval_s: float = 0.0


_RELEASE_AT_MOST = 100_000  # learned event ids held to release at the next commit

# Publishing takes at most this share of the time between versions: the floor between
# two (``snapshot_min_interval_s``) is raised to the last publish's CPU time over it. A
# scorer loads the champion's version in about what the learner took to publish it (a
# 2.3 MB tree: 35 ms to pickle and sign, 41 to verify and unpickle, holding the GIL),
# so a scorer's batches stall for about this share of its time, whatever the model's size
PUBLISH_SHARE = 0.005

ScoredThrough = Callable[[], float | None]
"""The time (on the learner's clock) before which every event produced has been
scored, or None if not known yet. The Kafka runtime compares the scorer group's
committed offsets with the events topic's high watermarks; the embedded
runtime scores every event before its label, so there it is always now."""


class Learner:
    """labels -> join the event as it was scored and the prediction served for it
    -> test, then train.

    Every candidate sees every label in the same order: predict (prequential),
    update its metrics, ``learn_one``; then the spec's model searches do
    (``riverflow.stages.search``). Each label is claimed once in the store,
    so a duplicate label is never learned twice. A label whose event is not in
    ``scored`` yet waits (see ``LearnerTiming``), then goes to the DLQ as an
    orphan, and is marked so in the store: a learner restarted from an older
    checkpoint refuses it again instead of learning it. Every
    ``snapshot_every`` labels or ``snapshot_every_s`` seconds the lineage
    publishes each candidate as a new version and stages the checkpoint. The
    host calls ``commit`` once a batch's outputs are written.

    Exactly once: a checkpoint's read positions never pass a label that is
    neither learned into its models nor in its waiting list, so a learner
    restarted from any committed checkpoint learns each label once more only
    if the models it continues from lack it.
    """

    stage = "learner"

    def __init__(
        self,
        topics: Topics,
        store: FeatureStore,
        scored: ScoredEvents,
        lineage: Lineage,
        join: LabelJoin,
        timing: LearnerTiming,
        clock: Callable[[], float] = time.monotonic,
        scored_through: ScoredThrough | None = None,
        dlq_keep_bytes: int = DLQ_KEEP_BYTES,
        searches: Searches | None = None,
        timeouts: Timeouts | None = None,
        label_features: LabelFeatures | None = None,
    ) -> None:
        self.topics = topics
        self.timeouts = timeouts
        # label-fed features: every label learned by a call is written at its end
        self.label_features = label_features
        self._to_write: list[LearnedLabel] = []
        self.label_writes = {"written": 0, "duplicates": 0, "late": 0, "untimed": 0}
        self.searches = searches or Searches([])
        self.dlq_keep_bytes = dlq_keep_bytes
        self.store = store
        self.scored = scored
        self.lineage = lineage
        self.join = join
        self.timing = timing
        self.clock = clock
        # by default every event counts as scored: "now" on the learner's clock
        self.scored_through: ScoredThrough = scored_through or (lambda: self.clock())
        self.extra = monitor_only_field(join.segment, join.inputs)
        self.target = Target(join.label.type, join.label.classes)
        self._binary = self.target.type is LabelType.BOOL
        self.validate = label_validator(join.label, join.max_bytes)
        self.pending: dict[str, _Pending] = {}
        # label.learn: at_timeout: label messages claimed, held until their prediction's
        # timeout falls due (saved with the waiting labels: see publish)
        self.held: dict[str, _Pending] = {}
        self.learned = 0
        self.positions: dict[int, int] = {}
        self.duplicates = 0
        self.orphans = 0
        self.defaulted = 0  # labels by timeout learned
        self.after_default = 0  # label messages for events a default was learned for
        self.counters = StageCounters()
        self._since_snapshot = 0
        self._changed = False  # anything to publish since the last snapshot
        self._last_snapshot = clock()
        self._publish_s = 0.0  # the CPU time the last publish took
        # labels are marked learned under "run:partition:offset"; see _stale
        self.run = uuid.uuid4().hex[:12]
        self._base: dict[int, int] = {}
        self._base_pending: set[tuple[int, int]] = set()
        self._timeouts_base: dict[int, int] = {}  # the checkpoint's timeout positions
        # event ids learned since the last snapshot, and those of the staged one:
        # released in the store once the checkpoint covering them is committed
        # (labels by message, then labels by timeout: see commit)
        self._learned_ids: list[str] = []
        self._staged_ids: list[str] = []
        self._defaulted_ids: list[str] = []
        self._staged_defaulted: list[str] = []
        self._orphan_ids: list[str] = []
        self._carried: list[Output] = []  # made by a call that raised: see process
        self._unlearned: set[str] = set()  # tokens claimed by a call that raised: see _stale
        # the ids of a slate's prediction learned by a call that raised before the rest:
        # its token is taken over again, these are not learned again
        self._partial: set[str] = set()

    def _stale(self, token: str) -> bool:
        """Whether a learned-marker names a label that the models do not contain.

        This run's marks are in the models. Another run's mark is in them only if
        the checkpoint we started from covers its label: read before the saved
        position and not among the labels still waiting then. Otherwise that run
        died before its next snapshot, and this run learns the label again.
        An orphan mark is never stale: that label went to the DLQ.
        """
        if token in self._unlearned:
            return True  # ours, claimed by a call that raised before learning it
        parts = token.split(":")
        if parts[0] == ORPHAN or len(parts) != 3 or parts[0] == self.run:
            return False  # ours, an orphan, or a mark from before run tokens: trust it
        if parts[1].startswith(DEFAULT_MARK):  # a label by timeout: see Timeouts
            return int(parts[2]) >= self._timeouts_base.get(int(parts[1][1:]), 0)
        p, o = int(parts[1]), int(parts[2])
        return not (o < self._base.get(p, 0) and (p, o) not in self._base_pending)

    @property
    def candidates(self) -> dict[str, Candidate]:
        """The candidates trained on every label, by name."""
        return self.lineage.candidates

    @property
    def metrics(self) -> Metrics:
        """The lead candidate's metrics (the spec's champion)."""
        return self.candidates[self.lineage.lead].metrics

    @property
    def version(self) -> int:
        """The lead candidate's last published version."""
        return self.candidates[self.lineage.lead].version

    def process(self, batch: Sequence[Message]) -> list[Output]:
        """Learn from a batch of labels (an empty batch retries waiting labels).

        Labels are handled in order (waiting ones first). A label stays in
        ``pending`` from the moment it is read until it is learned or refused,
        and the read position advances label by label, so a snapshot taken
        mid-batch records exactly the labels its models have learned and those
        still waiting.

        If it raises (Redis unreachable), what it did stands: the outputs made so
        far are returned by the next call, and labels already read are skipped
        when the batch is given again.
        """
        out, self._carried = self._carried, []
        try:
            self._process(batch, out)
            self._write_label_features()
        except BaseException:
            self._carried = out
            raise
        self.counters.dead_letters += sum(o.topic == self.topics.dlq for o in out)
        self.counters.produced += len(out)
        return out

    def _process(self, batch: Sequence[Message], out: list[Output]) -> None:
        self.counters.consumed += len(batch)
        now = self.clock()
        through = self.scored_through()  # read before the lookup: see _orphaned
        self.scored.follow()
        out += self.lineage.follow(now)
        self.searches.follow(self.lineage.dynamic, self.candidates)
        if self.searches.dropped:  # (rare: read the pointer only then)
            pointer = self.lineage.registry.champion()
            adopted = self.searches.adopt(pointer, self.lineage.registry, self.candidates)
            out += [Output(self.topics.model_events, e.model.encode(), e.encode()) for e in adopted]
        order: list[tuple[Message, str | None]] = [(p.msg, e) for e, p in self.pending.items()]
        fresh: dict[str, _Pending] = {}
        for msg in batch:
            if msg.offset < self.positions.get(msg.partition, 0):
                self.duplicates += 1  # read already (e.g. a batch given again after an error)
                continue
            record = self.validate(msg.value)
            if isinstance(record, Invalid):
                keep = self.dlq_keep_bytes
                out.append(
                    dead_letter(self.topics, self.stage, msg, record.kind, record.message, keep)
                )
                order.append((msg, None))
                continue
            joins = self.join.label.join_id(record)
            if joins in self.pending or joins in fresh or joins in self.held:  # learn once
                self.duplicates += 1
                order.append((msg, None))
                continue
            fresh[joins] = _Pending(msg, record[self.join.label.field], now)
            order.append((msg, joins))
        todo = {**self.pending, **fresh}
        # asked only when a label may be orphaned: it may cost a round trip to the broker
        due = through is not None and any(self._due(p, now, through) for p in todo.values())
        if due and not self.scored.caught_up():
            through = None  # some events scored by then may not be indexed yet
        ids = list(todo)
        tokens = [f"{self.run}:{todo[e].msg.partition}:{todo[e].msg.offset}" for e in ids]
        # ours until learned, from before the claim: if the claim's answer is lost
        # after its script ran (a timeout, retried), the mark it left is ours to take
        # over, not a duplicate
        self._unlearned.update(tokens)
        events = self.scored.lookup(ids)
        known = [e in events for e in ids]
        # the store asks ``stale`` once per marked event and answers DUPLICATE exactly
        # where it says no: so many of the duplicates found a default's mark
        after_default = 0

        def stale(token: str) -> bool:
            nonlocal after_default
            if self._stale(token):
                return True
            after_default += is_default_token(token)
            return False

        claims = dict(zip(ids, self.store.claim_labels(ids, tokens, known, stale), strict=True))
        taken = {t for e, t in zip(ids, tokens, strict=True) if claims[e] is Claim.CLAIMED}
        self._unlearned.difference_update(set(tokens) - taken)
        every = self.timing.snapshot_every
        for msg, event_id in order:
            if event_id is not None:
                item, claim = todo[event_id], claims[event_id]
                if claim is Claim.MISSING:
                    why = self._orphaned(item, now, through)
                    if why is None:
                        self.pending[event_id] = item  # a fresh label starts waiting here
                    else:
                        out.append(self._orphan(event_id, item, why))
                elif claim is Claim.DUPLICATE:  # counted once a label of its event is learned
                    if after_default:
                        after_default -= 1
                        self.after_default += 1
                    else:
                        self.duplicates += 1
                    self.pending.pop(event_id, None)
                elif claim is Claim.ORPHANED:
                    out.append(self._orphan(event_id, item, "refused before (orphan mark)"))
                elif self.timeouts is not None and self.timeouts.timeout.hold:
                    # claimed, learned with its prediction's other ids when it falls due
                    # (see _defaults); its token stays ours to take over until then
                    self.held[event_id] = item
                    self.pending.pop(event_id, None)
                    self._changed = True
                else:
                    out += self._learn_message(events[event_id], event_id, item)
            if msg.offset >= self.positions.get(msg.partition, 0):
                self.positions[msg.partition] = msg.offset + 1
                self._changed = True
            if every and self._since_snapshot >= every and self._floor_passed():
                self._publish(out)
        if self.timeouts is not None:
            self._defaults(self.timeouts, out)
        out += self._overflow()
        if self._orphan_ids:  # marked before their DLQ records or a checkpoint are written
            self.store.mark_orphans(self._orphan_ids)
            self._orphan_ids = []
        every_s = self.timing.snapshot_every_s
        # (a model grown so large that its floor is past every_s: at the floor, not before)
        due_s = max(every_s, self.version_floor_s)
        if every_s and self._since_snapshot and now - self._last_snapshot >= due_s:
            self._publish(out)
        elif every and self._since_snapshot >= every and self._floor_passed():
            self._publish(out)  # held back by the floor, and no label came since it passed

    def _learn_message(self, snap: ScoredEvent, event_id: str, item: _Pending) -> list[Output]:
        """Learn a claimed label message (at once, or held until its timeout)."""
        msg = item.msg
        at = LabelPosition(msg.topic, msg.partition, msg.offset)
        ts = None if msg.timestamp_ms is None else msg.timestamp_ms / 1000
        out = self._learn(snap, item.label, at, ts)
        # after: a label whose learning raised waits (or stays held)
        self.pending.pop(event_id, None)
        self.held.pop(event_id, None)
        self._unlearned.discard(f"{self.run}:{msg.partition}:{msg.offset}")
        self._learned_ids.append(event_id)
        if len(self._learned_ids) > 2 * _RELEASE_AT_MOST:  # no snapshot for long
            del self._learned_ids[:-_RELEASE_AT_MOST]
        return out

    def _write_label_features(self) -> None:
        """Add the labels learned since the last write to the label-fed features: one
        call. A write that raises is made again by the next call (a label written
        twice within the dedup window counts once)."""
        if self.label_features is None or not self._to_write:
            return
        done = self.label_features.write(self._to_write)
        self._to_write = []
        self.label_writes["written"] += done.counted
        self.label_writes["duplicates"] += done.duplicates
        self.label_writes["late"] += done.late

    def _due(self, item: _Pending, now: float, through: float) -> bool:
        """Whether a label has waited its time, with every event scored since."""
        wait_s = self.timing.label_wait_s
        return now - item.since >= wait_s and through >= item.since + wait_s

    def _orphaned(self, item: _Pending, now: float, through: float | None) -> str | None:
        """Why a label whose event is not indexed is an orphan now, or None: it waits on.

        ``through`` was read before the lookup that did not find the event: every
        event produced before it had been scored, and its prediction written, by
        then; and it is None unless every prediction written by then was indexed
        before the lookup (``ScoredEvents.caught_up``).
        """
        wait_s = self.timing.label_wait_s
        if item.msg.timestamp_ms is not None:
            age = time.time() - item.msg.timestamp_ms / 1000
            if age > self.timing.label_horizon_s:
                return f"label older than the horizon ({self.timing.label_horizon_s:g}s)"
        if through is not None and self._due(item, now, through):
            return f"no scored event after {wait_s:g}s, with every event scored"
        return None

    def _orphan(self, event_id: str, item: _Pending, why: str) -> Output:
        self.pending.pop(event_id, None)
        self._orphan_ids.append(event_id)
        self.orphans += 1
        self._changed = True
        why = f"no scored event {event_id!r}: {why}"
        return dead_letter(
            self.topics, self.stage, item.msg, "orphan_label", why, self.dlq_keep_bytes
        )

    def accepting(self) -> bool:
        """Whether to read more labels: not while ``max_waiting`` wait for their events
        (the confluent host pauses the labels partitions meanwhile and ticks on, so
        a scorer down for minutes costs no label). Held labels do not count: paused,
        a click could be read only after its prediction's timeout defaulted it."""
        return len(self.pending) < self.timing.max_waiting

    def _overflow(self) -> list[Output]:
        """Past twice ``max_waiting``, orphan the oldest waiting labels (on a host that
        reads on regardless: the confluent host pauses at ``max_waiting``, see
        ``accepting``), and learn the oldest held ones before their timeout (out of
        their prediction's order, but each once): memory and the checkpoint stay
        bounded whatever the click rate."""
        cap = 2 * self.timing.max_waiting
        out = []
        extra = len(self.pending) - cap
        if extra > 0:
            why = f"waiting list full ({cap} labels)"
            out += [self._orphan(e, self.pending[e], why) for e in list(self.pending)[:extra]]
        early = list(self.held)[: max(0, len(self.held) - cap)]
        events = self.scored.lookup(early) if early else {}
        for event_id in early:
            item = self.held[event_id]
            if event_id in events:
                out += self._learn_message(events[event_id], event_id, item)
            else:  # (its record left the index: not learnable)
                self.held.pop(event_id)
                out.append(self._orphan(event_id, item, "its event left the index"))
        return out

    def _defaults(self, timeouts: Timeouts, out: list[Output]) -> None:
        """Learn the default of every scored event whose timeout fell due, unless a label
        was claimed for it first (then this finds its mark: DUPLICATE). The timeouts'
        position moves prediction by prediction, as the labels' does label by label,
        so a snapshot taken midway saves exactly the defaults its models hold.

        A held label message (``label.learn: at_timeout``) is claimed already: it is
        learned here, in its prediction's order, instead of the default."""
        due = timeouts.due()
        if not due:
            return
        # an id due twice in one call (two predictions of an event) is claimed once
        token_of: dict[str, str] = {}
        for d in due:
            for e in d.ids:
                token_of.setdefault(e, f"{self.run}:{DEFAULT_MARK}{d.msg.partition}:{d.msg.offset}")
        events = self.scored.lookup(list(token_of))
        # an event the index no longer holds was labelled (and forgotten) or is past the
        # horizon: nothing to claim
        ids = [e for e in token_of if e in events and e not in self.held]
        tokens = [token_of[e] for e in ids]
        self._unlearned.update(tokens)
        unread = 0  # label messages' marks the models may lack: this run reads them again

        def stale(token: str) -> bool:
            # a default never takes a label message's mark over: if the models lack that
            # label, this run reads it again (from the checkpoint's position, or its
            # waiting list) and takes its mark over itself
            nonlocal unread
            if is_default_token(token):
                return self._stale(token)
            unread += self._stale(token)
            return False

        claimed = self.store.claim_labels(ids, tokens, [True] * len(ids), stale)
        todo = {e for e, c in zip(ids, claimed, strict=True) if c is Claim.CLAIMED}
        # a token stays ours until every id of its prediction claimed under it is learned
        self._unlearned.difference_update(set(tokens) - {token_of[e] for e in todo})
        if unread and timeouts.timeout.hold:
            # (after a restart) a label message read past the checkpoint is read again
            # and held: its prediction must wait for it, so none goes on until it is;
            # the defaults claimed here are ours to take over then
            return
        found = {e for e, c in zip(ids, claimed, strict=True) if c is Claim.DUPLICATE}
        if found and not unread:
            self._forget_labelled(found)
        every = self.timing.snapshot_every
        for d in due:
            self._learn_defaults(d, events, todo, timeouts.timeout.default, out)
            timeouts.advance(d.msg)
            self._partial.clear()
            self._changed = True
            if every and self._since_snapshot >= every and self._floor_passed():
                self._publish(out)

    @property
    def version_floor_s(self) -> float:
        """The least time between two versions now: ``snapshot_min_interval_s``, or
        longer if the last publish took more than ``PUBLISH_SHARE`` of it in CPU time (a
        model grown large); 0 without a floor."""
        floor = self.timing.snapshot_min_interval_s
        return max(floor, self._publish_s / PUBLISH_SHARE) if floor else 0.0

    def _floor_passed(self) -> bool:
        return self.clock() - self._last_snapshot >= self.version_floor_s

    def _forget_labelled(self, found: set[str]) -> None:
        """Forget events a default found labelled in a committed checkpoint, yet in the
        index: a prediction given again (a scorer's replay) after that checkpoint
        forgot the event. Then the replay's own default, and a label message coming
        once the mark is gone, find nothing to learn. An event whose label this run
        learned since its last commit is left: that commit forgets it (forgotten now,
        a learner killed before it could not learn that label again)."""
        for uncommitted in (self._learned_ids, self._staged_ids, self._defaulted_ids,
                            self._staged_defaulted):  # fmt: skip
            found.difference_update(uncommitted)
        if found:
            self.scored.forget(list(found))

    def _learn_defaults(
        self,
        due: DueDefault,
        events: dict[str, ScoredEvent],
        todo: set[str],
        label: Label,
        out: list[Output],
    ) -> None:
        msg = due.msg
        at = LabelPosition(msg.topic, msg.partition, msg.offset)
        for event_id in due.ids:
            if event_id in self.held:
                item = self.held[event_id]
                if event_id in events:
                    out += self._learn_message(events[event_id], event_id, item)
                else:  # (its record left the index before its timeout: not learnable)
                    self.held.pop(event_id)
                    out.append(self._orphan(event_id, item, "its event left the index"))
                continue
            if event_id not in todo or event_id in self._partial:
                continue
            todo.discard(event_id)
            out += self._learn(events[event_id], label, at, due.due_at, defaulted=True)
            self._partial.add(event_id)
            self.defaulted += 1
            self._defaulted_ids.append(event_id)
            if len(self._defaulted_ids) > 2 * _RELEASE_AT_MOST:  # no snapshot for long
                del self._defaulted_ids[:-_RELEASE_AT_MOST]
        self._unlearned.discard(f"{self.run}:{DEFAULT_MARK}{msg.partition}:{msg.offset}")

    def _learn(
        self,
        snap: ScoredEvent,
        label: Label,
        at: LabelPosition,
        label_time: float | None,
        defaulted: bool = False,
    ) -> list[Output]:
        # read before anything learns: a read that raises (Redis down) must leave the
        # label unlearned, for the guard's retry to learn it once
        serving = self._serving() if self.searches.rung_ends_next() else self.lineage.lead
        segment = None if self.join.segment is None else snap.inputs.get(self.join.segment)
        x = {**model_inputs(snap.inputs, self.extra), **snap.features}
        predictions: dict[str, CandidatePrediction] = {}
        for c in self.candidates.values():
            # a factorization machine's in linear time (models.batched): River sums its
            # pairwise interactions pair by pair, a third of a recsys label's learning
            proba = fm_proba_one(c.model, x) if self._binary else None
            scored, prediction = self.target.predict(c.model, x, c.version, label, proba)
            c.metrics.update(label, scored)
            c.model.learn_one(x, label)
            predictions[c.name] = prediction
        self.learned += 1
        self._since_snapshot += 1
        self._changed = True
        # a search ranks binary classifiers only (the spec refuses one on another label)
        search = self.searches.learn(x, label is True, self.candidates, serving)
        record = Evaluation(
            event_id=snap.event_id,
            label=label,
            labels_seen=self.learned,
            predictions=predictions,
            served=snap.served,
            segment=segment,
            label_at=at,
            label_time=label_time,
            inputs=x,
            search=[orjson.loads(e.encode()) for e in search] or None,
            defaulted=defaulted,
        )
        if snap.slot is not None:  # a slate's shown item: where it was served
            slot = snap.slot
            record.request, record.position = slot["request"], slot["position"]
            record.shown, record.propensity = slot["shown"], slot["propensity"]
        # label-fed features (the spec has none with a category label): at its event's
        # time, a slate pair's its request's
        if self.label_features is not None and not isinstance(label, str):
            if snap.event_time is None:  # indexed before event times were kept
                self.label_writes["untimed"] += 1
            else:
                self._to_write.append(
                    LearnedLabel(snap.event_id, snap.inputs, label, snap.event_time)
                )
        events = [Output(self.topics.model_events, e.model.encode(), e.encode()) for e in search]
        return [Output(self.topics.evaluations, snap.event_id.encode(), record.encode()), *events]

    def _serving(self) -> str:
        """The candidate the champion pointer names (the lead before any version)."""
        pointer = self.lineage.registry.champion()
        return pointer.model if pointer else self.lineage.lead

    def status(self) -> dict[str, float]:
        out = {
            "labels_learned": float(self.learned),
            "labels_duplicate": float(self.duplicates),
            "labels_orphaned": float(self.orphans),
            "labels_defaulted": float(self.defaulted),
            "labels_after_default": float(self.after_default),
            "labels_waiting": float(len(self.pending)),
            "labels_held": float(len(self.held)),
            "model_version": float(self.version),  # the lead candidate's
            **{f"prequential_{k}": v for k, v in self.metrics.as_dict().items()},
        }
        if self.label_features is not None:  # labels written, seen before, too late
            out.update({f"label_features_{k}": float(v) for k, v in self.label_writes.items()})
        out["version_floor_s"] = self.version_floor_s
        index_bytes = self.scored.memory_bytes()
        if index_bytes is not None:  # the scored-events index's RocksDB, in the process
            out["scored_index_bytes"] = float(index_bytes)
        sizes = self.lineage.registry.published_bytes
        for c in self.candidates.values():
            out[f"{c.name}:version"] = float(c.version)
            if c.name in sizes:  # its last version's signed size, once it has published
                out[f"{c.name}:version_bytes"] = float(sizes[c.name])
            out.update({f"{c.name}:prequential_{k}": v for k, v in c.metrics.as_dict().items()})
        return out

    def publish(self) -> list[Output]:
        """Publish every candidate as a new version (see ``Lineage.publish``); returns
        the model-events to write."""
        # what a call that raised made goes out with it (a clean stop publishes it too)
        out, self._carried = self._carried, []
        try:
            self._publish(out)
        except BaseException:  # (Redis down midway: a version or pointer move made
            self._carried = out  # before keeps its model-event)
            raise
        return out

    def _publish(self, out: list[Output]) -> None:
        # held labels are saved as waiting ones: a restarted learner claims them again
        # (its checkpoint says their marks are stale) and holds them again
        pending = [(p.msg, p.label) for p in (*self.pending.values(), *self.held.values())]
        searches = self.searches.publish(self.lineage.registry, self.learned)
        timeouts = None if self.timeouts is None else self.timeouts.positions
        # its CPU time, what pickling and signing cost (and a scorer's load): not its
        # wall time, which a slow Redis (a failover) would turn into minutes of floor
        started = time.thread_time()
        self.lineage.publish(
            out, self.clock(), self.learned, self.positions, pending, searches, timeouts
        )
        self._publish_s = time.thread_time() - started
        # bounded: ids beyond it are not released early, they expire at the horizon
        self._staged_ids = [*self._staged_ids, *self._learned_ids][-_RELEASE_AT_MOST:]
        self._learned_ids = []
        staged = [*self._staged_defaulted, *self._defaulted_ids]
        self._staged_defaulted = staged[-_RELEASE_AT_MOST:]
        self._defaulted_ids = []
        self._since_snapshot = 0
        self._changed = False
        self._last_snapshot = self.clock()

    def commit(self) -> None:
        """Save the checkpoint of the last snapshot; call once its outputs are written.

        Saved only then, so a learner that dies before its evaluations and
        model-events are acknowledged restarts from the previous checkpoint
        and writes them again (at least once) instead of losing them. Then the
        store lets go of those labels' learned-marks and the learner forgets their
        scored events.
        """
        if self._carried:  # outputs the checkpoint covers are not written yet
            return
        if not self.lineage.commit():
            return
        keep = self.timing.keep_learned_s
        if self._staged_ids:
            # a label message's mark outlives its event's timeout: a replayed prediction
            # the index took in again after it forgot the event must find the mark
            # when its default falls due (see _forget_labelled)
            after = 0.0 if self.timeouts is None else self.timeouts.timeout.after_s
            self.store.release_learned(self._staged_ids, max(keep, after))
            self.scored.forget(self._staged_ids)
            self._staged_ids = []
        if self._staged_defaulted:
            self.store.release_learned(self._staged_defaulted, keep)
            self.scored.forget(self._staged_defaulted)
            self._staged_defaulted = []

    def has_unpublished(self) -> bool:
        """Labels were read, learned or refused since the last snapshot (or a call
        that raised left outputs to write)."""
        return self._changed or bool(self._carried)

    def restore(self, saved: LearnerCheckpoint) -> None:
        """Continue from a checkpoint: its candidates' versions and metrics (in the
        lineage), its label count, read positions and waiting labels."""
        self.searches.restore(saved, self.lineage.registry, self.candidates)
        self.lineage.restore(saved)
        self.searches.challengers = set(self.lineage.dynamic)  # none of them new
        self.learned = saved.labels_seen
        self.positions.clear()  # the host may hold this dict already
        self.positions.update(saved.positions)
        self._base = dict(saved.positions)
        self._base_pending = {(msg.partition, msg.offset) for msg, _ in saved.pending}
        self._timeouts_base = dict(saved.timeouts)
        if self.timeouts is not None:
            self.timeouts.restore(saved.timeouts)
        now = self.clock()
        for msg, label in saved.pending:
            record = self.validate(msg.value)
            assert not isinstance(record, Invalid)  # it was valid when it was saved
            self.pending[self.join.label.join_id(record)] = _Pending(msg, label, now)
