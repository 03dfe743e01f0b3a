"""Each label is learned exactly once into the models a learner continues from,
whatever point a learner is killed at and however far the scorer lags; a label
goes to the DLQ only when its event can no longer be scored, and never after it
was learned."""

from __future__ import annotations

import base64
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from riverflow.assembly import build_learner, build_scorer, signing_key
from riverflow.features.scored import MemoryScoredEvents
from riverflow.features.store import MemoryFeatureStore
from riverflow.models.registry import ChampionPointer, MemoryRegistry
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, parse_spec
from riverflow.stages.learner import Learner
from riverflow.streams.contracts import DeadLetter, Message, ModelEvent, Output
from riverflow.tools.generator import FraudStreamConfig, transactions

WAIT_S = 3.0
# no version floor: it rises with a publish's CPU time, so the writes of a run (and
# which one each kill hits) would depend on the machine's speed (CI: a kill at the
# counted run's last write fell into the final publish once)
SETTINGS = Settings(label_wait_s=WAIT_S, snapshot_every_labels=4, snapshot_every_s=5,
                    snapshot_min_interval_s=0)  # fmt: skip


class Recorder:
    """A model that remembers what it learned (each event has its own ``amount``)."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def predict_proba_one(self, x: dict[str, Any]) -> dict[bool, float]:
        return {True: 0.5, False: 0.5}

    def learn_one(self, x: dict[str, Any], y: bool) -> None:
        self.seen.append(x["amount"])


class Killed(Exception):
    """The learner's process died here."""


class Outage(Exception):
    """Redis did not answer this write (the learner lives on and retries)."""


@dataclass
class Kills:
    """Kills the learner before its n-th write to the store or the registry (or,
    with ``outage``, fails that write and lets the learner retry the batch)."""

    at: set[int] = field(default_factory=set)
    count: int = 0
    outage: bool = False
    reply_lost: bool = False  # a claim or a pointer move fails after it ran (a timeout)
    reads: bool = False  # the learner's reads of the registry count (and fail) too
    paused: bool = False  # (while the scorer reads, or a learner restores)

    def tick(self, write: bool = True) -> None:
        self.count += 1
        if self.count in self.at and not (self.outage and not write):
            raise (Outage if self.outage else Killed)(self.count)

    def read(self) -> None:
        if self.reads and not self.paused:
            self.tick()

    @contextmanager
    def pause(self) -> Iterator[None]:
        self.paused = True
        try:
            yield
        finally:
            self.paused = False


class KillableStore(MemoryFeatureStore):
    kills: Kills

    def claim_labels(self, *args: Any) -> Any:
        if not self.kills.reply_lost:
            self.kills.tick()
            return super().claim_labels(*args)
        claims = super().claim_labels(*args)
        self.kills.tick()
        return claims

    def mark_orphans(self, *args: Any) -> None:
        self.kills.tick()
        super().mark_orphans(*args)

    def release_learned(self, *args: Any) -> None:
        self.kills.tick()
        super().release_learned(*args)


class KillableRegistry(MemoryRegistry):
    kills: Kills

    def _store(self, *args: Any) -> int:
        self.kills.tick()
        return super()._store(*args)

    def _compare_and_set(self, *args: Any) -> bool:
        if not self.kills.reply_lost:
            self.kills.tick()
            return super()._compare_and_set(*args)
        moved = super()._compare_and_set(*args)
        self.kills.tick()
        return moved

    def _save_checkpoint(self, raw: bytes) -> None:
        self.kills.tick()
        super()._save_checkpoint(raw)

    def _get(self, *args: Any) -> Any:
        self.kills.read()
        return super()._get(*args)

    def _pointer(self) -> bytes | None:
        self.kills.read()
        return super()._pointer()

    def _recent_moves(self, n: int) -> list[bytes]:
        self.kills.read()
        return super()._recent_moves(n)

    def _challengers(self) -> dict[str, bytes]:
        self.kills.read()
        return super()._challengers()


