"""A monitor batch the guard runs again after a Redis error midway (a decision's
registry write failed) takes in each record once: quality is not counted twice, a
bad record goes to the DLQ once, and a decision made before the error is written."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import orjson
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from river import linear_model

from riverflow.assembly import build_monitor
from riverflow.models.registry import ChampionPointer, MemoryRegistry
from riverflow.monitors.policy import PipelineMonitor
from riverflow.monitors.spec import MonitorSpec
from riverflow.spec import PipelineSpec, parse_spec
from riverflow.stages.common import dead_letter
from riverflow.streams.contracts import Message, ModelEvent
from riverflow.streams.guard import Guard

KEY = b"k" * 32
EVALUATIONS = 800
BATCH = 50


class FailingRegistry(MemoryRegistry):
    """Counts its reads and writes of "Redis"; the ``fail_at``-th raises as a server
    that went away does (with ``reply_lost``, a pointer move raises after it was made)."""

    def __init__(self, reply_lost: bool = False) -> None:
        super().__init__(KEY)
        self.fail_at, self.calls, self.reply_lost = 0, 0, reply_lost

    def _call(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RedisConnectionError(
                "Error 111 connecting to localhost:6379. Connection refused."
            )

    def _get(self, *args: Any) -> Any:
        self._call()
        return super()._get(*args)

    def _pointer(self) -> bytes | None:
        self._call()
        return super()._pointer()

    def _compare_and_set(self, *args: Any) -> bool:
        if not self.reply_lost:
            self._call()
            return super()._compare_and_set(*args)
        moved = super()._compare_and_set(*args)
        self._call()
        return moved

    def _challengers(self) -> dict[str, bytes]:
        self._call()
        return super()._challengers()

    def _set_challenger(self, name: str, raw: bytes | None) -> None:
        self._call()
        super()._set_challenger(name, raw)

    def _recent_moves(self, n: int) -> list[bytes]:
        self._call()
        return super()._recent_moves(n)


def promoting_spec(fraud_spec: PipelineSpec) -> PipelineSpec:
    """The fraud spec whose monitor promotes after 50 paired labels and does nothing else."""
    monitors = {"promote": {"min_labels": 50}, "cooldown": 0, "rollback": {"enabled": False},
                "challengers": {"on_drift": False}}  # fmt: skip
    return parse_spec({**fraud_spec.model_dump(mode="json", by_alias=True), "monitors": monitors})


def drifting_spec(fraud_spec: PipelineSpec) -> PipelineSpec:
    """The fraud spec whose monitor starts a fresh challenger on the champion's drift
    alarm and decides nothing else."""
    monitors = {"promote": {"enabled": False}, "rollback": {"enabled": False},
                "challengers": {"on_drift": True}}  # fmt: skip
    return parse_spec({**fraud_spec.model_dump(mode="json", by_alias=True), "monitors": monitors})


def evaluations(spec: PipelineSpec, falls_at: int | None = None) -> list[Message]:
    """The champion right on 60% of the labels (95%, then 10% from ``falls_at`` on,
    if given), the logistic regression on 95%; every 40th record is not an evaluation
    (the DLQ's)."""
    rng = random.Random(7)
    out = []
    for i in range(EVALUATIONS):
        label = rng.random() < 0.5
        champion = 0.6 if falls_at is None else 0.95 if i < falls_at else 0.1
        answers = {"fraud-hoeffding": champion, "fraud-logreg": 0.95}
        predictions = {
            name: {"version": 1, "probability": 0.9 if (rng.random() < right) == label else 0.1}
            for name, right in answers.items()
        }
        record = {"event_id": f"e{i}", "label": label, "labels_seen": i + 1,
                  "predictions": predictions}  # fmt: skip
        value = b"{not json" if i % 40 == 39 else orjson.dumps(record)
        out.append(Message(spec.topics.evaluations, 0, i, f"e{i}".encode(), value))
    return out


def run(
    spec: PipelineSpec, fail_at: int, reply_lost: bool = False, falls_at: int | None = None
) -> tuple[Any, list[Any], FailingRegistry]:
    registry = FailingRegistry(reply_lost)
    for name in ("fraud-hoeffding", "fraud-logreg"):
        registry.publish(name, linear_model.LogisticRegression(), {"metrics": {"labels": 1000}})
    registry.move(ChampionPointer("fraud-hoeffding", 1), "advance", None)
    monitor = build_monitor(spec, registry)
    guard = Guard(monitor, lambda m, k, e: dead_letter(spec.topics, "monitor", m, k, e),
                  sleep=lambda s: None)  # fmt: skip
    registry.fail_at = registry.calls + fail_at if fail_at else 0
    msgs = evaluations(spec, falls_at)
    out = [o for i in range(0, len(msgs), BATCH) for o in guard.process(msgs[i : i + BATCH])]
    return monitor, out, registry


def test_a_batch_run_again_after_a_redis_error_takes_each_record_in_once(
    fraud_spec: PipelineSpec,
) -> None:
    spec = promoting_spec(fraud_spec)
    _, clean, registry = run(spec, 0)
    promoted = [ModelEvent.decode(o.value) for o in clean if o.topic == spec.topics.model_events]
    assert [(e.kind, e.model) for e in promoted] == [("promote", "fraud-logreg")]
    bad = EVALUATIONS // 40
    for k in range(1, registry.calls + 1):  # each read and write of the registry, in turn
        monitor, out, _ = run(spec, k)
        # also the record whose promotion check failed is counted once: the check is
        # owed, and run on the state that record left, the duel's evidence as without
        # the error
        assert monitor.core.labels == EVALUATIONS - bad, k
        topics = Counter(o.topic for o in out)
        assert topics[spec.topics.dlq] == bad, k
        events = [ModelEvent.decode(o.value) for o in out if o.topic == spec.topics.model_events]
        assert [(e.kind, e.model) for e in events] == [("promote", "fraud-logreg")], k
        assert events[0].evidence == promoted[0].evidence, k


def test_a_promotion_whose_reply_was_lost_is_logged_once_and_followed(
    fraud_spec: PipelineSpec,
) -> None:
    # Redis moved the pointer, then the answer was lost: the monitor must still log the
    # promotion (the audit log) and take the promoted model as its champion
    spec = promoting_spec(fraud_spec)
    _, _, registry = run(spec, 0)
    for k in range(1, registry.calls + 1):
        monitor, out, failing = run(spec, k, reply_lost=True)
        failing.fail_at = 0  # (the checks read it too)
        events = [ModelEvent.decode(o.value) for o in out if o.topic == spec.topics.model_events]
        assert [(e.kind, e.model) for e in events] == [("promote", "fraud-logreg")], k
        assert [m.kind for m in failing.history()] == ["advance", "promote"], k
        assert monitor.core.champion == failing.champion(), k
        assert monitor.core.last_decision is not None, k


def test_a_drift_alarm_whose_challenger_start_failed_still_starts_it_once(
    fraud_spec: PipelineSpec,
) -> None:
    # the champion's detector fires, then writing the fresh challenger fails: the
    # detector has reset, so the record taken in again would not raise the alarm again
    spec = drifting_spec(fraud_spec)
    _, clean, registry = run(spec, 0, falls_at=400)
    kinds = [ModelEvent.decode(o.value).kind for o in clean if o.topic == spec.topics.model_events]
    assert kinds == ["drift", "challenger"]
    for k in range(1, registry.calls + 1):
        monitor, out, failing = run(spec, k, falls_at=400)
        failing.fail_at = 0  # (the checks read it too)
        events = [ModelEvent.decode(o.value) for o in out if o.topic == spec.topics.model_events]
        assert [e.kind for e in events] == kinds, k
        [started] = failing.challengers()
        assert [e.model for e in events if e.kind == "challenger"] == [started], k
        assert set(monitor.core.fresh) == {started}, k
        assert monitor.core.labels == EVALUATIONS - EVALUATIONS // 40, k


def test_a_challenger_retired_before_a_later_retire_failed_is_still_logged() -> None:
    # two fresh challengers out of patience: the first is retired, writing the second's
    # retirement fails; the first's decision must come with the next call
    registry = FailingRegistry()
    registry.publish("m", linear_model.LogisticRegression(), {"metrics": {"labels": 1000}})
    registry.move(ChampionPointer("m", 1), "advance", None)
    for name in ("m.r1", "m.r2"):
        registry.start_challenger(name, "m", "a test's")
    spec = MonitorSpec(promote={"enabled": False}, rollback={"enabled": False},
                       challengers={"on_drift": False, "patience": 100})  # fmt: skip
    monitor = PipelineMonitor("p", spec, registry, "m")
    monitor.refresh()
    for _ in range(120):
        monitor.on_evaluation(True, {"m": (1, 0.9), "m.r1": (0, 0.9), "m.r2": (0, 0.9)})
    # the pointer read, the challengers read, then a retirement written each
    registry.fail_at = registry.calls + 4
    with pytest.raises(RedisConnectionError):
        monitor.refresh()
    decisions = monitor.settle() + monitor.refresh()
    assert sorted((d.kind, d.model) for d in decisions) == [("retire", "m.r1"), ("retire", "m.r2")]
    assert registry.challengers() == {} and monitor.settle() == []
