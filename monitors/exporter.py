"""Prometheus metrics of a running stage, served with ``/healthz`` (and, by the
monitor, the status page) over HTTP.

Hosts call ``StageMetrics.observe`` after every batch whose outputs are
acknowledged, so the event latency histogram measures what a consumer of the
output topic sees: produce time of the input (its Kafka timestamp) to the moment
its output is durable.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from riverflow.monitors.status import render_html
from riverflow.monitors.view import MonitorView

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


QUALITY_MEASURES = ("missing_rate", "out_of_range_rate", "new_category_rate")


class StageMetrics:
    """Throughput, outcomes, latency and lag of one stage process."""

    def __init__(self, stage: str, registry: CollectorRegistry | None = None) -> None:
        self.stage = stage
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "riverflow_consumed_messages", "messages consumed", ["stage"], registry=r
        ).labels(stage)
        self._produced = Counter(
            "riverflow_produced_messages", "messages produced", ["stage", "topic"], registry=r
        )
        self._dead = Counter(
            "riverflow_dead_letters", "messages refused, by error kind", ["stage", "kind"],
            registry=r,
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "riverflow_batch_seconds", "time to process and write one batch", ["stage"],
            registry=r, buckets=LATENCY_BUCKETS,
        ).labels(stage)  # fmt: skip
        self.latency = Histogram(
            "riverflow_event_latency_seconds",
            "input produce time to output acknowledged (event-to-prediction for the scorer)",
            ["stage"], registry=r, buckets=LATENCY_BUCKETS,
        ).labels(stage)  # fmt: skip
        self._lag = Gauge(
            "riverflow_consumer_lag", "messages behind the log end",
            ["stage", "topic", "partition"], registry=r,
        )  # fmt: skip
        self._status = Gauge(
            "riverflow_stage_status", "what the processor reports (model version, metrics)",
            ["stage", "name"], registry=r,
        )  # fmt: skip
        # stage statuses named ``measure:label...`` (the scorer's data quality) go to
        # gauges labelled by field, rule or partition instead of the status gauge
        quality = Gauge(
            "riverflow_field_quality", "per field, over the last window of events: "
            "missing_rate, out_of_range_rate, new_category_rate", ["stage", "field", "measure"],
            registry=r,
        )  # fmt: skip
        type_errors = Gauge(
            "riverflow_field_type_errors", "events refused for this field's type or range",
            ["stage", "field"], registry=r,
        )  # fmt: skip
        cleaned = Gauge(
            "riverflow_cleaned_values", "values the spec's cleaning changed, by field and rule",
            ["stage", "field", "rule"], registry=r,
        )  # fmt: skip
        freshness = Gauge(
            "riverflow_event_freshness_seconds",
            "processing time minus event time, newest event of the last batch per partition",
            ["stage", "partition"], registry=r,
        )  # fmt: skip
        # measure -> its gauge and the label values after the name's own (stage first)
        self._labelled: dict[str, tuple[Gauge, tuple[str, ...]]] = {
            **{m: (quality, (m,)) for m in QUALITY_MEASURES},
            "type_errors": (type_errors, ()),
            "cleaned": (cleaned, ()),
            "freshness_s": (freshness, ()),
        }
        # status name -> its gauge child: ``labels()`` costs ~2.5 us a call, and a
        # batch sets ~35 of them (~190 us: a fifth of a scorer's CPU at 1,000 events/s,
        # in batches of a few); bounded by the names a processor reports (fields,
        # rules, partitions)
        self._children: dict[str, Any] = {}  # status name -> its gauge child
        self._lag_children: dict[tuple[str, int], Any] = {}  # (topic, partition) -> child
        self.last_loop = time.monotonic()
        self._degraded_by: dict[str, str] = {}  # who reports it -> why the stage waits
        self._degraded = Gauge(
            "riverflow_stage_degraded", "1 while the stage retries because a server is down",
            ["stage"], registry=r,
        ).labels(stage)  # fmt: skip

    def set_degraded(self, reason: str | None, source: str = "stage") -> None:
        """The stage waits for a server (``reason``), or no longer (None): /healthz
        answers 503 with the reason while it lasts. ``source`` tells reporters apart
        (the stage's guard waits for Redis, the host for Kafka): each clears its own."""
        if reason is None:
            self._degraded_by.pop(source, None)
        else:
            self._degraded_by[source] = reason
        self._degraded.set(bool(self._degraded_by))
        self.last_loop = time.monotonic()  # the loop is alive: it is retrying

    @property
    def degraded(self) -> str | None:
        """Why the stage waits for a server (every reporter's reason), None while it does not."""
        return "; ".join(self._degraded_by.values()) or None

    def observe(
        self, batch: Sequence[Any], outputs: Iterable[Any], seconds: float, dlq_topic: str
    ) -> None:
        """Count a written batch: ``batch`` of streams Messages, ``outputs`` of Outputs."""
        self.last_loop = time.monotonic()
        self.consumed.inc(len(batch))
        self.batch_seconds.observe(seconds)
        now_ms = time.time() * 1000
        for msg in batch:
            if msg.timestamp_ms is not None:
                self.latency.observe(max(0.0, now_ms - msg.timestamp_ms) / 1000)
        # counted per topic and per kind, then one increment each: a label lookup
        # per output cost ~5% of a scorer's CPU
        topics: collections.Counter[str] = collections.Counter()
        kinds: collections.Counter[str] = collections.Counter()
        for out in outputs:
            topics[out.topic] += 1
            if out.topic == dlq_topic:
                kinds[orjson.loads(out.value)["error_kind"]] += 1
        for topic, n in topics.items():
            self._produced.labels(self.stage, topic).inc(n)
        for kind, n in kinds.items():
            self._dead.labels(self.stage, kind).inc(n)

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        # a child per partition, as for the status: a labels() lookup is ~2.5 us
        child = self._lag_children.get((topic, partition))
        if child is None:
            child = self._lag_children[topic, partition] = self._lag.labels(
                self.stage, topic, str(partition)
            )
        child.set(lag)

    def set_status(self, status: dict[str, float]) -> None:
        children = self._children
        for name, value in status.items():
            child = children.get(name)
            if child is None:
                child = children[name] = self._child(name)
            child.set(value)

    def _child(self, name: str) -> Any:
        """The gauge child a status name is set on."""
        measure, _, rest = name.partition(":")
        labelled = self._labelled.get(measure) if rest else None
        if labelled is not None:
            gauge, after = labelled
            parts = rest.rsplit(":", 1) if measure == "cleaned" else [rest]
            return gauge.labels(self.stage, *parts, *after)
        return self._status.labels(self.stage, name)

    def alive(self, stale_after_s: float = 60.0) -> bool:
        """The host loop went round recently (it does at least every poll interval)."""
        return time.monotonic() - self.last_loop < stale_after_s

    def heartbeat(self) -> None:
        self.last_loop = time.monotonic()


class _Current:
    """A labelled gauge holding exactly the label sets of the latest ``set``: one no
    longer there (an older version, a retired challenger) is removed, not left stale."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self._labels: set[tuple[str, ...]] = set()

    def set(self, values: dict[tuple[str, ...], float]) -> None:
        for labels in self._labels - values.keys():
            self.gauge.remove(*labels)
        self._labels = set(values)
        for labels, value in values.items():
            self.gauge.labels(*labels).set(value)


class MonitorMetrics:
    """What the monitor stage exports besides the stage metrics: quality per model
    version, drift alarms and decisions, the champion, label-free drift, segments,
    and a slate pipeline's ranking metrics per model version (none for any other:
    their gauges have no labels set, so no samples)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.quality = Gauge(
            "riverflow_model_quality", "windowed quality of a candidate over recent labels",
            ["model", "version", "metric"], registry=r,
        )  # fmt: skip
        self.ranking = Gauge(
            "riverflow_ranking_quality", "a slate pipeline's ranking metrics over recent "
            "requests: ctr_at_k, ndcg_at_k (served ranking), coverage, popularity_share (a "
            "model that served); rerank_ndcg_at_k (every candidate's order of the shown items)",
            ["model", "version", "metric"], registry=r,
        )  # fmt: skip
        self.ranking_requests = Gauge(
            "riverflow_ranking_requests", "a slate pipeline's requests: open (awaiting labels), "
            "capacity, shadow_waiting (ranked by the challengers, awaiting labels); since the "
            "monitor started: completed, evicted, late, duplicates, shadow_dropped",
            ["state"], registry=r,
        )  # fmt: skip
        self.decisions = Counter(
            "riverflow_monitor_decisions",
            "monitor decisions and alarms (drift, feature_drift, challenger, retire, promote, "
            "rollback)", ["kind", "model"], registry=r,
        )  # fmt: skip
        self.champion = Gauge(
            "riverflow_champion_info", "1 for the version the scorers serve",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self.drift = Gauge(
            "riverflow_input_drift_statistic",
            "KS statistic of an input (feature or score) between reference and recent windows",
            ["input"], registry=r,
        )  # fmt: skip
        self.anomaly = Gauge(
            "riverflow_anomaly_score", "HalfSpaceTrees score of recent inputs", ["stat"],
            registry=r,
        )  # fmt: skip
        self.segment = Gauge(
            "riverflow_segment_quality", "the champion's windowed quality per segment",
            ["segment", "metric"], registry=r,
        )  # fmt: skip
        self.gap = Gauge(
            "riverflow_segment_gap", "largest quality gap between two segments", ["metric"],
            registry=r,
        )  # fmt: skip
        self._quality = _Current(self.quality)
        self._ranking = _Current(self.ranking)
        self._champion: tuple[str, str] | None = None

    def update(self, view: Any, decisions: Iterable[Any]) -> None:
        """Set every gauge from a ``MonitorView``; count the new decisions."""
        for d in decisions:
            self.decisions.labels(d.kind, d.model).inc()
        self._quality.set({(c.name, str(c.version), metric): value
                           for c in view.candidates
                           for metric, value in c.metrics.items()})  # fmt: skip
        if view.ranking is not None:
            self._ranking.set({(m.name, str(m.version), metric): value
                               for m in view.ranking.models
                               for metric, value in m.metrics.items()})  # fmt: skip
            for state, n in view.ranking.requests.items():
                self.ranking_requests.labels(state).set(n)
        if view.champion is not None:
            now = (str(view.champion["model"]), str(view.champion["version"]))
            if self._champion is not None and self._champion != now:
                self.champion.remove(*self._champion)
            self._champion = now
            self.champion.labels(*now).set(1)
        for name, d in view.distributions.items():
            self.drift.labels(name).set(d.statistic)
        for stat, value in view.anomaly.items():
            self.anomaly.labels(stat).set(value)
        if view.segments is not None:
            for value, numbers in view.segments.by.items():
                for metric in (view.segments.metric, "n"):
                    self.segment.labels(value, metric).set(numbers.get(metric, 0.0))
            self.gap.labels(view.segments.metric).set(view.segments.gap)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(
    metrics: StageMetrics,
    port: int,
    host: str = "127.0.0.1",
    view: Callable[[], MonitorView] | None = None,
) -> WSGIServer:
    """Serve ``/metrics`` and ``/healthz`` in a daemon thread; returns the server.

    With ``view`` (the monitor's current document) also the status page at ``/`` and
    ``/status``, and the document itself at ``/status.json``.
    """
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO")
        if path == "/healthz":
            degraded = metrics.degraded
            ok = degraded is None and metrics.alive()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])  # fmt: skip
            if degraded is not None:
                return [f"degraded: {degraded}\n".encode("utf-8", "backslashreplace")]
            return [b"ok\n" if ok else b"stalled\n"]
        if view is not None and path in ("/", "/status"):
            page = render_html(view(), live=True).encode()
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                      ("Cache-Control", "no-store")])  # fmt: skip
            return [page]
        if view is not None and path == "/status.json":
            body = view().model_dump_json().encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Cache-Control", "no-store")])  # fmt: skip
            return [body]
        return prometheus(environ, start_response)

    server = make_server(host, port, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server
