"""The whole pipeline on an abrupt concept drift: the monitor does not fight the new concept."""

from __future__ import annotations

from riverflow.tools.recovery import agrawal_spec, run_pipeline


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
