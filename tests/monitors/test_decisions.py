"""The monitor's rollbacks are shadow-scored, model changes are no drift, and a drift
event names the label that tripped it."""

from __future__ import annotations

import random
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from riverflow.models.registry import ChampionPointer, MemoryRegistry
from riverflow.monitors.policy import Decision, LabelSource, PipelineMonitor
from riverflow.monitors.spec import MonitorSpec
from riverflow.streams.contracts import Evaluation, LabelPosition, ModelEvent
from tests.monitors.registries import LosesAReply

KEY = b"k" * 32


class Sign:
    """Predicts ``v > 0`` (or ``v < 0``), 90% sure: a model the registry can sign."""

    def __init__(self, positive: bool) -> None:
        self.positive = positive

    def predict_proba_one(self, x: dict[str, Any]) -> dict[bool, float]:
        yes = (x["v"] > 0) == self.positive
        return {True: 0.9 if yes else 0.1, False: 0.1 if yes else 0.9}


def monitor_with_versions(
    spec: MonitorSpec, registry: MemoryRegistry | None = None
) -> tuple[PipelineMonitor, MemoryRegistry]:
    registry = registry or MemoryRegistry(KEY)
    for _ in range(3):
        registry.publish("m", Sign(positive=True), {"parent": None, "metrics": {"labels": 1000}})
    advance(registry, 1)
    monitor = PipelineMonitor("p", spec, registry, "m")
    monitor.refresh()
    return monitor, registry


def feed(
    monitor: PipelineMonitor,
    rng: random.Random,
    n: int,
    served_right: float,
    concept: bool = True,
    bad: int | None = None,
) -> list[Decision]:
    """``n`` labels of ``v > 0`` (or ``v < 0`` when ``concept`` is False); the live
    champion is right on ``served_right`` of them (on 95% but when it continues
    version ``bad``, if given)."""
    out: list[Decision] = []
    for _ in range(n):
        v = rng.uniform(-1, 1)
        label = (v > 0) == concept
        served = monitor.champion
        good = bad is not None and served is not None and served.version != bad
        right = rng.random() < (0.95 if good else served_right)
        probability = 0.9 if right == label else 0.1
        version = monitor.champion.version if monitor.champion else 0
        out += monitor.on_evaluation(label, {"m": (version, probability)}, inputs={"v": v},
                                     seen=monitor.labels + 1)  # fmt: skip
        monitor.raise_owed()  # (as the stage does: a check Redis being down stopped)
    return out


def advance(registry: MemoryRegistry, version: int) -> None:
    """The learner's move of the pointer to its newest version."""
    assert registry.move(ChampionPointer("m", version), "advance", registry.champion(), "")


def good_then_a_third_version(
    monitor: PipelineMonitor, registry: MemoryRegistry, rng: random.Random
) -> None:
    """Versions 1 and 2 served on labels they get right, then version 3 served."""
    feed(monitor, rng, 1_200, served_right=0.95)
    advance(registry, 2)
    monitor.refresh()
    feed(monitor, rng, 300, served_right=0.95)
    advance(registry, 3)
    monitor.refresh()


def test_a_bad_version_is_rolled_back_to_one_that_does_better_on_the_recent_labels() -> None:
    monitor, registry = monitor_with_versions(MonitorSpec())
    rng = random.Random(1)
    good_then_a_third_version(monitor, registry, rng)
    decisions = feed(monitor, rng, 1_000, served_right=0.6, bad=3)  # v1 and v2 did not
    rollbacks = [d for d in decisions if d.kind == "rollback"]
    assert len(rollbacks) == 1, decisions
    ev = rollbacks[0].evidence
    assert ev["target_window_accuracy"] > ev["champion_window_accuracy"]
    assert ev["shadow_labels"] == MonitorSpec().rollback.window
    assert registry.champion() != ChampionPointer("m", 3)


