"""What the status page and the report show of the monitor, over time.

``PipelineMonitor`` (``monitors.policy``) decides; ``MonitorHistory`` records
how it went: a point of every candidate's windowed accuracy (a regressor's MAE) every twentieth of
a window of labelled events, and a marker per decision. It draws the
``MonitorView`` from that record and the monitor's current state, so the page
can change without touching a decision.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from riverflow.monitors.policy import Decision, PipelineMonitor
from riverflow.monitors.view import (
    CandidateView,
    Marker,
    MarkerKind,
    MonitorView,
    RungView,
    SearchView,
    SegmentView,
    SeriesPoint,
)

MAX_POINTS = 2_000  # per series; older points are thinned out beyond this
MAX_MARKERS = 500


class MonitorHistory:
    """The series and markers of one pipeline's monitor, and the counts of its decisions."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.series: dict[str, list[SeriesPoint]] = {}
        self.markers: list[Marker] = []
        self.decisions: dict[str, int] = {}
        self.searches: dict[str, SearchView] = {}

    def record_search(self, events: Iterable[dict[str, Any]], labels: int) -> None:
        """The learner's search decisions (``search`` / ``prune`` model-events, as an
        evaluation carries them): a marker each, and the rungs of each search's round.

        Every one is read before any is recorded: a malformed one raises
        ``pydantic.ValidationError`` and leaves the history as it was.
        """
        read: list[tuple[Marker, SearchView | RungView, bool]] = []
        for e in events:
            if e.get("kind") not in ("search", "prune"):
                continue
            base, evidence = str(e.get("model")), e.get("evidence") or {}
            marker = Marker.model_validate({"labels": labels, "at": self.clock(),
                                            "kind": e["kind"], "model": base,
                                            "text": str(e.get("reason", ""))})  # fmt: skip
            if e["kind"] == "search":
                fields = {k: evidence.get(k) for k in ("round", "metric", "configurations")}
                read.append((marker, SearchView.model_validate({"base": base, **fields}), False))
            else:
                read.append((marker, RungView.model_validate(evidence), bool(evidence.get("done"))))
        for marker, part, done in read:
            self.markers.append(marker)
            if isinstance(part, SearchView):
                self.searches[part.base] = part
            elif marker.model in self.searches:
                self.searches[marker.model].rungs.append(part)
                self.searches[marker.model].done = done
        if len(self.markers) > MAX_MARKERS:
            del self.markers[: len(self.markers) - MAX_MARKERS]

    def record(self, decisions: Iterable[Decision]) -> None:
        """A marker per decision; a retired challenger's line leaves the chart."""
        for d in decisions:
            self.decisions[d.kind] = self.decisions.get(d.kind, 0) + 1
            self.markers.append(Marker(labels=d.labels, at=d.at, kind=cast(MarkerKind, d.kind),
                                       model=d.model, text=d.reason))  # fmt: skip
            if d.kind == "retire":
                self.series.pop(d.model, None)
        if len(self.markers) > MAX_MARKERS:
            del self.markers[: len(self.markers) - MAX_MARKERS]

    def sample(self, monitor: PipelineMonitor) -> None:
        """Called after each labelled event: a point per candidate every ``window // 20``."""
        if monitor.labels % max(1, monitor.spec.window // 20):
            return
        now = self.clock()
        for name, watch in monitor.watches.items():
            points = self.series.setdefault(name, [])
            points.append(SeriesPoint(labels=monitor.labels, at=now, version=watch.version,
                                      value=watch.quality.headline()))  # fmt: skip
            if len(points) > MAX_POINTS:
                del points[::2]

    def view(self, monitor: PipelineMonitor, series: bool = True) -> MonitorView:
        """The status page's document; ``series=False`` leaves out the charts' points."""
        spec = monitor.spec
        champion = monitor.champion_name
        metric = "mae" if monitor.target.kind == "regression" else "accuracy"  # the headline
        candidates = [
            CandidateView(name=name, role="champion" if name == champion else "challenger",
                          version=w.version, labels=w.quality.count,
                          metrics=w.quality.as_dict(), drift_alarms=w.drift.alarms,
                          base=monitor.fresh.get(name, {}).get("base"))
            for name, w in monitor.watches.items()
        ]  # fmt: skip
        segments = None
        if spec.segment and monitor.segments:
            by = {value: {"n": float(q.count), **q.as_dict()}
                  for value, q in monitor.segments.items()}  # fmt: skip
            enough = [q.headline() for q in monitor.segments.values()
                      if q.count >= spec.segment_min_labels]  # fmt: skip
            gap = max(enough) - min(enough) if len(enough) >= 2 else 0.0
            segments = SegmentView(field=spec.segment, metric=metric, by=by, gap=gap)
        dist = monitor.distribution
        shown = {n: list(p) for n, p in self.series.items()} if series else {}
        return MonitorView(
            pipeline=monitor.pipeline,
            updated=self.clock(),
            metric=metric,
            window=spec.window,
            champion=None
            if monitor.champion is None
            else {"model": monitor.champion.model, "version": monitor.champion.version},
            candidates=candidates,
            series=shown,
            markers=list(self.markers),
            segments=segments,
            distributions=dist.views() if dist else {},
            anomaly=dist.anomaly_summary() if dist else {},
            searches={b: s.model_copy(deep=True) for b, s in self.searches.items()},
        )
