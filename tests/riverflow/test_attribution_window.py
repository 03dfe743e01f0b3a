"""Labels learned at their timeout (``label: {default, after, learn: at_timeout}``): a
label message is held until its prediction's timeout falls due, then every id the
prediction labels is learned together, in its order, each once, with its label
message's value or the default; a learner killed while labels are held loses none."""

from __future__ import annotations

import io
from dataclasses import replace

import orjson
import pytest
from rich.console import Console

from riverflow.assembly import build_learner
from riverflow.embedded import EmbeddedRuntime, LogTimers
from riverflow.settings import Settings
from riverflow.spec import SpecError, load_spec
from riverflow.stages.common import guarded
from riverflow.stages.learner import Learner
from riverflow.stages.timeouts import Timeouts
from riverflow.streams.contracts import Evaluation, Message, Output
from riverflow.tools.demo_recsys import recsys_summary, run_recsys_demo
from tests.riverflow.test_label_timeouts import (
    Clock,
    evaluations,
    feed,
    slate_learner,
    timeout_spec,
)

AT_TIMEOUT = {"default": False, "after": "2s", "learn": "at_timeout"}


def test_learning_at_the_timeout_needs_a_timeout() -> None:
    with pytest.raises(SpecError, match="learn: at_timeout holds a label message until"):
        timeout_spec(learn="at_timeout")
    assert timeout_spec(default=False, after="1h").label.learn == "at_once"


def click(offset: int, pair: str = "r7/i1") -> Message:
    value = orjson.dumps({"event_id": pair, "is_fraud": True})
    return Message("fraud.labels", 0, offset, pair.encode(), value)


def learned(out: list[Output]) -> list[tuple[str, object, bool]]:
    records = [Evaluation.decode(o.value) for o in out if o.topic.endswith("evaluations")]
    return [(e.event_id, e.label, e.defaulted) for e in records]


SERVED = [("r7/i3", False, True), ("r7/i1", True, False), ("r7/i9", False, True)]
"""r7's shown items in position order once its timeout fell due, i1 clicked."""


def test_a_click_is_held_and_learned_with_its_slate_in_position_order() -> None:
    clock = Clock()
    learner, _, _ = slate_learner(clock, learn="at_timeout")
    assert learned(learner.process([click(0)])) == []  # held: not learned on arrival
    assert learner.status()["labels_held"] == 1
    assert learned(learner.process([click(1)])) == []  # a second click: a duplicate
    clock.now += 1800
    assert learned(learner.process([])) == SERVED
    assert (learner.learned, learner.defaulted, learner.status()["labels_held"]) == (3, 2, 0)
    assert learned(learner.process([click(2)])) == []  # after its timeout: not learned again
    assert learner.learned == 3 and learner.duplicates == 2


def test_a_held_click_whose_event_left_the_index_is_an_orphan() -> None:
    clock = Clock()
    learner, _, _ = slate_learner(clock, learn="at_timeout")
    learner.process([click(0)])
    learner.scored.forget(["r7/i1"])
    clock.now += 1800
    out = learner.process([])
    assert learned(out) == [SERVED[0], SERVED[2]]
    [dead] = [orjson.loads(o.value) for o in out if o.topic.endswith("dlq")]
    assert "no scored event 'r7/i1': its event left the index" in str(dead)
    assert learner.status()["labels_held"] == 0 and learner.orphans == 1


def test_held_clicks_are_bounded_the_oldest_learned_before_its_timeout() -> None:
    clock = Clock()
    learner, _, _ = slate_learner(clock, learn="at_timeout")
    learner.timing = replace(learner.timing, max_waiting=1)
    assert learned(learner.process([click(0, "r7/i1")])) == []
    # held clicks never pause reading: a click read after its timeout would be lost
    assert learner.accepting()
    # past twice max_waiting, the oldest held is learned at once
    early = learner.process([click(1, "r7/i3"), click(2, "r7/i9")])
    assert learned(early) == [("r7/i1", True, False)]
    assert learner.status()["labels_held"] == 2
    clock.now += 1800  # the timeout: the other two, in position order, nothing twice
    assert learned(learner.process([])) == [("r7/i3", True, False), ("r7/i9", True, False)]
    assert (learner.learned, learner.defaulted, learner.duplicates) == (3, 0, 0)


def restart(clock: Clock, killed: Learner) -> Learner:
    """A learner started from ``killed``'s last committed checkpoint, over its store,
    registry and index (``killed`` is simply dropped: kill -9)."""
    backends = (killed.store, killed.lineage.registry, killed.scored)
    learner, _, _ = slate_learner(clock, backends, learn="at_timeout")
    return learner


def test_a_click_held_in_a_checkpoint_is_learned_after_a_restart() -> None:
    """Killed between the click's arrival and its timeout: the click was in the
    checkpoint's waiting labels, and the restarted learner learns it, once."""
    clock = Clock()
    killed, _, _ = slate_learner(clock, learn="at_timeout")
    killed.process([click(0)])
    killed.publish()
    killed.commit()
    saved = killed.lineage.registry.checkpoint()
    assert saved is not None and [m.offset for m, _ in saved.pending] == [0]
    assert saved.positions == {0: 1}  # the click is read: only the checkpoint holds it
    clock.now += 1800
    learner = restart(clock, killed)
    assert learned(learner.process([])) == SERVED
    assert learner.learned == 3


