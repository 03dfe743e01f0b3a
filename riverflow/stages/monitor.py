"""The monitor stage: evaluations and predictions in, decisions out.

Reads ``{ns}.evaluations`` (quality, drift, promote / rollback / fresh
challengers) and ``{ns}.predictions`` (label-free drift and anomaly scores),
applies the decisions to the registry through ``monitors.policy`` and writes
each one, with its evidence, to ``{ns}.model-events``; ``monitors.history``
records them and the candidates' quality for the status page. A record it
cannot read goes to the DLQ with the reason; nothing else is lost.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from riverflow.errors import error_lines
from riverflow.monitors.dataquality import FieldQualityWatch
from riverflow.monitors.exporter import MonitorMetrics
from riverflow.monitors.history import MonitorHistory
from riverflow.monitors.policy import Decision, LabelSource, PipelineMonitor
from riverflow.monitors.view import MonitorView
from riverflow.stages.common import DLQ_KEEP_BYTES, StageCounters, dead_letter
from riverflow.streams.contracts import (
    CandidatePrediction,
    Evaluation,
    Label,
    Message,
    Output,
    Prediction,
)
from riverflow.streams.topics import Topics


class _Refused(Exception):
    """A record that parses but holds what the monitor must not take in."""


class Monitor:
    """The processor of the monitor stage (see the module docstring)."""

    stage = "monitor"

    def __init__(
        self,
        topics: Topics,
        core: PipelineMonitor,
        history: MonitorHistory,
        metrics: MonitorMetrics | None = None,
        dlq_keep_bytes: int = DLQ_KEEP_BYTES,
    ) -> None:
        self.topics = topics
        self.dlq_keep_bytes = dlq_keep_bytes
        self.core = core
        self.history = history
        self.metrics = metrics
        self.counters = StageCounters()
        self.quality = FieldQualityWatch(core.spec.quality.window)
        self._lock = threading.Lock()  # the status page reads the view from another thread

    def process(self, batch: Sequence[Message]) -> list[Output]:
        with self._lock:
            return self._process(batch)

    def _process(self, batch: Sequence[Message]) -> list[Output]:
        self.counters.consumed += len(batch)
        out: list[Output] = []
        decisions: list[Decision] = self.core.refresh()
        for msg in batch:
            try:
                if msg.topic == self.topics.evaluations:
                    ev = Evaluation.decode(msg.value or b"")
                    self._check_label(ev.label)
                    if ev.search:  # the learner's model search: read first (may refuse)
                        self.history.record_search(ev.search, self.core.labels + 1)
                    predictions = {n: (p.version, self._answer(p))
                                   for n, p in ev.predictions.items()}  # fmt: skip
                    source = LabelSource(ev.event_id, ev.label_at, ev.label_time)
                    decisions += self.core.on_evaluation(
                        ev.label, predictions, ev.segment, source, ev.inputs
                    )
                    self.history.sample(self.core)
                elif msg.topic == self.topics.predictions:
                    p = Prediction.decode(msg.value or b"")
                    if not math.isfinite(p.score) or not all(
                        map(math.isfinite, p.features.values())
                    ):
                        raise _Refused("the prediction or a feature is not a finite number")
                    decisions += self.core.on_prediction(p.features, p.score, p.model, p.version)
                    self.quality.observe(p.inputs, p.cleaned, p.scored_at - p.event_time)
            except (ValidationError, _Refused) as exc:
                line = error_lines(exc)[0] if isinstance(exc, ValidationError) else str(exc)
                why = f"not a {msg.topic} record: {line}"
                out.append(
                    dead_letter(
                        self.topics, self.stage, msg, "bad_record", why, self.dlq_keep_bytes
                    )
                )
        self.counters.dead_letters += len(out)
        self.history.record(decisions)
        for d in decisions:
            out.append(Output(self.topics.model_events, d.model.encode(), d.as_event().encode()))
        if self.metrics is not None:
            self.metrics.update(self.history.view(self.core, series=False), decisions)
        self.counters.produced += len(out)
        return out

    def _answer(self, p: CandidatePrediction) -> Any:
        """What the core scores of a candidate's prediction, as the label's kind wants
        it; ``_Refused`` if the prediction is not one of that kind, or not finite."""
        kind = self.core.target.kind
        if kind == "binary":
            answer: Any = p.probability
            numbers = [answer]
        elif kind == "regression":
            answer = p.value
            numbers = [answer]
        else:
            answer = (p.value, p.probabilities)
            probabilities = p.probabilities if p.value is not None else None
            numbers = list(probabilities.values()) if probabilities else [None]
        if not all(type(v) in (int, float) and math.isfinite(v) for v in numbers):
            raise _Refused(f"a {kind} prediction is not finite numbers: {p}")
        return answer

    def _check_label(self, label: Label) -> None:
        """``_Refused`` unless the label is of the spec's type (what the learner let in)."""
        target = self.core.target
        if target.kind == "binary":
            fits = type(label) is bool
        elif target.kind == "regression":
            fits = isinstance(label, int | float) and not isinstance(label, bool)
            fits = fits and math.isfinite(float(label))
        else:
            fits = type(label) in (str, int) and label in target.classes
        if not fits:
            raise _Refused(f"label {str(label)[:40]!r} is not a {target.type.value} label")

    def status(self) -> dict[str, float]:
        out = {"labels": float(self.core.labels)}
        out.update({f"decisions_{k}": float(v) for k, v in self.history.decisions.items()})
        return out

    def view(self, series: bool = True) -> MonitorView:
        with self._lock:
            view = self.history.view(self.core, series)
            view.data_quality = self.quality.view()
            return view
