"""The whole pipeline on an abrupt concept drift: the monitor does not fight the new concept."""

from __future__ import annotations

from riverflow.streams.contracts import ModelEvent
from riverflow.tools.drift_streams import DriftWindows
from riverflow.tools.recovery import agrawal_spec, decision_figures, run_pipeline


def test_a_concept_drift_is_rolled_back_at_most_once_and_the_served_model_recovers() -> None:
    run = run_pipeline(agrawal_spec(monitored=True), events=20_000, every=10_000, seed=42)
    kinds = [d.kind for d in run.decisions]
    # the fall at the drift may look like a bad version once; rolling back again and
    # again would keep the champion from learning the new concept
    assert kinds.count("rollback") <= 1, kinds
    assert "drift" in kinds and "challenger" in kinds
    after = run.correct[10_000:11_000]
    last = run.correct[-2_000:]
    assert len(run.correct) == 20_000
    assert sum(last) / len(last) > sum(after) / len(after) + 0.05


def test_decisions_far_from_any_drift_are_counted_as_taken_on_a_stationary_stretch() -> None:
    def decision(kind: str, at: int, champion: bool | None = None) -> ModelEvent:
        return ModelEvent(kind, "tree", 1, evidence={"labels": at + 1}, by="monitor",
                          event_id=f"a{at:07d}" if kind == "drift" else None,
                          champion=champion)  # fmt: skip

    log = [decision("drift", 10_100, True), decision("drift", 10_300, False),
           decision("promote", 11_000), decision("drift", 15_000, True),
           decision("promote", 16_000), decision("rollback", 12_500)]  # fmt: skip
    windows = DriftWindows([10_000], events=20_000, every=10_000, accept=2_000)
    figures = decision_figures(log, windows, detectable=[True])
    # outside the drift's window: 12,500 and 16,000; settled (5,000 after it): 16,000
    assert (figures["promote_outside"], figures["rollback_outside"]) == (1, 1)
    assert (figures["promote_stationary"], figures["rollback_stationary"]) == (1, 0)
    assert figures["all_alarms"]["alarms"] == 3 and figures["all_alarms"]["false_alarms"] == 1
    champion = figures["champion_alarms"]
    assert (champion["alarms"], champion["recall"], champion["mean_delay"]) == (2, 1.0, 100)
    assert champion["false_per_100k"] == 5.0 and champion["false_at"] == [15_000]
