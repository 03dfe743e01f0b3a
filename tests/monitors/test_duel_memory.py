"""A monitor killed mid-duel and started again goes on with its challengers' duels: it
promotes on the same evidence as a monitor never stopped, though its group reads again
records the saved duels had counted (each pair counted once). Before, every restart began
each duel afresh, and a monitor restarted more often than a duel takes never promoted."""

from __future__ import annotations

import pytest
from river import linear_model

from riverflow.assembly import build_monitor
from riverflow.models.registry import ChampionPointer, MemoryRegistry
from riverflow.monitors.quality import PairedDuel
from riverflow.spec import PipelineSpec
from riverflow.stages import monitor as monitor_stage
from riverflow.stages.monitor import Monitor
from riverflow.streams.contracts import Message, ModelEvent
from tests.monitors.test_monitor_retry import KEY, evaluations, promoting_spec

BATCH = 10


def registry_with_two() -> MemoryRegistry:
    registry = MemoryRegistry(KEY)
    for name in ("fraud-hoeffding", "fraud-logreg"):
        registry.publish(name, linear_model.LogisticRegression(), {"metrics": {"labels": 1000}})
    registry.move(ChampionPointer("fraud-hoeffding", 1), "advance", None)
    return registry


def feed(monitor: Monitor, msgs: list[Message]) -> list[ModelEvent]:
    """``msgs`` in batches; the promotions written."""
    out = [o for i in range(0, len(msgs), BATCH) for o in monitor.process(msgs[i : i + BATCH])]
    events = [ModelEvent.decode(o.value) for o in out if o.topic == monitor.topics.model_events]
    return [e for e in events if e.kind == "promote"]


def duel_evidence(event: ModelEvent) -> dict[str, object]:
    assert event.evidence is not None
    return {k: v for k, v in event.evidence.items() if k != "labels"}  # (the monitor's count)


@pytest.mark.parametrize("replayed", [0, 7, 23])
def test_a_restarted_monitor_goes_on_with_its_duels_and_counts_each_pair_once(
    fraud_spec: PipelineSpec, monkeypatch: pytest.MonkeyPatch, replayed: int
) -> None:
    spec = promoting_spec(fraud_spec)
    msgs = evaluations(spec)
    (whole,) = feed(build_monitor(spec, registry_with_two()), msgs)
    promoted_at = whole.evidence["labels"] if whole.evidence else 0
    assert isinstance(promoted_at, int) and promoted_at > 60  # the duel takes a while

    monkeypatch.setattr(monitor_stage, "MEMORY_EVERY_S", 0.0)  # saved after every batch
    registry = registry_with_two()
    killed_at = 60  # a duel under way: past its warm-up of 50 pairs, not yet won
    first = build_monitor(spec, registry)
    assert feed(first, msgs[:killed_at]) == []
    assert first.core.duels["fraud-logreg"].n > 0
    # SIGKILLed; the group committed offsets ``replayed`` records behind the memory
    again = build_monitor(spec, registry)
    (promoted,) = feed(again, msgs[killed_at - replayed :])
    assert duel_evidence(promoted) == duel_evidence(whole)


def test_a_duel_is_restored_as_it_was() -> None:
    for regression in (False, True):
        duel = PairedDuel(warmup=5, window=20)
        for i in range(40):
            if regression:
                duel.update_errors(0.5 + (i % 3) / 10, 0.4 + (i % 5) / 10)
            else:
                duel.update(i % 3 == 0, i % 2 == 0)
        back = PairedDuel.restored(5, 20, duel.state())
        assert back.as_evidence() == duel.as_evidence()
        assert list(back.recent.values) == list(duel.recent.values)
        assert back.recent.bet() == pytest.approx(duel.recent.bet(), abs=1e-12)