def test_a_rollback_whose_write_failed_is_made_by_the_next_settle_as_without_it() -> None:
    # Redis is down when the rollback is written: the record is counted once and the
    # check is owed; the stage's next call (the guard's retry, Redis back) makes it, on
    # the labels of that record: the same rollback as without the outage
    monitor, registry = monitor_with_versions(MonitorSpec())
    rng = random.Random(1)
    good_then_a_third_version(monitor, registry, rng)
    [clean] = [d for d in feed(monitor, rng, 1_000, 0.6, bad=3) if d.kind == "rollback"]
    monitor, failing = monitor_with_versions(MonitorSpec(), LosesAReply(KEY))
    rng = random.Random(1)
    good_then_a_third_version(monitor, failing, rng)
    failing.armed = failing.refuses = True
    with pytest.raises(RedisConnectionError):
        feed(monitor, rng, 1_000, served_right=0.6, bad=3)
    assert failing.champion() == ChampionPointer("m", 3) and monitor.labels == clean.labels
    [rollback] = monitor.settle() + monitor.refresh()
    assert (rollback.kind, rollback.version, rollback.labels) == ("rollback", clean.version,
                                                                  clean.labels)  # fmt: skip
    assert rollback.evidence == clean.evidence and rollback.reason == clean.reason
    assert failing.champion() == monitor.champion == ChampionPointer("m", clean.version)
    assert monitor.settle() == []  # settled once


def test_a_rollback_whose_reply_was_lost_is_decided_once_and_followed() -> None:
    monitor, registry = monitor_with_versions(MonitorSpec(), LosesAReply(KEY))
    rng = random.Random(1)
    good_then_a_third_version(monitor, registry, rng)
    registry.armed = True
    with pytest.raises(RedisConnectionError):
        feed(monitor, rng, 1_000, served_right=0.6, bad=3)
    back = registry.champion()
    assert back is not None and back.version < 3  # the rollback was made
    # the stage's next call (the guard's retry) settles before anything else
    [rollback] = monitor.settle() + monitor.refresh()
    assert (rollback.kind, rollback.model, rollback.version) == ("rollback", "m", back.version)
    assert rollback.evidence["from"] == "m v3" and rollback.evidence["sign_test_p"] < 0.05
    assert monitor.champion == back and monitor.last_decision == monitor.labels
    assert monitor.settle() == []  # settled once
    later = feed(monitor, rng, 1_000, served_right=0.6, bad=3)  # the version back is good
    assert [d.kind for d in later if d.kind in ("rollback", "promote")] == []
    assert [m.kind for m in registry.history()] == ["advance"] * 3 + ["rollback"]


def test_a_monitor_restarted_during_a_fall_still_rolls_the_bad_version_back() -> None:
    """Its level and the versions served while it was good are saved: a monitor
    restarted with nothing but the labels to come would learn its level from the fall
    and know no version to go back to (seen on the real broker: no rollback in 60 s)."""
    spec = MonitorSpec()
    outcomes = []
    for remembered in (True, False):
        monitor, registry = monitor_with_versions(spec)
        rng = random.Random(1)
        good_then_a_third_version(monitor, registry, rng)
        falling = feed(monitor, rng, 60, served_right=0.6, bad=3)
        assert [d for d in falling if d.kind == "rollback"] == []  # not rolled back yet
        registry.save_monitor_memory(monitor.memory())
        # SIGKILLed and started again: a new monitor on the same registry
        restarted = PipelineMonitor("p", spec, registry, "m")
        restarted.refresh()
        taken = restarted.restore(registry.monitor_memory() if remembered else None)
        assert taken is remembered
        decisions = feed(restarted, rng, 1_000, served_right=0.6, bad=3)
        outcomes.append([d for d in decisions if d.kind == "rollback"])
    with_memory, without = outcomes
    assert len(with_memory) == 1 and without == []
    assert with_memory[0].evidence["good_level"] > 0.9  # the level from before the fall
    assert registry.champion() == ChampionPointer("m", 3)  # (the run without memory)


def restarted_monitor(
    monitor: PipelineMonitor, registry: MemoryRegistry, remembered: bool
) -> PipelineMonitor:
    """``monitor`` SIGKILLed after saving its memory, and started again (with its
    memory, or with none)."""
    registry.save_monitor_memory(monitor.memory())
    restarted = PipelineMonitor("p", monitor.spec, registry, monitor.lead)
    restarted.refresh()
    assert restarted.restore(registry.monitor_memory() if remembered else None) is remembered
    return restarted


def test_a_restarted_monitor_retires_a_challenger_at_its_patience_not_later() -> None:
    spec = MonitorSpec(promote={"enabled": False}, rollback={"enabled": False},
                       challengers={"on_drift": False, "patience": 100})  # fmt: skip
    retired = []
    for restart_at in (None, 80, 80):
        monitor, registry = monitor_with_versions(spec)
        registry.start_challenger("m.r1", "m", "a test's")
        monitor.refresh()
        for n in range(1, 300):
            if n == restart_at:
                monitor = restarted_monitor(monitor, registry, remembered=len(retired) == 1)
            monitor.on_evaluation(True, {"m": (1, 0.9), "m.r1": (0, 0.9)})
            if [d.kind for d in monitor.refresh()] == ["retire"]:
                retired.append(n)
                break
    # with its memory, at the label it would have been without the restart; without
    # it, its patience starts over at the restart
    straight, remembered, forgotten = retired
    assert remembered == straight and forgotten == straight + 80 - 1


