"""Labels by timeout (``label: {default, after}``): a scored event with no label message
within ``after`` of its prediction is labelled ``default``, exactly once, on the
embedded runtime; the spec refuses a timeout that cannot work."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import orjson
import pytest

from riverflow.assembly import build_learner, memory_backends, signing_key
from riverflow.embedded import EmbeddedLog, EmbeddedRuntime, LogTimers
from riverflow.errors import RiverflowError
from riverflow.features.errors import FeatureStoreError
from riverflow.features.scored import MemoryScoredEvents, defaulted_ids
from riverflow.features.store import Claim, FeatureStore
from riverflow.models.checkpoint import LearnerCheckpoint
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, SpecError, parse_spec
from riverflow.stages.common import guarded
from riverflow.stages.learner import Learner
from riverflow.stages.timeouts import LabelTimeout, Timeouts, label_timeout
from riverflow.streams.contracts import Evaluation, LabelType, Message, Output
from riverflow.streams.schema import LabelSpec
from riverflow.tools.generator import FraudStreamConfig, transactions
from tests.riverflow.test_spec import fraud_data

AFTER_S = 10.0


def timeout_spec(**label: Any) -> PipelineSpec:
    data = fraud_data()
    data["label"] = {**data["label"], **label}
    return parse_spec(data)


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ({"default": False}, "label: default: a label by timeout needs both default and after"),
        ({"after": "30m"}, "label: after: a label by timeout needs both default and after"),
        ({"default": False, "after": "30 min"}, "label: after: not a duration: '30 min'"),
        ({"default": False, "after": "0s"}, "label: after: not a duration: '0s'"),
        ({"default": 0, "after": "30m"}, "label: default: 0 does not fit label.type bool"),
        ({"default": "no", "after": "30m"}, "label: default: 'no' does not fit label.type bool"),
        ({"type": "int", "default": 1.5, "after": "1h"}, "default: 1.5 does not fit label.type"),
        ({"type": "float", "default": True, "after": "1h"}, "default: True does not fit label"),
        (
            {"type": "category", "classes": ["card", "cash"], "default": "boat", "after": "1h"},
            "label: default: 'boat' is not one of the declared classes",
        ),
    ],
)
def test_a_timeout_that_cannot_label_is_refused_naming_the_field(
    label: dict[str, Any], expected: str
) -> None:
    with pytest.raises(SpecError, match=expected):
        timeout_spec(**label)


def test_a_default_is_taken_as_a_label_of_the_declared_type() -> None:
    assert timeout_spec(default=False, after="30m").label.default_label is False
    assert LabelSpec(field="y", type=LabelType.INT, default=3.0, after="1h").default_label == 3
    assert LabelSpec(field="y", type=LabelType.FLOAT, default=0, after="1h").default_label == 0.0
    category = LabelSpec(
        field="y", type=LabelType.CATEGORY, classes=["1", "2"], default=2, after="7d"
    )
    assert category.default_label == "2" and category.after_s == 7 * 86400
    assert timeout_spec().label.after_s is None  # fraud as shipped: no timeout


def test_a_timeout_longer_than_the_label_horizon_is_refused_at_start() -> None:
    spec = timeout_spec(default=False, after="8d")
    with pytest.raises(RiverflowError, match=r"label.after \(8d.*RIVERFLOW_LABEL_HORIZON_S"):
        EmbeddedRuntime(spec, Settings())
    assert label_timeout(spec.label, 9 * 86400) is not None


def test_defaulted_ids_are_the_event_or_the_shown_items_of_a_slate() -> None:
    assert defaulted_ids({"event_id": "e1", "probability": 0.2}) == ["e1"]
    slate = {
        "event_id": "r7",
        "slate": [
            {"item": "i3", "position": 0, "shown": True},
            {"item": "i1", "position": 1, "shown": True},
            {"item": "i9", "position": 2, "shown": False},
        ],
        "shown": 2,
    }
    assert defaulted_ids(slate) == ["r7/i3", "r7/i1"]
    assert defaulted_ids({"event_id": 5}) == defaulted_ids([1]) == defaulted_ids(None) == []


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def label(event_id: str, value: bool = True) -> bytes:
    return orjson.dumps({"event_id": event_id, "is_fraud": value})


def evaluations(rt: EmbeddedRuntime) -> list[Evaluation]:
    return [Evaluation.decode(v) for _, v in rt.messages(rt.topics.evaluations)]


def feed(rt: EmbeddedRuntime, clock: Clock, n: int, labelled_every: int) -> list[str]:
    """``n`` events, five each 0.5 s, every ``labelled_every``-th labelled 0.5 s after
    it was scored; returns the event ids labelled."""
    labelled: list[str] = []
    events = [e for e, _ in transactions(n, FraudStreamConfig(seed=7))]
    for start in range(0, n, 5):
        group = events[start : start + 5]
        for e in group:
            rt.produce(rt.topics.events, e["card_id"].encode(), orjson.dumps(e))
        rt.step()
        clock.now += 0.5
        for i, e in enumerate(group, start):
            if i % labelled_every == 0:
                labelled.append(e["event_id"])
                rt.produce(rt.topics.labels, e["event_id"].encode(), label(e["event_id"]))
    rt.drain()
    return labelled


def test_every_event_gets_one_label_the_unlabelled_by_timeout(fraud_spec: PipelineSpec) -> None:
    clock = Clock()
    spec = timeout_spec(default=False, after=f"{AFTER_S:g}s")
    rt = EmbeddedRuntime(spec, Settings(label_wait_s=0.0, snapshot_every_labels=50), clock=clock)
    labelled = feed(rt, clock, 300, labelled_every=3)
    events = [orjson.loads(v)["event_id"] for _, v in rt.messages(rt.topics.events)]
    # defaults only once `after` has passed since the prediction: the last 10 s are not
    early = evaluations(rt)
    scored_at = {orjson.loads(v)["event_id"]: orjson.loads(v)["scored_at"]
                 for _, v in rt.messages(rt.topics.predictions)}  # fmt: skip
    assert {e.event_id for e in early if e.defaulted} == {
        e for e in events if e not in labelled and scored_at[e] + AFTER_S <= clock.now
    }
    assert any(scored_at[e] + AFTER_S > clock.now for e in events if e not in labelled)

    clock.now += AFTER_S
    rt.drain()
    out = evaluations(rt)
    assert sorted(e.event_id for e in out) == sorted(events)  # each learned exactly once
    assert {e.event_id for e in out if e.defaulted} == set(events) - set(labelled)
    assert all(e.label is False and e.label_at is not None for e in out if e.defaulted)
    assert all(e.label_at.topic == rt.topics.predictions for e in out if e.defaulted)  # type: ignore[union-attr]
    assert {e.event_id for e in out if not e.defaulted and e.label is True} == set(labelled)
    assert b'"defaulted"' not in rt.messages(rt.topics.evaluations)[events.index(labelled[1])][1]
    status = rt.learner.status()
    assert status["labels_learned"] == len(events)
    assert status["labels_defaulted"] == len(events) - len(labelled)

    # real labels after their event's default: counted, never learned
    late = [e for e in events if e not in labelled][:20]
    for event_id in late:
        rt.produce(rt.topics.labels, event_id.encode(), label(event_id))
    rt.drain()
    assert len(evaluations(rt)) == len(events)
    status = rt.learner.status()
    assert (status["labels_after_default"], status["labels_duplicate"]) == (20, 0)
    assert status["labels_orphaned"] == 0 and status["labels_learned"] == len(events)


def test_a_label_claimed_first_wins_over_its_default(fraud_spec: PipelineSpec) -> None:
    """A label message waiting for its event is learned if claimed before the default;
    the default then finds its mark and learns nothing."""
    clock = Clock()
    spec = timeout_spec(default=False, after="1s")
    rt = EmbeddedRuntime(spec, Settings(label_wait_s=60.0), clock=clock)
    event, _ = next(transactions(1, FraudStreamConfig(seed=3)))
    rt.produce(rt.topics.labels, event["event_id"].encode(), label(event["event_id"]))
    rt.drain()  # the label waits: its event is not scored yet
    rt.produce(rt.topics.events, event["card_id"].encode(), orjson.dumps(event))
    rt.step()  # scored, then the waiting label claimed in the same step
    clock.now += 5
    rt.drain()
    [only] = evaluations(rt)
    assert (only.label, only.defaulted) == (True, False)
    assert rt.learner.status()["labels_defaulted"] == 0


def test_labels_in_the_backlog_are_read_before_their_predictions_default(
    fraud_spec: PipelineSpec,
) -> None:
    """A learner behind on the labels (here a backlog of many batches, as after a
    learner was down) reads them before it defaults their predictions: a label
    produced within ``after`` of its prediction is learned, never beaten by the
    default that fell due while it waited in the topic."""
    clock = Clock()
    spec = timeout_spec(default=False, after="1s")
    rt = EmbeddedRuntime(spec, Settings(label_wait_s=0.0, batch_size=50), clock=clock)
    events = [e for e, _ in transactions(600, FraudStreamConfig(seed=5))]
    for e in events:
        rt.produce(rt.topics.events, e["card_id"].encode(), orjson.dumps(e))
    while rt.log.count(rt.topics.predictions) < len(events):  # all scored, none labelled
        rt.step()
    clock.now += 0.5  # the labels come within `after` of their predictions...
    labelled = [e["event_id"] for e in events[::2]]
    for event_id in labelled:
        rt.produce(rt.topics.labels, event_id.encode(), label(event_id))
    clock.now += 60  # ... but the learner reads them only now, every timeout due
    rt.drain()
    out = evaluations(rt)
    assert sorted(e.event_id for e in out) == sorted(e["event_id"] for e in events)
    assert {e.event_id for e in out if not e.defaulted} == set(labelled)
    assert all(e.label is True for e in out if not e.defaulted)
    status = rt.learner.status()
    assert status["labels_defaulted"] == len(events) - len(labelled)
    assert status["labels_after_default"] == 0


def test_a_timeout_falls_due_only_once_the_labels_before_it_are_read() -> None:
    """``Timeouts.due``: a prediction whose ``after`` has passed is due only once the
    labels produced up to its timeout have been read (``labels_read``); nothing is
    due while that is not known."""
    clock, read = Clock(), [None]
    timeout = LabelTimeout(False, 10.0)
    log = EmbeddedLog()
    for i in range(3):  # served at 1,000, 1,001, 1,002
        log.append("p", None, orjson.dumps({"event_id": f"e{i}", "scored_at": 1_000.0 + i}))
    timeouts = Timeouts(timeout, LogTimers(log, "p", 100), lambda: {0: 3}, clock=clock,
                        labels_read=lambda: read[0])  # fmt: skip
    clock.now = 1_050.0  # every timeout has passed...
    assert timeouts.due() == []  # ... but how far the labels were read is not known
    read[0] = 1_009.0
    assert timeouts.due() == []
    read[0] = 1_011.5  # the labels up to e0's and e1's timeouts are read
    assert [d.ids for d in timeouts.due()] == [["e0"], ["e1"]]
    read[0] = 2_000.0  # read past now: now decides
    clock.now = 1_011.5
    assert [d.ids for d in timeouts.due()] == [["e0"], ["e1"]]


def test_a_learner_killed_after_its_checkpoint_learns_each_default_once(
    fraud_spec: PipelineSpec,
) -> None:
    """Defaults learned after the last checkpoint by a learner that dies are learned
    again by its successor, once; those before it are not, and a real label for them
    is counted as after the default."""
    clock = Clock()
    spec = timeout_spec(default=False, after="2s")
    settings = Settings(label_wait_s=0.0, snapshot_every_labels=37, batch_size=25)
    rt = EmbeddedRuntime(spec, settings, clock=clock)
    feed(rt, clock, 200, labelled_every=4)  # 20 s of events: the last 2 s not defaulted yet
    events = [orjson.loads(v)["event_id"] for _, v in rt.messages(rt.topics.events)]
    killed = rt.learner
    saved = rt.registry.checkpoint()
    assert saved is not None and saved.timeouts[0] > 0
    assert saved.labels_seen < killed.learned < len(events)  # learned past its checkpoint
    assert killed.defaulted > 40

    # the kill: a new learner from the checkpoint over the same store and index
    rt.timeouts = Timeouts(
        rt.timeouts.timeout, LogTimers(rt.log, rt.topics.predictions, 250),  # type: ignore[union-attr]
        lambda: {0: rt.indexed}, clock=clock, limit=250,
    )  # fmt: skip
    rt.learner = build_learner(spec, settings, rt.store, rt.registry, rt.scored,
                               registry_poll_s=0, clock=clock, timeouts=rt.timeouts)  # fmt: skip
    rt.guards["learner"] = guarded(rt.learner, rt.topics)
    assert rt.learner.learned == saved.labels_seen
    clock.now += 5
    rt.drain()
    assert rt.learner.learned == len(events)  # every event in the models exactly once
    out = evaluations(rt)
    assert {e.event_id for e in out} == set(events)  # evaluations: at least once

    # a real label for an event defaulted before the checkpoint: counted, not learned
    defaulted_before = next(e.event_id for e in out if e.defaulted and e.labels_seen <= 37)
    rt.produce(rt.topics.labels, defaulted_before.encode(), label(defaulted_before))
    rt.drain()
    assert rt.learner.learned == len(events)
    assert rt.learner.status()["labels_after_default"] == 1


def test_a_prediction_given_again_after_its_label_is_not_defaulted(
    fraud_spec: PipelineSpec,
) -> None:
    """A scorer's replay writes an event's prediction again after its label was learned
    and checkpointed (the index forgot the event, then took it in again): neither
    prediction's timeout labels it a second time, even once its mark is gone."""
    clock = Clock()
    spec = timeout_spec(default=False, after="2s")
    settings = Settings(label_wait_s=0.0, snapshot_every_labels=1, learned_keep_s=0)
    rt = EmbeddedRuntime(spec, settings, clock=clock)
    (x, _), (y, _) = transactions(2, FraudStreamConfig(seed=5))
    rt.produce(rt.topics.events, x["card_id"].encode(), orjson.dumps(x))
    rt.step()
    rt.produce(rt.topics.labels, x["event_id"].encode(), label(x["event_id"]))
    rt.step()  # learned, checkpointed: the index forgets x, its mark is released
    assert x["event_id"] not in rt.scored.records
    clock.now += 1
    [(key, first)] = rt.messages(rt.topics.predictions)
    again = {**orjson.loads(first), "replayed": True, "scored_at": clock.now}
    rt.produce(rt.topics.predictions, key, orjson.dumps(again))
    rt.step()
    assert x["event_id"] in rt.scored.records  # taken in again
    clock.now += 1.5  # the first prediction's timeout falls due, not the replay's
    rt.drain()
    rt.produce(rt.topics.events, y["card_id"].encode(), orjson.dumps(y))
    rt.step()
    rt.produce(rt.topics.labels, y["event_id"].encode(), label(y["event_id"]))
    clock.now += 0.4  # the replay's timeout is not due yet (at 1003)
    rt.step()  # another label's commit: x's released mark is gone now
    assert x["event_id"] not in rt.store.learned
    clock.now += 5
    rt.drain()  # the replay's timeout, then y's
    assert [e.event_id for e in evaluations(rt)] == [x["event_id"], y["event_id"]]
    assert rt.learner.learned == 2 and rt.learner.defaulted == 0


