"""Decision quality of the monitor on River's synthetic drift streams.

``riverflow drift-eval`` runs the whole pipeline (scorer, learner and the real
``monitors.policy.PipelineMonitor`` on the embedded runtime, through
``riverflow.tools.recovery.run_pipeline``) on each stream of
``riverflow.tools.drift_streams``, once with the monitor's policies and once
without (the champion only keeps learning), and reports per stream:

- recall over the detectable drifts, mean delay and false alarms per 100k
  (``drift_streams.alarm_figures``) of the champion's alarms and of every
  drift event (the same now that only the champion's detector alarms); a
  drift the error stream cannot show is counted as undetectable, never dropped;
- promotions and rollbacks outside every drift window and on stationary
  stretches (``drift_streams.DriftWindows``);
- served accuracy with and without the monitor, and the recovery after each
  drift;
- "River alone": the spec's detector on the error stream served without the
  monitor, scored the same way.
"""

from __future__ import annotations

import resource
import statistics
import sys
from collections.abc import Callable
from typing import Any

from riverflow.monitors.drift import DetectorSpec
from riverflow.tools.drift_streams import (
    DriftWindows,
    alarm_figures,
    detect,
    drift_profile,
    drifting_stream,
    recovery_times,
    stream_width,
)
from riverflow.tools.recovery import agrawal_spec, decision_figures, run_pipeline

RUNS = ("without_monitor", "with_monitor")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def evaluate_stream(
    stream: str,
    events: int = 200_000,
    every: int = 20_000,
    seed: int = 7,
    accept: int = 2_000,
    runs: tuple[str, ...] = RUNS,
    twin: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Both runs of one stream, scored against its known drifts."""
    _, starts = drifting_stream(events, every, seed, stream)
    width = stream_width(stream)
    windows = DriftWindows(starts, events, every, accept, width)
    out: dict[str, Any] = {"stream": stream, "events": events, "every": every, "seed": seed,
                           "accept": accept, "width": width, "drifts": starts,
                           "twin": twin}  # fmt: skip
    for name in runs:
        log(f"{stream} {name}: {events:,} events through scorer, learner and monitor ...")
        run = run_pipeline(agrawal_spec(name == "with_monitor", stream, twin), events, every,
                           seed, stream=stream)  # fmt: skip
        errors = [not c for c in run.correct]
        times = recovery_times(run.correct, starts) if starts else []
        profile = drift_profile(errors, starts, stream, width)
        detectable = [p["detectable"] for p in profile]
        result: dict[str, Any] = {
            "accuracy": sum(run.correct) / len(run.correct),
            "recovery_events": times,
            "mean_recovery": statistics.fmean(times) if times else None,
            "drift_profile": profile,
            "seconds": round(run.seconds, 1),
        }
        if name == "without_monitor":
            alone = detect(errors, DetectorSpec())
            result["river_alone"] = alarm_figures(alone, windows, detectable)
        else:
            result.update(decision_figures(run.decisions, windows, detectable))
        out[name] = result
        log(summary(stream, name, result))
    if "without_monitor" in out and "with_monitor" in out and starts:
        without, with_ = out["without_monitor"], out["with_monitor"]
        out["recovery_ratio"] = without["mean_recovery"] / max(with_["mean_recovery"], 1)
    return out


def summary(stream: str, name: str, r: dict[str, Any]) -> str:
    line = f"  {stream} {name}: served accuracy {r['accuracy']:.4f}"
    if r["mean_recovery"] is not None:
        line += f", mean recovery {r['mean_recovery']:,.0f}"
    figures = [("river alone", r.get("river_alone")), ("champion", r.get("champion_alarms")),
               ("all candidates", r.get("all_alarms"))]  # fmt: skip
    for label, f in figures:
        if f is not None:
            line += (f"; {label}: recall {fmt(f['recall'], '.2f')} delay "
                     f"{fmt(f['mean_delay'], '.0f')} "
                     f"false/100k {f['false_per_100k']:.1f}")  # fmt: skip
    if "decisions" in r:
        line += (f"; decisions {r['decisions']}; promotions / rollbacks outside drift windows "
                 f"{r['promote_outside']} / {r['rollback_outside']}, on stationary stretches "
                 f"{r['promote_stationary']} / {r['rollback_stationary']}")  # fmt: skip
    return line


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run_drift_eval(
    streams: tuple[str, ...],
    events: int = 200_000,
    every: int = 20_000,
    seed: int = 7,
    runs: tuple[str, ...] = RUNS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every stream in turn; the figures ``riverflow drift-eval`` prints and saves."""
    results = [evaluate_stream(s, events, every, seed, runs=runs, log=log) for s in streams]
    return {"streams": results, "peak_rss_mb": round(peak_rss_mb(), 1)}