def test_a_restarted_monitor_keeps_its_cool_down_after_a_promotion() -> None:
    spec = MonitorSpec(promote={"min_labels": 50}, rollback={"enabled": False},
                       challengers={"on_drift": False}, cooldown=600)  # fmt: skip
    promoted_at = []
    for remembered in (None, True, False):
        registry = MemoryRegistry(KEY)
        for name in ("m", "c", "d"):
            registry.publish(
                name, Sign(positive=True), {"parent": None, "metrics": {"labels": 1000}}
            )
        advance(registry, 1)
        monitor = PipelineMonitor("p", spec, registry, "m")
        monitor.refresh()
        rng = random.Random(4)
        right = {"m": 0.5, "c": 0.9, "d": 0.5}  # c beats m; then d beats c
        first: int | None = None
        for n in range(1, 3_000):
            label = rng.random() < 0.5
            answers = {name: (1, 0.9 if (rng.random() < r) == label else 0.1)
                       for name, r in right.items()}  # fmt: skip
            decisions = monitor.on_evaluation(label, answers)
            kinds = [(d.kind, d.model) for d in decisions if d.kind == "promote"]
            if kinds == [("promote", "c")]:
                first, right = n, {"m": 0.5, "c": 0.6, "d": 1.0}
                if remembered is not None:
                    monitor = restarted_monitor(monitor, registry, remembered)
            elif kinds == [("promote", "d")]:
                assert first is not None
                promoted_at.append(n - first)
                break
    straight, remembered_, forgotten = promoted_at
    assert straight >= spec.cooldown and remembered_ == straight  # cooled down, as without
    assert forgotten < spec.cooldown  # (a restart without its memory ends the cool-down)


def test_a_memory_of_another_champion_or_an_unreadable_one_is_not_taken() -> None:
    monitor, registry = monitor_with_versions(MonitorSpec())
    assert not monitor.restore({"champion": "other", "level": 0.9, "good": [["other", 1]]})
    assert not monitor.restore({"champion": "m", "level": "high", "good": [["m", 1]]})
    assert not monitor.restore({"champion": "m", "level": 0.9, "good": [["m"]]})
    assert monitor.level is None and not monitor.good
    registry._save_monitor_memory(b"not json")
    assert registry.monitor_memory() is None
    assert monitor.restore({"champion": "m", "level": 0.9, "good": [["m", 1]]})
    assert monitor.level == 0.9 and [p for _, p in monitor.good] == [ChampionPointer("m", 1)]


@pytest.mark.parametrize(
    ("published_at", "imported"), [(1_000, False), (1_600, False), (10**9, False), (10**9, True)]
)
def test_a_version_is_scored_only_on_recent_labels_it_did_not_learn(
    published_at: int, imported: bool
) -> None:
    # v2 fits the labels of the fall, which begins at label 1,501. Published
    # (labels_seen) before them, it is shown better on them and rolled back to at
    # once. Published after some of them (the learner ahead of the monitor, which saw
    # it served before the fall), it learned those, and every label it was served on
    # while the champion was good (1,201-1,500) it had learned too: it was never shown
    # good, and is no target (it was, once the recent labels were all after it, until
    # a rollback into a burst of bad labels came that way: see
    # test_a_version_published_into_a_burst_before_the_monitor_saw_it_is_no_rollback_target).
    # An imported version's count is another learner's: not read
    registry = MemoryRegistry(KEY)
    meta = {"parent": None, "metrics": {"labels": 1000}}
    registry.publish("m", Sign(positive=True), {**meta, "labels_seen": 500})
    origin = {"imported_from": {"version": 4, "meta_verified": True}} if imported else {}
    registry.publish("m", Sign(positive=False), {**meta, "labels_seen": published_at, **origin})
    registry.publish("m", Sign(positive=True), {**meta, "labels_seen": 1_700})
    advance(registry, 1)
    spec = MonitorSpec()
    monitor = PipelineMonitor("p", spec, registry, "m")
    monitor.refresh()
    rng = random.Random(1)
    good_then_a_third_version(monitor, registry, rng)  # (v2 served from label 1,201)
    decisions = feed(monitor, rng, 1_000, served_right=0.6, concept=False, bad=3)
    rollbacks = [d for d in decisions if d.kind == "rollback"]
    window = spec.rollback.window
    if published_at > 1_500 and not imported:
        assert rollbacks == []
    else:
        [rollback] = rollbacks
        assert (rollback.model, rollback.version) == ("m", 2)
        oldest_scored = rollback.labels - window + 1
        assert imported or oldest_scored > published_at  # (the monitor counts as the learner)
        assert rollback.labels < 1_500 + 2 * window  # not held back


