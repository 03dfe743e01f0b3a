"""How often the learner publishes versions: every ``snapshot_every_labels`` labels, at
most once every ``snapshot_min_interval_s`` seconds whatever the label rate, and further
apart when publishing a grown model takes longer than a small share of that."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import orjson

from riverflow.assembly import build_learner
from riverflow.embedded import EmbeddedRuntime
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.stages.learner import PUBLISH_SHARE, Learner
from riverflow.streams.contracts import Message, ModelEvent, Output
from riverflow.tools.generator import FraudStreamConfig, with_labels

SCORING = Settings(snapshot_every_labels=0, snapshot_every_s=0, label_wait_s=0)


def scored_runtime(spec: PipelineSpec, n: int) -> tuple[EmbeddedRuntime, list[Message]]:
    """A runtime that scored ``n`` events (its own learner reads no label), and their
    labels as the learner's consumer would hand them over."""
    rt = EmbeddedRuntime(spec, SCORING)
    labels = []
    for kind, rec in with_labels(n, FraudStreamConfig(seed=3)):
        if kind == "event":
            rt.produce(rt.topics.events, None, orjson.dumps(rec))
        else:
            value = orjson.dumps(rec)
            labels.append(Message(rt.topics.labels, 0, len(labels), None, value, None))
    rt.drain()
    return rt, labels


FLOORED = Settings(snapshot_every_labels=100, snapshot_every_s=0, label_wait_s=0,
                   snapshot_min_interval_s=1.0)  # fmt: skip


def floored_learner(spec: PipelineSpec, rt: EmbeddedRuntime) -> tuple[Learner, list[float]]:
    """A learner of ``rt``'s scored events: a version every 100 labels, at most one a
    second, by a clock the test sets (``clock[0]``, starting at 0)."""
    clock = [0.0]
    learner = build_learner(spec, FLOORED, rt.store, rt.registry, rt.scored,
                            clock=lambda: clock[0])  # fmt: skip
    return learner, clock


def published(outputs: list[Output], model: str) -> list[ModelEvent]:
    events = [ModelEvent.decode(o.value) for o in outputs if o.value.startswith(b'{"kind"')]
    return [e for e in events if e.kind == "published" and e.model == model]


def test_versions_come_every_n_labels_but_at_most_once_per_interval(
    unmonitored_spec: PipelineSpec,
) -> None:
    rt, labels = scored_runtime(unmonitored_spec, 2000)
    lead = unmonitored_spec.models.champion_spec.name
    learner, clock = floored_learner(unmonitored_spec, rt)

    # 500 labels within one second of the start: 5 x snapshot_every_labels, no version
    clock[0] = 0.5
    assert published(learner.process(labels[:500]), lead) == []
    # the floor passes with no label coming: the next tick publishes what was learned
    clock[0] = 1.0
    [first] = published(learner.process([]), lead)
    assert first.version == 1 and first.labels_seen == 500
    # a burst after it: one version, at the first label once the floor passed again
    clock[0] = 1.5
    assert published(learner.process(labels[500:900]), lead) == []
    clock[0] = 2.0
    [second] = published(learner.process(labels[900:1000]), lead)
    assert second.version == 2 and second.labels_seen == 901
    # the 100th label since comes long after the floor: a version at once
    clock[0] = 10.0
    [third] = published(learner.process(labels[1000:1050]), lead)
    assert third.version == 3 and third.labels_seen == 1001
    # fewer labels than snapshot_every_labels since: nothing, however long it waits
    clock[0] = 20.0
    assert published(learner.process(labels[1050:1100]), lead) == []
    assert published(learner.process([]), lead) == []

    # no floor: a version every 100 labels, as many as the labels make
    rt, labels = scored_runtime(unmonitored_spec, 2000)
    unfloored = FLOORED.model_copy(update={"snapshot_min_interval_s": 0.0})
    learner = build_learner(unmonitored_spec, unfloored, rt.store, rt.registry, rt.scored,
                            clock=lambda: 0.0)  # fmt: skip
    versions = published(learner.process(labels[:500]), lead)
    assert [(v.version, v.labels_seen) for v in versions] == [(k, 100 * k) for k in range(1, 6)]


def test_a_slow_publish_spaces_versions_out_so_it_takes_a_bounded_share_of_the_time(
    unmonitored_spec: PipelineSpec,
) -> None:
    rt, labels = scored_runtime(unmonitored_spec, 2000)
    lead = unmonitored_spec.models.champion_spec.name
    learner, clock = floored_learner(unmonitored_spec, rt)
    publish = learner.lineage.publish
    clock[0] = 2.0

    def slow(*args: Any) -> None:  # a model grown large: 20 ms of CPU to pickle and sign
        spin = time.thread_time() + 0.02
        while time.thread_time() < spin:
            pass
        publish(*args)

    learner.lineage.publish = slow  # type: ignore[method-assign]
    assert learner.version_floor_s == 1.0
    [first] = published(learner.process(labels[:200]), lead)
    # the next version once publishing is PUBLISH_SHARE of the time since (over 4 s
    # for 20 ms), though the floor is 1 s
    floor = learner.version_floor_s
    assert first.labels_seen == 100 and 0.02 / PUBLISH_SHARE <= floor < 0.2 / PUBLISH_SHARE
    clock[0] = 2.0 + floor - 0.1
    assert published(learner.process(labels[200:600]), lead) == []
    clock[0] = 2.0 + floor + 0.1
    [second] = published(learner.process(labels[600:700]), lead)
    assert second.labels_seen == 601

    # the timed version (snapshot_every_s, 1 s here) waits for that floor too: once
    # every second it would cost a grown model's every scorer a load each second
    learner.timing = replace(learner.timing, snapshot_every_s=1.0)
    last, floor = clock[0], learner.version_floor_s
    learner.process(labels[700:750])  # fewer than snapshot_every_labels since
    clock[0] = last + floor - 0.1
    assert published(learner.process([]), lead) == []
    clock[0] = last + floor + 0.1
    [timed] = published(learner.process([]), lead)
    assert timed.labels_seen == 750


def test_a_publish_that_waits_on_a_slow_store_does_not_raise_the_floor(
    unmonitored_spec: PipelineSpec,
) -> None:
    """What raises the floor is the CPU a publish takes, not its wall time: a Redis
    failing over, answering after seconds, must not hold versions back for minutes."""
    rt, labels = scored_runtime(unmonitored_spec, 1000)
    learner, clock = floored_learner(unmonitored_spec, rt)
    publish = learner.lineage.publish

    def waiting(*args: Any) -> None:
        time.sleep(0.05)  # 50 ms of wall time: a 10 s floor, if it counted
        publish(*args)

    learner.lineage.publish = waiting  # type: ignore[method-assign]
    clock[0] = 2.0
    learner.process(labels[:200])
    assert learner.version_floor_s == 1.0