@dataclass
class World:
    """Events scored on their own schedule (the scorer lags, goes down), labels on two
    partitions read from the learner's positions, outputs written once a batch is done."""

    spec: PipelineSpec
    kills: Kills
    events: list[tuple[int, int, Message]]  # (tick it is produced at, scored at, the event)
    labels: dict[int, list[Message]]
    amounts: dict[str, float]  # event id -> its amount
    store: KillableStore = field(init=False)
    registry: KillableRegistry = field(init=False)
    # the learner's index of predictions: it outlives the learner (on disk in the
    # Kafka runtime), and a prediction is in it once written
    scored: MemoryScoredEvents = field(default_factory=MemoryScoredEvents)
    written: list[Output] = field(default_factory=list)
    tick: int = 0

    def __post_init__(self) -> None:
        self.store = KillableStore(self.spec.feature_plan())
        self.store.kills = self.kills
        self.registry = KillableRegistry(signing_key(SETTINGS))
        self.registry.kills = self.kills
        with self.kills.pause():
            self.scorer = build_scorer(
                self.spec, SETTINGS, self.store, self.registry, model_poll_s=0
            )

    def score(self, events: list[Message]) -> None:
        with self.kills.pause():
            self.scored.add(as_messages(self.scorer.process(events)))

    def scored_through(self) -> float:
        """Every event produced before this was scored (the Kafka runtime reads it
        from the scorer group's lag)."""
        unscored = [made for made, at, _ in self.events if made <= self.tick < at]
        return float(self.tick) if not unscored else min(unscored) - 0.5

    def start_learner(self) -> Learner:
        # on the world's clock from the start: a restored learner dates its waiting
        # labels by it (on the host's clock they would wait ~uptime ticks)
        with self.kills.pause():
            learner = build_learner(
                self.spec, SETTINGS, self.store, self.registry, self.scored, registry_poll_s=0,
                scored_through=self.scored_through, clock=lambda: float(self.tick),
            )  # fmt: skip
        for c in learner.candidates.values():
            if not isinstance(c.model, Recorder):
                c.model = Recorder()
        return learner

    def next_labels(self, positions: dict[int, int]) -> list[Message]:
        return [m for p, ms in self.labels.items() for m in ms[positions.get(p, 0) :][:3]]

    def run(self) -> Learner:
        learner = self.start_learner()
        while True:
            self.tick += 1
            self.score([m for _, at, m in self.events if at == self.tick])
            batch = self.next_labels(learner.positions)
            try:
                outputs = learner.process(batch)
                self.kills.tick(write=False)  # between the batch and its outputs written
                self.written += outputs
                learner.commit()
            except Killed:
                learner = self.start_learner()
                continue
            except Outage:
                continue  # the same learner is given the batch again
            done = self.tick > max(at for _, at, _ in self.events)
            if done and not batch and not learner.pending:
                break
        try:  # a clean stop publishes what was learned since the last snapshot
            self.written += learner.publish() if learner.has_unpublished() else []
            learner.commit()
        except Killed:
            return self.run()
        return learner


def as_messages(outputs: list[Output]) -> list[Message]:
    """Outputs as a reader of their topics gets them (offsets per topic)."""
    return [Message(o.topic, 0, i, o.key, o.value) for i, o in enumerate(outputs)]


def world(spec: PipelineSpec, kills: Kills, seed: int = 3) -> World:
    """40 events; a scorer that lags, and is down from tick 6 to 14; labels on two
    partitions, some before their event is scored, one long before (an orphan), two
    duplicates, one label of an event never produced and one invalid label."""
    rng = random.Random(seed)
    events, labels, amounts = [], {0: [], 1: []}, {}  # type: ignore[var-annotated]
    for i, (event, fraud) in enumerate(transactions(40, FraudStreamConfig(seed=seed))):
        event["amount"] = amounts[event["event_id"]] = float(i) + 0.5
        made = 1 + i // 4 if i != 30 else 25  # one event comes long after its label
        at = 15 if 6 <= made < 15 else made  # the scorer is down
        msg = Message("events", 0, i, None, orjson.dumps(event))
        events.append((made, at, msg))
        labels[i % 2].append({"event_id": event["event_id"], "is_fraud": fraud})
    labels[0].insert(5, labels[0][1])  # a duplicate label
    labels[1].append(labels[1][0])  # and another, late
    labels[1].insert(3, {"event_id": "never-produced", "is_fraud": True})
    labels[0].insert(9, {"event_id": 7})  # invalid
    rng.shuffle(labels[1][10:16])
    topic = spec.topics.labels
    msgs = {
        p: [Message(topic, p, o, None, orjson.dumps(v)) for o, v in enumerate(vs)]
        for p, vs in labels.items()
    }
    return World(spec, kills, events, msgs, amounts)


