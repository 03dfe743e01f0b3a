"""The audit log made whole (``riverflow.stages.audit``): a version stored or a pointer
move whose maker was killed before it wrote the model-event is written by the monitor,
once, after the grace; one that was logged, by whoever made it, is never written again."""

from __future__ import annotations

import threading
from collections.abc import Iterable

import pytest

from riverflow.models.registry import ChampionPointer, MemoryRegistry, PointerMove
from riverflow.stages.audit import AuditReconciler
from riverflow.streams.contracts import UNSET, ModelEvent
from riverflow.streams.kafka_io import KafkaIOError

KEY = b"k" * 32


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Topic:
    """``{ns}.model-events`` as the reconciler reads it: what was written, and what each
    read asked for (``down``: the next read raises, as Kafka away)."""

    def __init__(self) -> None:
        self.events: list[ModelEvent] = []
        self.reads: list[float] = []
        self.down = False

    def __call__(self, since_s: float) -> Iterable[ModelEvent]:
        self.reads.append(since_s)
        if self.down:
            self.down = False
            raise KafkaIOError("reading model-events: broker down")
        return [ModelEvent.decode(e.encode()) for e in self.events]  # as read from Kafka


def look(audit: AuditReconciler) -> list[ModelEvent]:
    """What a look started now finds (``run`` hands out what the last one found)."""
    assert audit.run() == []  # (nothing found before is left unhanded)
    audit.join(10)
    return audit.run()


def moves(
    registry: MemoryRegistry, clock: Clock, topic: Topic, logged: list[bool]
) -> list[PointerMove]:
    """One version published and advanced to per entry of ``logged``, a second apart;
    their model-events written to ``topic`` if so (else the learner was killed between
    the registry and Kafka)."""
    out: list[PointerMove] = []
    previous = registry.champion()
    for write in logged:
        clock.now += 1.0
        meta = {"parent": previous.version if previous else 0, "labels_seen": 100 * len(out)}
        to = ChampionPointer("tree", registry.publish("tree", {"w": len(out)}, meta))
        move = registry.move(to, "advance", previous)
        assert move is not None
        if write:
            published = ModelEvent(kind="published", model="tree", version=to.version, **meta)
            topic.events += [published, move.as_event()]
        out.append(move)
        previous = to
    return out


def test_a_move_never_logged_is_written_once_after_the_grace() -> None:
    clock, topic = Clock(10_000.0), Topic()
    registry = MemoryRegistry(KEY, clock=clock)
    audit = AuditReconciler(registry, topic, grace_s=300, every_s=60, clock=clock)
    first, lost, last = moves(registry, clock, topic, [True, False, True])

    clock.now += 100  # younger than the grace: its mover may be writing it still
    assert look(audit) == []
    assert topic.reads == []  # and the topic is not read for nothing
    clock.now += 300
    written = look(audit)
    assert [(e.kind, e.model, e.version, e.at, e.previous) for e in written] == [
        ("published", "tree", lost.to.version, None, UNSET),  # (a version before its moves)
        ("advance", "tree", lost.to.version, lost.at, {"model": "tree", "version": 1}),
    ]
    assert (written[0].parent, written[0].labels_seen) == (1, 100)  # from its metadata
    assert written[1].evidence == {"recovered": True, "late_s": pytest.approx(401.0)}
    assert topic.reads[-1] >= clock.now - first.at  # the read reached back to the oldest move

    clock.now += 60  # not written again, though the topic still lacks it
    assert look(audit) == []
    assert audit.recovered == 2 and last.at < clock.now


def test_a_model_searchs_configurations_are_not_logged_and_not_looked_for() -> None:
    clock, topic = Clock(10_000.0), Topic()
    registry = MemoryRegistry(KEY, clock=clock)
    registry.publish("tree~search-1", {"w": 0}, {"parent": 0, "search": "tree"})
    audit = AuditReconciler(registry, topic, grace_s=30, every_s=10, clock=clock)
    clock.now += 60
    assert look(audit) == [] and topic.reads == []


def test_a_read_of_the_log_that_fails_is_tried_again_and_loses_no_move() -> None:
    clock, topic = Clock(10_000.0), Topic()
    registry = MemoryRegistry(KEY, clock=clock)
    audit = AuditReconciler(registry, topic, grace_s=30, every_s=10, clock=clock)
    (lost,) = moves(registry, clock, topic, [False])
    clock.now += 60
    topic.down = True
    assert look(audit) == []  # Kafka away: nothing known, nothing written
    clock.now += 5
    assert look(audit) == []  # not due yet
    clock.now += 5
    assert [(e.kind, e.version) for e in look(audit)] == [
        ("published", lost.to.version),
        ("advance", lost.to.version),
    ]


def test_a_monitor_decision_is_known_by_the_moves_time() -> None:
    """The monitor logs a promotion as its decision (with its evidence), not as the move:
    the decision carries the move's time, so the reconciler does not write it twice."""
    from riverflow.monitors.policy import PipelineMonitor
    from riverflow.spec import load_spec

    spec = load_spec("fraud")
    clock, topic = Clock(10_000.0), Topic()
    registry = MemoryRegistry(KEY, clock=clock)
    moves(registry, clock, topic, [True])
    later = Clock(20_000.0)  # the monitor's own clock reads later than the registry's
    core = PipelineMonitor(spec.name, spec.monitors, registry, "tree", clock=later)
    core.refresh()
    other = ChampionPointer("other", registry.publish("other", {"w": 1}, {}))
    topic.events.append(ModelEvent(kind="published", model="other", version=other.version))
    clock.now += 5
    decision = core._promote(other.model, other.version, "better", {})
    topic.events.append(decision.as_event())
    move = registry.history()[-1]
    assert (move.kind, move.to, decision.at) == ("promote", other, move.at)

    audit = AuditReconciler(registry, topic, grace_s=1, every_s=1, clock=clock)
    clock.now += 10
    assert look(audit) == []


def test_a_move_stamped_by_a_clock_behind_is_still_looked_for() -> None:
    """Movers on other machines stamp moves with their own clocks: a move that comes
    into the history after one already looked for may carry an older time."""
    clock, topic = Clock(10_000.0), Topic()
    registry = MemoryRegistry(KEY, clock=clock)
    audit = AuditReconciler(registry, topic, grace_s=30, every_s=10, clock=clock)
    (logged,) = moves(registry, clock, topic, [True])
    clock.now += 60
    assert look(audit) == []  # looked for, and found
    clock.now -= 70  # the next mover's clock is 70 s behind
    (lost,) = moves(registry, clock, topic, [False])
    clock.now += 100
    assert lost.at < logged.at  # made after it, stamped before it
    assert [(e.kind, e.at) for e in look(audit)] == [("published", None), ("advance", lost.at)]


def test_a_look_that_hangs_holds_up_no_batch_of_the_monitor() -> None:
    """Reading the topic with Kafka away waits out its timeouts: the look runs beside
    the monitor's batches, which go on."""
    clock, release = Clock(10_000.0), threading.Event()
    registry = MemoryRegistry(KEY, clock=clock)
    topic = Topic()
    moves(registry, clock, topic, [False])

    def hanging(since_s: float) -> list[ModelEvent]:
        release.wait(10)
        return topic(since_s)

    audit = AuditReconciler(registry, hanging, grace_s=30, every_s=10, clock=clock)
    clock.now += 60
    assert audit.run() == [] and audit.looking()  # returned while the look hangs
    clock.now += 20
    assert audit.run() == [] and audit.looking()  # due again: one look at a time
    release.set()
    audit.join(10)
    assert [e.kind for e in audit.run()] == ["published", "advance"]