def test_no_rollback_to_a_version_that_is_no_better_on_the_recent_labels() -> None:
    monitor, registry = monitor_with_versions(MonitorSpec())
    rng = random.Random(2)
    feed(monitor, rng, 1_200, served_right=0.95)
    advance(registry, 2)
    monitor.refresh()
    feed(monitor, rng, 300, served_right=0.95)
    # the concept flips: every earlier version (v > 0) is wrong on the new labels, the
    # live champion half-learned them. Rolling back would make things worse
    decisions = feed(monitor, rng, 3_000, served_right=0.7, concept=False)
    assert [d for d in decisions if d.kind == "rollback"] == []
    assert registry.champion() == ChampionPointer("m", 2)
    assert monitor.level is not None and monitor.level < 0.8  # the fall became the level


def test_a_version_published_into_a_burst_before_the_monitor_saw_it_is_no_rollback_target() -> None:
    """The learner runs ahead of the monitor. A burst of flipped labels starts; 300
    labels into it the learner publishes a version that fitted them, and the pointer
    follows while the monitor has read only 10 of them (no fall shown yet). That version
    was counted as served while good, and once the shadow window had moved past what
    it learned (its labels are not scored), it was right on the rest of the burst: the
    champion was rolled back to it during the burst (CI, 2026-12-04)."""
    monitor, registry = monitor_with_versions(MonitorSpec())
    rng = random.Random(5)
    feed(monitor, rng, 1_200, served_right=0.95)
    burst_from = monitor.labels + 1
    feed(monitor, rng, 10, served_right=0.5, concept=False)
    learned = burst_from + 300  # the learner's count: 300 burst labels learned
    fitted = registry.publish("m", Sign(positive=False), {"parent": None, "labels_seen": learned})
    advance(registry, fitted)
    monitor.refresh()
    decisions = feed(monitor, rng, 800, served_right=0.5, concept=False)
    assert [d for d in decisions if d.kind == "rollback"] == [], "rolled back into the burst"
    assert ChampionPointer("m", fitted) not in [p for _, p in monitor.good]


def test_a_champion_change_resets_its_drift_detector_and_holds_it_for_a_window() -> None:
    monitor, registry = monitor_with_versions(MonitorSpec(cooldown=0))
    rng = random.Random(3)
    feed(monitor, rng, 2_000, served_right=0.95)
    watch = monitor.watches["m"]
    assert watch.drift.detector.width > 1_000  # ADWIN's window holds the history
    registry.publish("n", Sign(positive=True), {"parent": None, "metrics": {"labels": 1000}})
    registry.promote(ChampionPointer("n", 1), "promote", "by hand")
    monitor.refresh()
    feed(monitor, rng, 10, served_right=0.95)  # "m" is a challenger now
    registry.promote(ChampionPointer("m", 1), "promote", "by hand")
    monitor.refresh()
    assert monitor.watches["m"].drift.detector.width == 0
    assert not monitor.duels and monitor.level is None and not monitor.recent
    feed(monitor, rng, MonitorSpec().window - 1, served_right=0.95)
    assert monitor.watches["m"].drift.detector.width == 0  # settling
    feed(monitor, rng, 100, served_right=0.95)
    assert monitor.watches["m"].drift.detector.width > 0


def test_the_first_pointer_to_the_lead_is_no_champion_change() -> None:
    """Until the learner's first pointer the lead is the champion; that pointer names
    the same model. Taken for a swap, it reset the lead's detector (CI: a monitor
    killed after a burst saved an unfed detector, and one restarted after the pointer
    came had lost every error before it)."""
    registry = MemoryRegistry(KEY)
    registry.publish("m", Sign(positive=True), {"parent": None, "metrics": {"labels": 1000}})
    monitor = PipelineMonitor("p", MonitorSpec(cooldown=0), registry, "m")
    monitor.refresh()
    assert monitor.champion is None and monitor.champion_name == "m"
    feed(monitor, random.Random(6), 2_000, served_right=0.95)
    width = monitor.watches["m"].drift.detector.width
    assert width > 1_000
    advance(registry, 1)  # the first pointer: the lead's version 1
    monitor.refresh()
    assert monitor.champion == ChampionPointer("m", 1)
    assert monitor.watches["m"].drift.detector.width == width  # fed on, not reset
    feed(monitor, random.Random(7), 10, served_right=0.95)
    assert monitor.watches["m"].drift.detector.width > width