def check(w: World, learner: Learner) -> None:
    w.kills.paused = True  # (the run is over: these reads are the test's)
    saved = w.registry.checkpoint()
    assert saved is not None and not saved.pending
    learned: Counter[float] = Counter()
    spec_candidates = {c.name for c in w.spec.models.candidates}  # (not a search's survivor)
    for name, version in saved.versions.items():
        if name not in spec_candidates:
            continue
        model = w.registry.load(name, version).model
        assert isinstance(model, Recorder)
        assert learned in (Counter(), Counter(model.seen)), name  # all candidates alike
        learned = Counter(model.seen)
    letters = [DeadLetter.decode(o.value) for o in w.written if o.topic == w.spec.topics.dlq]
    orphans = {_event_id(d) for d in letters if d.error_kind == "orphan_label"}
    late = orjson.loads(w.events[30][2].value or b"")["event_id"]
    # only the event never produced, and the one that came long after its label
    # (unless a restarted learner read that label again late enough to learn it)
    assert orphans in ({"never-produced", late}, {"never-produced"})
    assert learned == Counter(a for e, a in w.amounts.items() if e not in orphans)
    assert saved.labels_seen == len(w.amounts) - len(orphans) + 1
    # the pointer followed the learner to the end (no monitor moves it here)
    lead = w.spec.models.champion
    assert w.registry.champion() == ChampionPointer(lead, saved.versions[lead])


def _event_id(letter: DeadLetter) -> str:
    return str(orjson.loads(base64.b64decode(letter.payload_b64 or ""))["event_id"])


def writes_in_a_run(spec: PipelineSpec, reads: bool = False) -> int:
    w = world(spec, Kills(reads=reads))
    check(w, w.run())
    return w.kills.count


def test_an_uninterrupted_learner_learns_every_label_once_and_orphans_only_the_unproduced(
    unmonitored_spec: PipelineSpec,
) -> None:
    assert writes_in_a_run(unmonitored_spec) > 20


def test_a_learner_killed_at_any_point_learns_every_label_exactly_once(
    unmonitored_spec: PipelineSpec,
) -> None:
    for at in range(1, writes_in_a_run(unmonitored_spec) + 1):
        w = world(unmonitored_spec, Kills({at}))
        check(w, w.run())


@pytest.mark.parametrize("seed", range(4))
def test_a_learner_killed_again_and_again_learns_every_label_exactly_once(
    unmonitored_spec: PipelineSpec, seed: int
) -> None:
    rng = random.Random(seed)
    kills = Kills(set(rng.sample(range(1, 150), 25)))
    w = world(unmonitored_spec, kills, seed=seed)
    check(w, w.run())


def label_msg(spec: PipelineSpec, offset: int, event_id: str, ts_ms: int | None = None) -> Message:
    value = orjson.dumps({"event_id": event_id, "is_fraud": True})
    return Message(spec.topics.labels, 0, offset, None, value, ts_ms)


def test_a_label_waits_while_the_scorer_lags_and_is_an_orphan_once_it_caught_up(
    unmonitored_spec: PipelineSpec,
) -> None:
    clock, through = [0.0], [0.0]
    store = MemoryFeatureStore(unmonitored_spec.feature_plan())
    registry = MemoryRegistry(signing_key(SETTINGS))
    learner = build_learner(unmonitored_spec, SETTINGS, store, registry, MemoryScoredEvents(),
                            scored_through=lambda: through[0])  # fmt: skip
    learner.clock = lambda: clock[0]
    assert learner.process([label_msg(unmonitored_spec, 0, "e1")]) == []
    clock[0] = 100 * WAIT_S  # long past label_wait_s, but the scorer is behind
    assert learner.process([]) == [] and list(learner.pending) == ["e1"]
    through[0] = WAIT_S  # every event produced within label_wait_s of the label: scored
    [letter] = [DeadLetter.decode(o.value) for o in learner.process([])]
    assert letter.error_kind == "orphan_label" and "every event scored" in letter.error
    assert not learner.pending
    # a label older than the label horizon cannot find its event: an orphan at once
    old = label_msg(unmonitored_spec, 1, "e2", ts_ms=1000)
    [letter] = [DeadLetter.decode(o.value) for o in learner.process([old])]
    assert "older than the horizon" in letter.error


def test_a_clean_stop_publishes_labels_learned_from_the_waiting_list(
    unmonitored_spec: PipelineSpec,
) -> None:
    w = world(unmonitored_spec, Kills())
    learner = w.start_learner()
    w.tick = 1
    first = [m for m in w.labels[0][:2]]  # their events are not scored yet
    learner.process(first)
    learner.publish()
    learner.commit()
    assert not learner.has_unpublished() and len(learner.pending) == 2
    w.tick = 2
    w.score([m for made, _, m in w.events if made <= 2])
    learner.process([])  # learned from the waiting list: no read position moved
    assert not learner.pending and learner.learned == 2
    assert learner.has_unpublished()  # so a clean stop publishes them


