"""What the status page shows of the monitor over time, recorded apart from its decisions."""

from __future__ import annotations

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