class OneTopic:
    """A timer queue over a list of records of one partition (``TimerQueue``)."""

    def __init__(self, records: list[Message]) -> None:
        self.records = records

    def start(self, positions: Mapping[int, int]) -> dict[int, int]:
        return {0: positions.get(0, 0)}

    def fetch(self, positions: Mapping[int, int]) -> Mapping[int, Sequence[Message]]:
        return {0: self.records[positions[0] :]}

    def close(self) -> None:
        pass


def slate_learner(
    clock: Clock, backends: tuple[Any, Any, MemoryScoredEvents] | None = None, **label: Any
) -> tuple[Learner, Timeouts, FeatureStore]:
    """A learner whose index holds a request r7 of four items, i3 i1 i9 i4 in that
    order, the first three shown; its one prediction, served at ``clock.now``.
    ``backends``: the store, registry and index of a learner this one restarts from
    (the prediction then served at 1,000); ``label``: more of the spec's label."""
    spec = timeout_spec(default=False, after="30m", **label)
    settings = Settings(label_wait_s=0.0)
    if backends is None:
        store, registry = memory_backends(spec, settings, clock)
        scored = MemoryScoredEvents()
    else:
        store, registry, scored = backends
    inputs = {"amount": 12.0, "category": "food", "country": "FR", "channel": "web"}
    features = {"tx_count_1h": 1.0, "amount_sum_1h": 12.0, "amount_mean_24h": 12.0,
                "tx_in_session": 1.0, "amount_in_session": 12.0}  # fmt: skip
    items = ["i3", "i1", "i9", "i4"]
    for item in items if backends is None else ():  # a record per (request, item) pair
        scored.records[f"r7/{item}"] = msgpack.packb([inputs, features, "fraud-hoeffding", 1, 0.2])
    slate = {"event_id": "r7", "entity": "u1", "probability": None, "model": "m", "version": 1,
             "features": {}, "event_time": 0.0, "replayed": False,
             "scored_at": clock.now if backends is None else 1_000.0,
             "inputs": {}, "shown": 3,
             "slate": [{"item": item, "position": i, "score": 0.5, "shown": i < 3,
                        "propensity": 1.0, "inputs": inputs, "features": features}
                       for i, item in enumerate(items)]}  # fmt: skip
    record = Message(spec.topics.predictions, 0, 0, b"r7", orjson.dumps(slate))
    timeout = label_timeout(spec.label, settings.label_horizon_s)
    assert timeout is not None
    timeouts = Timeouts(timeout, OneTopic([record]), lambda: {0: 1}, clock=clock)
    learner = build_learner(spec, settings, store, registry, scored, registry_poll_s=0,
                            clock=clock, timeouts=timeouts)  # fmt: skip
    return learner, timeouts, store