def test_a_batch_retried_after_a_redis_error_evaluates_every_label_once(
    unmonitored_spec: PipelineSpec,
) -> None:
    for at in range(1, writes_in_a_run(unmonitored_spec) + 1):
        w = world(unmonitored_spec, Kills({at}, outage=True))
        check(w, w.run())
        evaluated = Counter(o.key for o in w.written if o.topic == w.spec.topics.evaluations)
        assert set(evaluated.values()) == {1}, at  # none lost, none twice
        assert_every_move_logged(w)


def assert_every_move_logged(w: World) -> None:
    """Every move of the pointer is in the audit log (the model-events written), even
    one a snapshot made before a later call of it failed."""
    events = [
        ModelEvent.decode(o.value) for o in w.written if o.topic == w.spec.topics.model_events
    ]
    logged = {(e.kind, e.model, e.version, e.at) for e in events}
    moves = [m.as_event() for m in w.registry.history()]
    assert moves and [m for m in moves if (m.kind, m.model, m.version, m.at) not in logged] == []


def test_a_claim_or_pointer_move_whose_reply_was_lost_loses_no_label_nor_log(
    unmonitored_spec: PipelineSpec,
) -> None:
    # the claim ran and marked the labels with this run's token, but its answer was
    # lost: the batch given again must learn them, not count them as duplicates; a
    # pointer move applied whose answer was lost is still in the audit log
    for at in range(1, writes_in_a_run(unmonitored_spec) + 1):
        w = world(unmonitored_spec, Kills({at}, outage=True, reply_lost=True))
        check(w, w.run())
        evaluated = Counter(o.key for o in w.written if o.topic == w.spec.topics.evaluations)
        assert set(evaluated.values()) == {1}, at
        assert_every_move_logged(w)


@pytest.fixture(scope="module")
def searching_spec(unmonitored_spec: PipelineSpec) -> PipelineSpec:
    """The fraud spec whose search ends its round within the world's 40 labels
    (budget 3: its six configurations are down to one after 21)."""
    data = unmonitored_spec.model_dump(mode="json", by_alias=True)
    for c in data["models"]["candidates"]:
        if c["search"]:
            c["search"]["budget"] = 3
    return parse_spec(data)


def test_a_redis_error_at_any_registry_call_of_a_searching_learner_loses_nothing(
    searching_spec: PipelineSpec,
) -> None:
    # the label that ends a search's round reads the champion pointer (a survivor
    # serving stays): that read failing must not learn the label twice, nor leave the
    # round's survivors out
    for at in range(1, writes_in_a_run(searching_spec, reads=True) + 1):
        w = world(searching_spec, Kills({at}, outage=True, reads=True))
        check(w, w.run())
        evaluated = Counter(o.key for o in w.written if o.topic == w.spec.topics.evaluations)
        assert set(evaluated.values()) == {1}, at  # none lost, none twice
        events = [
            ModelEvent.decode(o.value) for o in w.written if o.topic == w.spec.topics.model_events
        ]
        assert [e.kind for e in events if e.kind in ("search", "prune")] == [
            "search",
            *["prune"] * 3,
        ], at
        [survivor] = [e.model for e in events if e.kind == "started"]
        assert survivor.startswith("fraud-logreg@"), at
        assert survivor in w.registry.checkpoint().versions, at
        assert_every_move_logged(w)


def test_a_rollback_is_followed_even_when_redis_fails_while_the_learner_reads_it(
    unmonitored_spec: PipelineSpec,
) -> None:
    # the monitor rolled the lead back from v2 to v1; each of the learner's registry
    # calls while it follows that failing in turn: the next follow continues from v1
    for k in range(1, 5):
        w = world(unmonitored_spec, Kills(outage=True, reads=True))
        learner = w.start_learner()
        lead = learner.candidates[learner.lineage.lead]
        learner.publish()  # v1, then v2: the pointer follows
        learner.publish()
        assert w.registry.champion() == ChampionPointer(lead.name, 2) and lead.version == 2
        w.registry.promote(ChampionPointer(lead.name, 1), "rollback", "worse on recent labels")
        w.kills.at = {w.kills.count + k}
        with pytest.raises(Outage):
            learner.lineage.follow(0.0, force=True)
        out = learner.lineage.follow(0.0, force=True)
        events = [ModelEvent.decode(o.value) for o in out]
        assert [(e.kind, e.model, e.version) for e in events] == [("rebased", lead.name, 1)], k
        assert lead.version == 1 and w.registry.champion() == ChampionPointer(lead.name, 1)
