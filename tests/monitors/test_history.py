"""What the status page shows of the monitor over time, recorded apart from its decisions."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from riverflow.models.registry import MemoryRegistry
from riverflow.monitors.history import MAX_MARKERS, MonitorHistory
from riverflow.monitors.policy import Decision, PipelineMonitor
from riverflow.monitors.spec import MonitorSpec

LEAD, FRESH = "fraud-hoeffding", "fraud-hoeffding.r1"


def test_a_retired_challengers_line_leaves_the_chart_and_its_marker_stays() -> None:
    spec = MonitorSpec(window=200, challengers={"patience": 100, "on_drift": False}, cooldown=0)
    registry = MemoryRegistry(b"k" * 32)
    monitor = PipelineMonitor("fraud", spec, registry, LEAD)
    history = MonitorHistory(clock=lambda: 1.0)
    registry.start_challenger(FRESH, LEAD, "test")
    history.record(monitor.refresh())
    for i in range(150):
        history.record(monitor.on_evaluation(i % 2 == 0, {LEAD: (1, 0.9), FRESH: (0, 0.9)}))
        history.sample(monitor)
    # a point every window // 20 labels
    assert {name: len(points) for name, points in history.series.items()} == {LEAD: 15, FRESH: 15}
    history.record(monitor.refresh())
    view = history.view(monitor)
    assert list(view.series) == [LEAD] and [c.name for c in view.candidates] == [LEAD]
    retired = [m for m in view.markers if m.kind == "retire"]
    assert [(m.model, m.labels) for m in retired] == [(FRESH, 150)]
    assert history.decisions["retire"] == 1


def test_markers_keep_the_latest_and_counts_keep_all() -> None:
    history = MonitorHistory()
    n = MAX_MARKERS + 20
    history.record(Decision("drift", LEAD, 1, f"alarm {i}", labels=i) for i in range(n))
    assert [m.labels for m in history.markers] == list(range(20, n))
    assert history.decisions == {"drift": n}


def test_search_decisions_fill_the_search_panel_and_a_malformed_one_changes_nothing() -> None:
    history = MonitorHistory(clock=lambda: 1.0)
    configs = ["lr@a=1", "lr@a=2"]
    started = {
        "kind": "search",
        "model": "lr",
        "reason": "round 1 of 2",
        "evidence": {"round": 1, "metric": "log_loss", "configurations": configs},
    }
    rung = {"kind": "prune", "model": "lr", "reason": "rung 0",
            "evidence": {"rung": 0, "budget": 50, "labels": 50, "kept": configs[:1],
                         "scores": {"lr@a=1": 0.3, "lr@a=2": 0.5}, "done": True}}  # fmt: skip
    history.record_search([started, rung], labels=50)
    search = history.searches["lr"]
    assert search.done and search.rungs[0].scores == {"lr@a=1": 0.3, "lr@a=2": 0.5}
    assert [m.kind for m in history.markers] == ["search", "prune"]
    bad = {**rung, "evidence": {"rung": "first"}}
    with pytest.raises(ValidationError):
        history.record_search([started, bad], labels=60)
    assert len(history.markers) == 2 and history.searches["lr"].rungs == search.rungs
