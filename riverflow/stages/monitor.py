"""The monitor stage: evaluations and predictions in, decisions out.

Reads ``{ns}.evaluations`` (quality, drift, promote / rollback / fresh
challengers) and ``{ns}.predictions`` (label-free drift and anomaly scores),
applies the decisions to the registry through ``monitors.policy`` and writes
each one, with its evidence, to ``{ns}.model-events``; ``monitors.history``
records them and the candidates' quality for the status page. A record it
cannot read goes to the DLQ with the reason; nothing else is lost.

A slate pipeline's records (evaluations naming a ``request``, predictions with
a ``slate``: the slate contract) also feed ``monitors.ranking.RankingMonitor``,
made at the first of them: a fraud pipeline never has one. Its drift detector on
the served ranking's quality per request (``monitors.drift.RankingDriftMonitor``)
then replaces the per-label error detector's alarms: a fraud pipeline keeps those.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any, cast

import orjson
from pydantic import ValidationError
from redis.exceptions import RedisError

from riverflow.errors import error_lines
from riverflow.models.batched import positive_probabilities
from riverflow.models.errors import ModelError
from riverflow.monitors.dataquality import FieldQualityWatch
from riverflow.monitors.exporter import MonitorMetrics
from riverflow.monitors.history import MonitorHistory
from riverflow.monitors.policy import Decision, LabelSource, PipelineMonitor
from riverflow.monitors.ranking import RankingMonitor, ShownItem
from riverflow.monitors.view import MonitorView
from riverflow.stages.audit import AuditReconciler
from riverflow.stages.common import DLQ_KEEP_BYTES, StageCounters, dead_letter
from riverflow.streams.contracts import (
    CandidatePrediction,
    Evaluation,
    Label,
    Message,
    Output,
    Prediction,
    shown_items,
)
from riverflow.streams.topics import Topics

log = logging.getLogger(__name__)

MEMORY_EVERY_S = 2.0  # the monitor's memory is saved at most this often, when it changed
MAX_SHOWN = 1_000  # a slate evaluation's ``shown`` beyond this is not a slate's


def _offsets(raw: Any) -> dict[int, int]:
    """A saved memory's ``through`` (partition -> offset); empty if it is not one."""
    try:
        return {int(p): int(o) for p, o in (raw or {}).items()}
    except (AttributeError, TypeError, ValueError):
        log.warning("monitor: the duels' offsets in its memory are not readable, ignored")
        return {}


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
        audit: AuditReconciler | None = None,
    ) -> None:
        self.topics = topics
        # the versions and pointer moves the audit log lacks, written by this stage
        # (their maker was killed between the registry and Kafka): riverflow.stages.audit
        self.audit = audit
        self.dlq_keep_bytes = dlq_keep_bytes
        self.core = core
        self.history = history
        self.metrics = metrics
        self.counters = StageCounters()
        self.quality = FieldQualityWatch(core.spec.quality.window)
        self.ranking: RankingMonitor | None = None  # made at the first slate record
        # challenger -> its latest published (version, model), which ranks slates in the
        # shadow; looked up once per batch, loaded when it changed
        self._shadows: dict[str, tuple[int, Any]] = {}
        self._shadows_read = False
        self._lock = threading.Lock()  # the status page reads the view from another thread
        # what a restarted monitor must not forget (``PipelineMonitor.memory``): taken
        # back at the first batch, saved at most every MEMORY_EVERY_S when it changed
        self._restored = False
        # per partition of the evaluations, the next offset the duels have not counted:
        # saved with the memory (its duels hold every pair before it), so that a restart
        # that reads some again (the group's committed offsets are behind the memory)
        # does not count them twice in the restored duels
        self._through: dict[int, int] = {}
        self._memory: dict[str, Any] | None = None
        self._memory_at = -math.inf
        self._ranking_drift: object = None  # a slate pipeline's, restored with the ranking
        # a batch the guard runs again (Redis down midway): the messages a call that
        # raised took in are not taken in twice, its outputs and decisions come with
        # the next call (see _process)
        self._taken: set[tuple[str, int, int]] = set()
        self._carried: tuple[list[Output], list[Decision]] = ([], [])

    def process(self, batch: Sequence[Message]) -> list[Output]:
        with self._lock:
            return self._process(batch)

    def _process(self, batch: Sequence[Message]) -> list[Output]:
        """The batch's outputs. A call that raises (a registry write with Redis down)
        keeps what it did: the messages it took in are skipped when the guard gives
        them again (one whose check met the outage among them: the check is owed, run
        by the next call's ``settle``), and its outputs and decisions come with the
        next call."""
        self.counters.consumed += len(batch)
        out, decisions = self._carried
        self._carried = ([], [])
        taken: list[tuple[str, int, int]] = []
        try:
            again = self._take(batch, out, decisions, taken)
        except BaseException:
            self._carried = (out, decisions)
            self._taken.update(taken)
            raise
        if batch and not again:  # past the batch of the call that raised
            self._taken.clear()
        self.counters.dead_letters += sum(o.topic == self.topics.dlq for o in out)
        self.history.record(decisions)
        if self.ranking is not None:
            for d in decisions:
                if d.kind == "retire":
                    self.ranking.forget(d.model)
        for d in decisions:
            out.append(Output(self.topics.model_events, d.model.encode(), d.as_event().encode()))
        if self.audit is not None:  # (never raises: a read that fails is tried again later)
            for e in self.audit.run():
                out.append(Output(self.topics.model_events, e.model.encode(), e.encode()))
        if self.metrics is not None:
            self.metrics.update(self._view(series=False), decisions)
        self.counters.produced += len(out)
        self._remember()
        return out

    def _take(
        self,
        batch: Sequence[Message],
        out: list[Output],
        decisions: list[Decision],
        taken: list[tuple[str, int, int]],
    ) -> int:
        """Take the batch in; how many of its messages a call that raised took in."""
        again = 0
        decisions += self.core.settle()  # a decision whose write's reply was lost
        decisions += self.core.refresh()
        if not self._restored:  # after refresh: the memory is of the champion it read
            memory = self.core.registry.monitor_memory()
            if self.core.restore(memory):
                assert memory is not None
                self._through = _offsets(memory.get("through"))
                self._ranking_drift = memory.get("ranking_drift")  # (when slates come)
                log.info("monitor: took back its memory of %s (level %s, %d good versions, "
                         "%d duels, drift detector %s)", self.core.champion_name,
                         self.core.level, len(self.core.good), len(self.core.duels),
                         "kept" if self.core.champion_name in self.core.watches
                         else "fresh")  # fmt: skip
            self._restored = True
        self._shadows_read = False
        for msg in batch:
            at = (msg.topic, msg.partition, msg.offset)
            if at in self._taken:  # (kept: the guard may bisect the batch and give it again)
                again += 1
                continue
            try:
                if msg.topic == self.topics.evaluations:
                    ev = Evaluation.decode(msg.value or b"")
                    self._check_label(ev.label)
                    predictions = {n: (p.version, self._answer(p))
                                   for n, p in ev.predictions.items()}  # fmt: skip
                    # the slate fields are read (and may refuse) before anything is taken in
                    shown = self._shown_item(msg.value, ev, predictions)
                    if ev.search:  # the learner's model search: read first (may refuse)
                        self.history.record_search(ev.search, self.core.labels + 1)
                    source = LabelSource(ev.event_id, ev.label_at, ev.label_time)
                    counted = self._through.get(msg.partition, 0)
                    reread = msg.offset < counted  # (the restored memory counted it)
                    decisions += self.core.on_evaluation(
                        ev.label,
                        predictions,
                        ev.segment,
                        source,
                        ev.inputs,
                        ev.labels_seen,
                        paired=not reread,
                    )
                    self._through[msg.partition] = max(counted, msg.offset + 1)
                    self.history.sample(self.core)
                    if shown is not None:
                        ranking = self._ranking()
                        done = ranking.on_item(*shown, counted=reread)
                        if done is not None and self.core.explores:  # its off-policy duels
                            decisions += self.core.on_ranked_request(done.request, done.clicks)
                        for a in ranking.take_alarms():  # its drift detector, for slates
                            decisions += self.core.on_ranking_drift(
                                a.model, a.reason, a.evidence, source
                            )
                elif msg.topic == self.topics.predictions:
                    p = Prediction.decode(msg.value or b"")
                    if not math.isfinite(p.score) or not all(
                        map(math.isfinite, p.features.values())
                    ):
                        raise _Refused("the prediction or a feature is not a finite number")
                    slate = self._slate(msg.value)
                    decisions += self.core.on_prediction(p.features, p.score, p.model, p.version)
                    self.quality.observe(p.inputs, p.cleaned, p.scored_at - p.event_time)
                    if slate is not None:
                        self._on_slate(p, slate)
            except (ValidationError, _Refused) as exc:
                line = error_lines(exc)[0] if isinstance(exc, ValidationError) else str(exc)
                why = f"not a {msg.topic} record: {line}"
                out.append(
                    dead_letter(
                        self.topics, self.stage, msg, "bad_record", why, self.dlq_keep_bytes
                    )
                )
            taken.append(at)
            self.core.raise_owed()  # a check a server outage stopped: owed, the record taken in
        return again

    def _remember(self) -> None:
        """Save the core's memory if it changed, at most every ``MEMORY_EVERY_S``. A
        failed save is tried again later: the batch it ends is done, and must not be
        taken in twice."""
        now = time.monotonic()
        if now - self._memory_at < MEMORY_EVERY_S:
            return
        self._memory_at = now
        memory = self.core.memory()
        memory["through"] = {str(p): o for p, o in self._through.items()}
        if self.ranking is not None:
            memory["ranking_drift"] = self.ranking.drift_memory()
        if memory == self._memory:
            return
        try:
            self.core.registry.save_monitor_memory(memory)
        except RedisError as exc:
            log.warning("monitor: its memory not saved (tried again in %g s): %s",
                        MEMORY_EVERY_S, exc)  # fmt: skip
            return
        self._memory = memory

    def _ranking(self) -> RankingMonitor:
        if self.ranking is None:
            spec = self.core.spec.ranking
            self.ranking = RankingMonitor(
                spec.window, spec.open_requests, spec.head, self.history.clock, spec.drift
            )
            # a slate's drift is a drop of the served ranking's quality per request,
            # not of the per-item error rate (mostly negatives: it barely moves)
            self.core.error_drift = False
            self.ranking.restore_drift(self._ranking_drift)
        return self.ranking

    def _shown_item(
        self, raw: bytes | None, ev: Evaluation, predictions: dict[str, tuple[int, Any]]
    ) -> tuple[str, int, ShownItem, tuple[str, int] | None] | None:
        """A slate evaluation's shown item (None for any other evaluation); ``_Refused``
        if its slate fields do not fit the contract."""
        if not raw or b'"request"' not in raw:  # cheap: most evaluations are not a slate's
            return None
        record = orjson.loads(raw)
        request = record.get("request")
        if request is None:
            return None
        position, shown = record.get("position"), record.get("shown")
        propensity = record.get("propensity")
        if type(request) is not str or not ev.event_id.startswith(request + "/"):
            raise _Refused(f"request {request!r:.80} does not name the pair "
                           f"{ev.event_id[:120]!r}")  # fmt: skip
        if type(shown) is not int or not 1 <= shown <= MAX_SHOWN:
            raise _Refused(f"shown {shown!r:.20} is not a count of shown items")
        if type(position) is not int or not 0 <= position < shown:
            raise _Refused(f"position {position!r:.20} is not one of {shown} shown")
        if propensity is not None and not (
            type(propensity) in (int, float) and 0 < propensity <= 1
        ):
            raise _Refused(f"propensity {propensity!r:.20} is not in (0, 1]")
        if self.core.target.kind != "binary":
            raise _Refused(f"a slate evaluation needs a bool label, not {self.core.target.kind}")
        scores = {name: (version, float(p)) for name, (version, p) in predictions.items()
                  if name not in self.core.retired}  # fmt: skip
        item = ShownItem(ev.event_id[len(request) + 1 :], position, bool(ev.label),
                         None if propensity is None else float(propensity), scores)  # fmt: skip
        served = (ev.served.model, ev.served.version) if ev.served is not None else None
        return request, shown, item, served

    @staticmethod
    def _slate(raw: bytes | None) -> list[dict[str, Any]] | None:
        """A slate prediction's candidates in served order (None for any other
        prediction); ``_Refused`` if its slate is malformed."""
        if not raw or b'"slate"' not in raw:
            return None
        record = orjson.loads(raw)
        if record.get("slate") is None:
            return None
        try:  # what it showed, read as the learner and the timeouts read it
            shown_items(record)
        except TypeError as exc:
            raise _Refused(f"slate: {exc}") from None
        slate: list[dict[str, Any]] = record["slate"]  # (in position order: checked)
        return slate

    def _on_slate(self, p: Prediction, slate: list[dict[str, Any]]) -> None:
        """A served slate: its exposure, and every ``offpolicy_every``-th one ranked by
        each challenger in the shadow (its top as many as were shown)."""
        ranking = self._ranking()
        shown = [e["item"] for e in slate if e.get("shown") is True]
        ranking.on_slate(p.model, p.version, shown, [e["item"] for e in slate])
        if ranking.slates % self.core.spec.ranking.offpolicy_every or not shown:
            return
        challengers = self._challenger_models()
        if not challengers:
            return
        xs = [self._pair_inputs(p, e) for e in slate]
        if any(x is None for x in xs):
            return  # a slate without each item's inputs and features cannot be ranked
        pairs = cast(list[dict[str, Any]], xs)
        targets = {}
        for name, (version, model) in challengers.items():
            scores = positive_probabilities(model, pairs)  # (an FM's in one numpy pass)
            order = sorted(range(len(slate)), key=lambda i: (-scores[i], i))
            targets[name] = (version, [slate[i]["item"] for i in order[: len(shown)]])
        if targets:
            ranking.on_targets(p.event_id, targets)
            if self.core.explores:
                self.core.on_ranked_slate(
                    p.event_id, p.model, [e["item"] for e in slate],
                    [e.get("propensity") for e in slate],
                    {name: top for name, (_, top) in targets.items()},
                )  # fmt: skip

    def _pair_inputs(self, p: Prediction, entry: dict[str, Any]) -> dict[str, Any] | None:
        """What the models are given for one candidate of a slate, as the learner builds
        it: the request's and the item's inputs (less the segment field) and its features."""
        inputs, features = entry.get("inputs"), entry.get("features")
        if not isinstance(inputs, dict) or not isinstance(features, dict):
            return None
        x = {**p.inputs, **inputs}
        x.pop(self.core.spec.segment or "", None)
        return {**x, **features}

    def _challenger_models(self) -> dict[str, tuple[int, Any]]:
        """Each live challenger's latest published version, loaded (verified) when it
        changed; the registry is asked once per batch."""
        if self._shadows_read:
            return self._shadows
        self._shadows_read = True
        core = self.core
        alive = [n for n in core.watches if n != core.champion_name and n not in core.retired]
        shadows = {}
        for name in alive:
            version = core.registry.latest(name)
            if version is None:
                continue
            held = self._shadows.get(name)
            if held is None or held[0] != version:
                try:
                    held = (version, core.registry.load(name, version).model)
                except ModelError as exc:  # pruned meanwhile, or its signature fails
                    log.warning("%s v%d does not rank slates in the shadow: %s",
                                name, version, exc)  # fmt: skip
                    if held is None:
                        continue
            shadows[name] = held
        self._shadows = shadows
        return shadows

    def _view(self, series: bool) -> MonitorView:
        view = self.history.view(self.core, series)
        if self.ranking is not None:
            view.ranking = self.ranking.view(self.core.champion_name, series)
        return view

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
        if self.audit is not None:  # versions and moves the audit log lacked, written here
            out["audit_recovered"] = float(self.audit.recovered)
        return out

    def view(self, series: bool = True) -> MonitorView:
        with self._lock:
            view = self._view(series)
            view.data_quality = self.quality.view()
            return view
