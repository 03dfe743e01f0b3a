"""How much faster the served model recovers from abrupt drift with the monitor than without.

Runs the whole pipeline (scorer, learner, monitor on the embedded runtime) twice
on the same Agrawal stream with abrupt concept switches at known positions
(``riverflow.tools.drift_eval.drifting_stream``): once with the spec's monitor
policies, once with them off (the champion only keeps learning). Recovery after
a drift is the number of events until the *served* predictions' windowed
accuracy is back within 2 points of its level just before the drift
(``riverflow.tools.drift_eval.recovery_times``). ``riverflow recovery-eval`` prints both
and their ratio.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from riverflow.embedded import EmbeddedRuntime
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, parse_spec
from riverflow.streams.contracts import ModelEvent, Prediction
from riverflow.tools.drift_eval import drifting_stream, recovery_times

AGRAWAL_FIELDS = ("salary", "commission", "age", "elevel", "car", "zipcode", "hvalue", "hyears",
                  "loan")  # fmt: skip


def agrawal_spec(monitored: bool) -> PipelineSpec:
    """A pipeline over Agrawal's fields: no windowed features, one Hoeffding tree."""
    fields: dict[str, str] = {"event_id": "str", "source": "str", "ts": "timestamp"}
    fields.update({name: "float" for name in AGRAWAL_FIELDS})
    off = {"promote": {"enabled": False}, "rollback": {"enabled": False},
           "challengers": {"on_drift": False}}  # fmt: skip
    return parse_spec({
        "name": "agrawal",
        "events": {"fields": fields, "key": "source", "event_id": "event_id", "time": "ts"},
        "label": {"field": "label", "event_id": "event_id"},
        "models": {
            "inputs": list(AGRAWAL_FIELDS),
            "candidates": [{"name": "tree", "estimator": {
                "class": "river.tree.HoeffdingTreeClassifier", "params": {"grace_period": 100}}}],
        },
        "monitors": {} if monitored else off,
    })  # fmt: skip


@dataclass
class PipelineRun:
    correct: list[bool]  # was the served prediction right, per event in order
    decisions: list[ModelEvent]  # the monitor's
    seconds: float


def run_pipeline(
    spec: PipelineSpec, events: int, every: int, seed: int, batch: int = 500
) -> PipelineRun:
    """Events and their labels (one batch later) through scorer, learner and monitor."""
    rt = EmbeddedRuntime(spec, Settings(label_wait_s=0.0, snapshot_every_labels=500,
                                        batch_size=batch, model_poll_s=1e-6),
                         retain=(spec.topics.predictions, spec.topics.model_events))  # fmt: skip
    samples, _ = drifting_stream(events, every, seed)
    truth: dict[str, bool] = {}
    started = time.perf_counter()
    for i, (x, y) in enumerate(samples):
        event_id = f"a{i:07d}"
        truth[event_id] = bool(y)
        event = {"event_id": event_id, "source": "agrawal", "ts": float(i),
                 **{k: float(x[k]) for k in AGRAWAL_FIELDS}}  # fmt: skip
        rt.produce(rt.topics.events, b"agrawal", orjson.dumps(event))
        rt.produce(rt.topics.labels, event_id.encode(),
                   orjson.dumps({"event_id": event_id, "label": bool(y)}))  # fmt: skip
        if (i + 1) % batch == 0:
            rt.step()
    rt.drain()
    seconds = time.perf_counter() - started
    correct = []
    for _, raw in rt.messages(rt.topics.predictions):
        p = Prediction.decode(raw)
        correct.append((p.probability >= 0.5) == truth[p.event_id])
    logged = [ModelEvent.decode(v) for _, v in rt.messages(rt.topics.model_events)]
    decisions = [e for e in logged if e.by == "monitor"]
    return PipelineRun(correct, decisions, seconds)


def run_recovery_eval(
    events: int = 200_000,
    every: int = 25_000,
    seed: int = 42,
    window: int = 1_000,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Both runs on the same stream; the figures ``riverflow recovery-eval`` prints."""
    _, drifts = drifting_stream(events, every, seed)
    out: dict[str, Any] = {"events": events, "drifts": drifts, "window": window}
    for name, monitored in (("without_monitor", False), ("with_monitor", True)):
        log(f"{name}: {events:,} events through scorer, learner and monitor ...")
        run = run_pipeline(agrawal_spec(monitored), events, every, seed)
        times = recovery_times(run.correct, drifts, window)
        kinds: dict[str, int] = {}
        for d in run.decisions:
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
        out[name] = {
            "recovery_events": times,
            "mean_recovery": sum(times) / len(times),
            "accuracy": sum(run.correct) / len(run.correct),
            "decisions": kinds,
            "seconds": round(run.seconds, 1),
        }
        log(f"  recovery per drift {times}, mean {out[name]['mean_recovery']:,.0f}; "
            f"served accuracy {out[name]['accuracy']:.4f}; decisions {kinds}")  # fmt: skip
    ratio = out["without_monitor"]["mean_recovery"] / max(out["with_monitor"]["mean_recovery"], 1)
    out["ratio"] = ratio
    log(f"mean recovery without / with the monitor: {ratio:.2f}x")
    return out