def test_a_drift_event_names_the_label_that_tripped_it_and_the_champion() -> None:
    monitor, _ = monitor_with_versions(MonitorSpec())
    rng = random.Random(4)
    alarms: list[Decision] = []
    for i in range(6_000):
        v = rng.uniform(-1, 1)
        right = rng.random() < (0.95 if i < 3_000 else 0.6)
        source = LabelSource(f"e{i}", LabelPosition("p.labels", i % 3, 100 + i), 1e9 + i)
        label = v > 0
        probability = 0.9 if right == label else 0.1
        alarms += [d for d in monitor.on_evaluation(label, {"m": (1, probability)}, None, source)
                   if d.kind == "drift"]  # fmt: skip
    assert alarms
    event = ModelEvent.decode(alarms[0].as_event().encode())
    i = int(event.event_id[1:]) if event.event_id else -1
    assert 3_000 <= i < 4_000
    assert event.label_at == LabelPosition("p.labels", i % 3, 100 + i)
    assert event.label_time == 1e9 + i and event.champion is True
    assert (event.model, event.version) == ("m", 1)
    assert event.evidence is not None and event.evidence["detector"] == "adwin"
    assert 0 < event.evidence["statistic"]["estimation"] < 1
    assert event.evidence["statistic"]["width"] > 0


def test_records_from_before_these_fields_still_decode() -> None:
    old = b'{"kind":"drift","model":"m","version":3,"evidence":{"labels":7},"by":"monitor"}'
    event = ModelEvent.decode(old)
    assert event.event_id is None and event.label_at is None and event.champion is None
    assert ModelEvent.decode(event.encode()) == event
    raw = (b'{"event_id":"e1","label":true,"labels_seen":1,'
           b'"predictions":{"m":{"version":1,"probability":0.7}},"served":null}')  # fmt: skip
    evaluation = Evaluation.decode(raw)
    assert evaluation.inputs is None and evaluation.label_at is None
    assert evaluation.encode() == raw


@pytest.mark.parametrize("restart", [None, "its memory", "its memory without pending"])
def test_versions_published_ahead_of_a_lagging_monitor_become_rollback_targets(
    restart: str | None,
) -> None:
    """The learner publishes every 500 labels, 700 ahead of the monitor: the pointer
    moves on from each version while the monitor still reads labels it had learned.
    Each is held, then counted good once the monitor has read past them without a
    fall: the last one before a bad version is its rollback target. (Counting a
    version good only on labels read while it is the champion counted none of them,
    and went back to the first version.) A monitor restarted while it holds version
    4, which it then never sees served again, takes it back from its memory; without
    it, version 3 is the target."""
    registry = MemoryRegistry(KEY)
    registry.publish("m", Sign(positive=True), {"parent": None, "labels_seen": 0})
    advance(registry, 1)
    monitor = PipelineMonitor("p", MonitorSpec(), registry, "m")
    monitor.refresh()
    rng = random.Random(2)
    for version in range(2, 6):
        meta = {"parent": None, "labels_seen": monitor.labels + 700}
        assert registry.publish("m", Sign(positive=True), meta) == version
        advance(registry, version)
        monitor.refresh()
        if version == 5 and restart is not None:
            assert [p.version for _, p in monitor.pending] == [4]
            memory = monitor.memory()
            if restart == "its memory without pending":
                del memory["pending"]
            restarted = PipelineMonitor("p", monitor.spec, registry, monitor.lead)
            restarted.refresh()
            assert restarted.restore(memory)
            restarted.labels = monitor.labels  # (the stage counts on from its offsets)
            monitor = restarted
        feed(monitor, rng, 500, served_right=0.95)
    assert [p.version for _, p in monitor.pending] == [5]  # 2,200 learned, 2,000 read
    bad = registry.publish("m", Sign(positive=False), {"parent": None, "labels_seen": 2_000})
    advance(registry, bad)
    monitor.refresh()
    decisions = feed(monitor, rng, 1_000, served_right=0.6, bad=bad)
    [rollback] = [d for d in decisions if d.kind == "rollback"]
    expected = 3 if restart == "its memory without pending" else 4
    assert (rollback.model, rollback.version) == ("m", expected)
    assert not monitor.pending  # version 5 learned labels read after the fall began