def test_a_click_learned_past_the_checkpoint_is_learned_once_after_a_restart() -> None:
    """Killed after its slate was learned at the timeout, before the next checkpoint:
    the restarted models lack it, and learn the whole slate once, the click as a click."""
    clock = Clock()
    killed, _, _ = slate_learner(clock, learn="at_timeout")
    killed.process([click(0)])
    killed.publish()
    killed.commit()
    clock.now += 1800
    assert learned(killed.process([])) == SERVED
    learner = restart(clock, killed)
    assert learner.learned == 0
    assert learned(learner.process([])) == SERVED
    assert learner.learned == 3 and learner.process([]) == []


def test_a_click_read_after_the_checkpoint_is_read_again_after_a_restart() -> None:
    """Killed after the click was read and claimed, with no checkpoint since: the
    restarted learner reads it again, takes its claim over and holds it."""
    clock = Clock()
    killed, _, _ = slate_learner(clock, learn="at_timeout")
    killed.process([])
    killed.publish()
    killed.commit()
    killed.process([click(0)])
    learner = restart(clock, killed)
    assert learned(learner.process([click(0)])) == []
    clock.now += 1800
    assert learned(learner.process([])) == SERVED


def test_every_event_is_learned_once_in_prediction_order_across_a_kill() -> None:
    """The embedded runtime, a third of the events labelled 0.5 s after their
    prediction, learned 2 s after it: nothing is learned before its timeout; the
    learner killed past its checkpoint, with labels held in it, restarts; every event
    ends in the models once, the labelled ones as labelled."""
    clock = Clock()
    spec = timeout_spec(**AT_TIMEOUT)
    settings = Settings(label_wait_s=0.0, snapshot_every_labels=41, batch_size=25)
    rt = EmbeddedRuntime(spec, settings, clock=clock)
    labelled = feed(rt, clock, 200, labelled_every=3)
    events = [orjson.loads(v)["event_id"] for _, v in rt.messages(rt.topics.events)]
    scored_at = {orjson.loads(v)["event_id"]: orjson.loads(v)["scored_at"]
                 for _, v in rt.messages(rt.topics.predictions)}  # fmt: skip
    early = evaluations(rt)
    due = [e for e in events if scored_at[e] + 2 <= clock.now]
    assert [e.event_id for e in early] == due  # in prediction order, labels among them
    assert {e.event_id for e in early if e.label is True} == set(labelled) & set(due)
    killed = rt.learner
    assert killed.status()["labels_held"] > 0
    saved = rt.registry.checkpoint()
    assert saved is not None and saved.pending  # labels held when it was taken
    assert saved.labels_seen < killed.learned < len(events)

    rt.timeouts = Timeouts(
        rt.timeouts.timeout, LogTimers(rt.log, rt.topics.predictions, 250),  # type: ignore[union-attr]
        lambda: {0: rt.indexed}, clock=clock, limit=250,
    )  # fmt: skip
    rt.learner = build_learner(spec, settings, rt.store, rt.registry, rt.scored,
                               registry_poll_s=0, clock=clock, timeouts=rt.timeouts)  # fmt: skip
    rt.guards["learner"] = guarded(rt.learner, rt.topics)
    rt.offsets[rt.topics.labels] = 0  # the labels topic read again from the start
    clock.now += 5
    rt.drain()
    assert rt.learner.learned == len(events)  # every event in the models exactly once
    assert rt.learner.status()["labels_held"] == 0
    last = {e.event_id: e for e in evaluations(rt)}  # evaluations: at least once
    assert set(last) == set(events)
    assert {e for e, v in last.items() if v.label is True and not v.defaulted} == set(labelled)
    assert all(v.label is False and v.defaulted for e, v in last.items() if e not in labelled)


def test_the_learned_ranker_beats_popularity_on_ndcg() -> None:
    """The recommendation example on its simulated users (seeded, embedded runtime):
    once it has learned, the served rankings' NDCG@10 beats a popularity ranking of
    the same requests, and the learner's prequential ROC AUC is no leak of the order
    labels come in (clicks at once, negatives 10 minutes later, it read ~0.97)."""
    spec = load_spec("examples/recsys.yaml")
    result = run_recsys_demo(spec, Settings(), requests=4000, seed=7,
                             console=Console(file=io.StringIO()), window=250)  # fmt: skip
    last_quarter = (3 * result.shift_at // 2, 2 * result.shift_at)
    served = result.mean("ndcg", *last_quarter)
    assert served > result.mean("popularity_ndcg", *last_quarter) + 0.02
    assert all(0.5 < auc < 0.75 for auc in result.candidates.values())


def test_a_short_demo_still_has_a_figure_for_every_span_of_its_summary() -> None:
    """``riverflow demo --example recsys --events 3000`` used the CLI's windows of 1,000
    requests: none started just after the shift (at 1,500) nor in the last quarter, and
    the summary said "nan" for both. Windows are now no longer than the shortest span."""
    spec = load_spec("examples/recsys.yaml")
    result = run_recsys_demo(spec, Settings(), requests=600, seed=7,
                             console=Console(file=io.StringIO()), window=1_000)  # fmt: skip
    summary = io.StringIO()
    Console(file=summary, width=200).print(recsys_summary(result))
    assert "nan" not in summary.getvalue()
    shift = result.shift_at
    for start, end in (
        (shift // 2, shift),
        (shift, shift + shift // 4),
        (3 * shift // 2, 2 * shift),
    ):
        assert 0.0 < result.mean("ndcg", start, end) <= 1.0


def test_a_demo_of_a_handful_of_requests_says_its_spans_are_too_short() -> None:
    spec = load_spec("examples/recsys.yaml")
    result = run_recsys_demo(
        spec, Settings(), requests=7, seed=7, console=Console(file=io.StringIO())
    )
    summary = io.StringIO()
    Console(file=summary, width=200).print(recsys_summary(result))
    assert "nan" not in summary.getvalue()
    assert "no requests in it (too few for the summary)" in summary.getvalue()