def test_a_slate_defaults_each_shown_item_not_clicked_once() -> None:
    """The slate contract, with records built by hand: a slate prediction defaults the
    pair id of each item shown, except a pair labelled first; never an item not shown."""
    clock = Clock()
    learner, timeouts, store = slate_learner(clock)
    # i1 was clicked and its label claimed first
    assert store.claim_labels(["r7/i1"], ["other:0:5"], [True], lambda t: False) == [Claim.CLAIMED]
    assert learner.process([]) == []  # not due before 30 minutes
    clock.now += 1800
    out = [Evaluation.decode(o.value) for o in learner.process([]) if o.topic.endswith("ations")]
    assert [(e.event_id, e.label, e.defaulted) for e in out] == [
        ("r7/i3", False, True),
        ("r7/i9", False, True),
    ]
    assert timeouts.positions == {0: 1} and learner.process([]) == []


def test_the_checkpoint_keeps_where_the_timeouts_are_and_reads_one_without() -> None:
    key = signing_key(Settings())
    saved = LearnerCheckpoint({"m": 3}, {"m": {}}, 10, {0: 7}, [], timeouts={0: 40, 2: 5})
    assert LearnerCheckpoint.decode(saved.encode(key), key).timeouts == {0: 40, 2: 5}
    older = LearnerCheckpoint({"m": 3}, {"m": {}}, 10, {0: 7}, [])
    assert b"timeouts" not in older.encode(key)
    assert LearnerCheckpoint.decode(older.encode(key), key).timeouts == {}


def test_a_slate_half_learned_when_the_call_raised_is_finished_once() -> None:
    """A call that raises (Redis away) after learning some items of a slate: the next
    call learns the others, and none again."""
    clock = Clock()
    learner, _, _ = slate_learner(clock)
    learn, calls = learner._learn, []

    def failing_once(*args: Any, **kwargs: Any) -> list[Output]:
        calls.append(args[0].event_id)
        if len(calls) == 2:
            raise FeatureStoreError("Redis unreachable")
        return learn(*args, **kwargs)

    learner._learn = failing_once  # type: ignore[method-assign]
    clock.now += 1800
    with pytest.raises(FeatureStoreError):
        learner.process([])
    out = [Evaluation.decode(o.value) for o in learner.process([]) if o.topic.endswith("ations")]
    assert [e.event_id for e in out] == ["r7/i3", "r7/i1", "r7/i9"]
    assert learner.defaulted == learner.learned == 3
