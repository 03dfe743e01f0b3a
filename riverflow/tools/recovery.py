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
from riverflow.tools.drift_eval import drifting_stream, recovery_times, score

AGRAWAL_FIELDS = ("salary", "commission", "age", "elevel", "car", "zipcode", "hvalue", "hyears",
                  "loan")  # fmt: skip
SEA_FIELDS = ("x0", "x1", "x2")
STREAM_FIELDS = {"agrawal": AGRAWAL_FIELDS, "sea": SEA_FIELDS}


def agrawal_spec(monitored: bool, stream: str = "agrawal", twin: bool = False) -> PipelineSpec:
    """A pipeline over the stream's fields: no windowed features, one Hoeffding tree
    (``twin``: and a second one, ``grace_period`` 200, a challenger from the start
    that is about as good: what the monitor must not keep swapping in and out)."""
    tree = {"class": "river.tree.HoeffdingTreeClassifier", "params": {"grace_period": 100}}
    candidates = [{"name": "tree", "estimator": tree}]
    if twin:
        other = {**tree, "params": {"grace_period": 200}}
        candidates.append({"name": "tree-twin", "estimator": other})
    inputs = STREAM_FIELDS[stream]
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
    """Events and their labels (one batch later) through scorer, learner and monitor."""
    inputs = STREAM_FIELDS[stream]
    rt = EmbeddedRuntime(spec, Settings(label_wait_s=0.0, snapshot_every_labels=500,
                                        batch_size=batch, model_poll_s=1e-6),
                         retain=(spec.topics.predictions, spec.topics.model_events))  # fmt: skip
    samples, _ = drifting_stream(events, every, seed, stream)
    truth: dict[str, bool] = {}
    started = time.perf_counter()
    for i, (x, y) in enumerate(samples):
        event_id = f"a{i:07d}"
        truth[event_id] = bool(y)
        event = {"event_id": event_id, "source": "agrawal", "ts": float(i),
                 **{k: float(x[k]) for k in inputs}}  # fmt: skip
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
        correct.append(((p.probability or 0.0) >= 0.5) == truth[p.event_id])
    logged = [ModelEvent.decode(v) for _, v in rt.messages(rt.topics.model_events)]
    decisions = [e for e in logged if e.by == "monitor"]
    return PipelineRun(correct, decisions, seconds)


def event_index(decision: ModelEvent) -> int:
    """Which event of the stream a monitor decision came after (events are labelled
    in order, one label each, so the monitor's label count says it)."""
    if decision.event_id is not None:
        return int(decision.event_id[1:])  # a drift event names the label that tripped it
    return int((decision.evidence or {}).get("labels", 0)) - 1


def decision_figures(
    decisions: list[ModelEvent], drifts: list[int], events: int, accept: int = 2_000
) -> dict[str, Any]:
    """The monitor's decisions against the known drifts.

    A promotion or rollback more than ``accept`` events after the last drift is
    taken on a stationary stretch: the concept did not change, so it is churn.
    Drift alarms are scored as ``drift_eval.score`` does (the first alarm within
    ``accept`` events of a drift detects it) except that later alarms inside that
    window are not false: they are the other candidates, or the champion again,
    reacting to the same change. ``champion_*`` counts only the alarms of the
    candidate then serving (drift events that say so; older ones do not).
    """

    def stationary(i: int) -> bool:
        return not any(d <= i < d + accept for d in drifts)

    kinds: dict[str, int] = {}
    for d in decisions:
        kinds[d.kind] = kinds.get(d.kind, 0) + 1
    out: dict[str, Any] = {"decisions": kinds}
    for kind in ("promote", "rollback"):
        at = [event_index(d) for d in decisions if d.kind == kind]
        out[f"{kind}_stationary"] = sum(map(stationary, at))
        out[f"{kind}_at"] = at
    out["promotions"] = [
        {"at": event_index(d), "model": d.model, "version": d.version,
         **{k: (d.evidence or {}).get(k) for k in ("e_value", "recent_gain", "n")}}
        for d in decisions if d.kind == "promote"
    ]  # fmt: skip
    drift_events = [d for d in decisions if d.kind == "drift"]
    champion = [d for d in drift_events if d.champion]
    groups = {"all": drift_events, "champion": champion}
    for name, group in groups.items():
        alarms = sorted(event_index(d) for d in group)
        detection = score(name, alarms, drifts, events, accept)
        false = sum(map(stationary, alarms))
        out[f"{name}_alarms"] = {
            "alarms": len(alarms),
            "recall": detection.recall,
            "mean_delay": detection.mean_delay,
            "false_alarms": false,
            "false_per_100k": false / events * 100_000,
        }
    return out


def run_recovery_eval(
    events: int = 200_000,
    every: int = 25_000,
    seed: int = 42,
    window: int = 1_000,
    log: Callable[[str], None] = print,
    stream: str = "agrawal",
    runs: tuple[str, ...] = ("without_monitor", "with_monitor"),
    twin: bool = False,
) -> dict[str, Any]:
    """Both runs on the same stream; the figures ``riverflow recovery-eval`` prints."""
    _, drifts = drifting_stream(events, every, seed, stream)
    out: dict[str, Any] = {"stream": stream, "events": events, "seed": seed, "drifts": drifts,
                           "window": window, "twin": twin}  # fmt: skip
    for name in runs:
        monitored = name == "with_monitor"
        log(f"{name}: {events:,} {stream} events through scorer, learner and monitor ...")
        spec = agrawal_spec(monitored, stream, twin)
        run = run_pipeline(spec, events, every, seed, stream=stream)
        times = recovery_times(run.correct, drifts, window)
        figures = decision_figures(run.decisions, drifts, events)
        out[name] = {
            "recovery_events": times,
            "mean_recovery": sum(times) / len(times) if times else None,
            "accuracy": sum(run.correct) / len(run.correct),
            **figures,
            "seconds": round(run.seconds, 1),
        }
        log(f"  recovery per drift {times}, mean {out[name]['mean_recovery'] or 0:,.0f}; "
            f"served accuracy {out[name]['accuracy']:.4f}; decisions {figures['decisions']}; "
            f"promotions / rollbacks on stationary stretches {figures['promote_stationary']} / "
            f"{figures['rollback_stationary']}; alarms {figures['all_alarms']}")  # fmt: skip
    if len(runs) == 2 and drifts:
        ratio = out["without_monitor"]["mean_recovery"] / max(
            out["with_monitor"]["mean_recovery"], 1
        )
        out["ratio"] = ratio
        log(f"mean recovery without / with the monitor: {ratio:.2f}x")
    return out
