"""How much faster the served model recovers from abrupt drift with the monitor than without.

Runs the whole pipeline (scorer, learner, monitor on the embedded runtime) twice
on the same stream with concept changes at known positions
(``riverflow.tools.drift_streams.drifting_stream``): once with the spec's monitor
policies, once with them off (the champion only keeps learning). Recovery after
a drift is the number of events until the *served* predictions' windowed
accuracy is back within 2 points of its level just before the drift
(``riverflow.tools.drift_streams.recovery_times``). ``riverflow recovery-eval`` prints both
and their ratio; ``riverflow drift-eval`` (``riverflow.tools.drift_eval``) scores the
monitor's decisions from the same runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from riverflow.embedded import EmbeddedRuntime
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, parse_spec
from riverflow.streams.contracts import ModelEvent, Output, Prediction
from riverflow.tools.drift_streams import (
    DriftWindows,
    alarm_figures,
    drifting_stream,
)

AGRAWAL_FIELDS = ("salary", "commission", "age", "elevel", "car", "zipcode", "hvalue", "hyears",
                  "loan")  # fmt: skip
SEA_FIELDS = ("x0", "x1", "x2")


def stream_fields(stream: str) -> tuple[str, ...]:
    return SEA_FIELDS if stream.startswith("sea") else AGRAWAL_FIELDS


def agrawal_spec(monitored: bool, stream: str = "agrawal", twin: bool = False) -> PipelineSpec:
    """A pipeline over the stream's fields: no windowed features, one Hoeffding tree
    (``twin``: and a second one, ``grace_period`` 200, a challenger from the start
    that is about as good: what the monitor must not keep swapping in and out)."""
    tree = {"class": "river.tree.HoeffdingTreeClassifier", "params": {"grace_period": 100}}
    candidates = [{"name": "tree", "estimator": tree}]
    if twin:
        other = {**tree, "params": {"grace_period": 200}}
        candidates.append({"name": "tree-twin", "estimator": other})
    inputs = stream_fields(stream)
    fields: dict[str, str] = {"event_id": "str", "source": "str", "ts": "timestamp"}
    fields.update({name: "float" for name in inputs})
    off = {"promote": {"enabled": False}, "rollback": {"enabled": False},
           "challengers": {"on_drift": False}}  # fmt: skip
    return parse_spec({
        "name": "agrawal",
        "events": {"fields": fields, "key": "source", "event_id": "event_id", "time": "ts"},
        "label": {"field": "label", "event_id": "event_id"},
        "models": {
            "inputs": list(inputs),
            "candidates": candidates,
        },
        "monitors": {} if monitored else off,
    })  # fmt: skip


@dataclass
class PipelineRun:
    correct: list[bool]  # was the served prediction right, per event in order
    decisions: list[ModelEvent]  # the monitor's
    seconds: float


def run_pipeline(
    spec: PipelineSpec,
    events: int,
    every: int,
    seed: int,
    batch: int = 500,
    stream: str = "agrawal",
) -> PipelineRun:
    """Events and their labels (one batch later) through scorer, learner and monitor.

    Time is the event's position (snapshots every 500 labels, none by the clock), so
    a run depends on its arguments only; predictions and decisions are read as they
    are written and nothing is retained, so memory does not grow with ``events``."""
    inputs = stream_fields(stream)
    now = [0.0]
    truth: dict[str, bool] = {}
    correct: list[bool] = []
    decisions: list[ModelEvent] = []
    topics = spec.topics

    def seen(outputs: list[Output]) -> None:
        for o in outputs:
            if o.topic == topics.predictions:
                p = Prediction.decode(o.value)
                correct.append(((p.probability or 0.0) >= 0.5) == truth.pop(p.event_id))
            elif o.topic == topics.model_events:
                e = ModelEvent.decode(o.value)
                if e.by == "monitor":
                    decisions.append(e)

    settings = Settings(label_wait_s=0.0, snapshot_every_labels=500, snapshot_every_s=0.0,
                        batch_size=batch, model_poll_s=1e-6)  # fmt: skip
    rt = EmbeddedRuntime(spec, settings, retain=(), clock=lambda: now[0], on_output=seen)
    samples, _ = drifting_stream(events, every, seed, stream)
    started = time.perf_counter()
    for i, (x, y) in enumerate(samples):
        event_id = f"a{i:07d}"
        truth[event_id] = bool(y)
        now[0] = float(i)
        event = {"event_id": event_id, "source": "agrawal", "ts": float(i),
                 **{k: float(x[k]) for k in inputs}}  # fmt: skip
        rt.produce(rt.topics.events, b"agrawal", orjson.dumps(event))
        rt.produce(rt.topics.labels, event_id.encode(),
                   orjson.dumps({"event_id": event_id, "label": bool(y)}))  # fmt: skip
        if (i + 1) % batch == 0:
            rt.step()
    rt.drain()
    return PipelineRun(correct, decisions, time.perf_counter() - started)


def event_index(decision: ModelEvent) -> int:
    """Which event of the stream a monitor decision came after (events are labelled
    in order, one label each, so the monitor's label count says it)."""
    if decision.event_id is not None:
        return int(decision.event_id[1:])  # a drift event names the label that tripped it
    return int((decision.evidence or {}).get("labels", 0)) - 1


def decision_figures(
    decisions: list[ModelEvent], windows: DriftWindows, detectable: list[bool]
) -> dict[str, Any]:
    """The monitor's decisions against the known drifts (``DriftWindows``).

    Promotions and rollbacks are counted outside every drift window and on
    stationary stretches. Drift alarms are scored by ``alarm_figures``, for all
    candidates and for the ``champion`` alone: the alarms of the candidate then
    serving (drift events that say so; older ones do not).
    """
    kinds: dict[str, int] = {}
    for d in decisions:
        kinds[d.kind] = kinds.get(d.kind, 0) + 1
    out: dict[str, Any] = {"decisions": kinds}
    for kind in ("promote", "rollback"):
        at = [event_index(d) for d in decisions if d.kind == kind]
        out[f"{kind}_outside"] = sum(not windows.in_drift(i) for i in at)
        out[f"{kind}_stationary"] = sum(map(windows.stationary, at))
        out[f"{kind}_at"] = at
    out["promotions"] = [
        {"at": event_index(d), "model": d.model, "version": d.version,
         **{k: (d.evidence or {}).get(k) for k in ("e_value", "recent_gain", "n")}}
        for d in decisions if d.kind == "promote"
    ]  # fmt: skip
    drift_events = [d for d in decisions if d.kind == "drift"]
    groups = {"all": drift_events, "champion": [d for d in drift_events if d.champion]}
    for name, group in groups.items():
        out[f"{name}_alarms"] = alarm_figures(map(event_index, group), windows, detectable)
    return out
