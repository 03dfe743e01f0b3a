"""``riverflow demo``: a pipeline end to end on the embedded runtime.

Generates the drifting stream that fits the spec (``tools.generator``: card
transactions for fraud, orders for delivery times) with a few bad events mixed
in, runs scorer, learner and monitor, shows live progress, and ends with a summary.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from rich.console import Console
from rich.live import Live
from rich.table import Table

from riverflow.embedded import EmbeddedRuntime
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.tools.generator import (
    BAD_KINDS,
    FraudStreamConfig,
    corrupt,
    history,
    stream_for,
    with_labels,
)


@dataclass
class DemoResult:
    """What the demo's summary reports."""

    events: int
    predictions: int
    dead_letters: int
    labels_learned: int
    model_versions: int
    metrics: dict[str, float]
    seconds: float
    candidates: dict[str, float]  # each candidate's prequential headline (ROC AUC, MAE...)
    scenario: str = "drift"
    decisions: list[str] = field(default_factory=list)  # the monitor's, one line each
    champion: str = ""
    peak_rss_mb: float = 0.0  # the process's, at the end of the run
    # what the spec's cleaning did ("amount impute": 1234) and the schema changes seen
    cleaned: dict[str, int] = field(default_factory=dict)
    schema_changes: list[str] = field(default_factory=list)
    headline: str = "roc_auc"  # the metric ``candidates`` holds
    pipeline: str = "fraud"


SCENARIOS = ("drift", "labels", "quality")
SHOWN = ("drift", "challenger", "promote", "rollback", "retire", "prune")
# the prequential metric shown first, by the label's kind
HEADLINE = {"binary": "roc_auc", "multiclass": "macro_f1", "regression": "mae"}


def _decisions(rt: EmbeddedRuntime) -> list[str]:
    return [f"@{m.labels:,} labels  {m.kind:<10} {m.text}"
            for m in rt.monitor.history.markers if m.kind in SHOWN]  # fmt: skip


def _view(rt: EmbeddedRuntime, produced: int, total: int, started: float) -> Table:
    title = f"riverflow demo: {rt.spec.name} (embedded runtime)"
    table = Table(title=title, show_header=False)
    table.add_row("events produced", f"{produced:,} / {total:,}")
    dead = rt.scorer.counters.dead_letters
    table.add_row("predictions", f"{rt.scorer.counters.produced - dead:,}")
    table.add_row("dead letters", f"{dead + rt.learner.counters.dead_letters:,}")
    table.add_row("labels learned", f"{rt.learner.learned:,}")
    table.add_row("serving model", f"{rt.scorer.champion.name} v{rt.scorer.champion.version}")
    m = rt.learner.metrics.as_dict()
    headline = HEADLINE[rt.learner.target.kind]
    table.add_row(f"prequential {headline}", f"{m[headline]:.4f}")
    table.add_row("events/s", f"{produced / max(time.perf_counter() - started, 1e-9):,.0f}")
    view = rt.monitor.view(series=False)
    for c in view.candidates:
        value = c.metrics.get(view.metric, 0.0)
        table.add_row(
            f"  {c.role} {c.name}",
            f"v{c.version}  {view.metric} {value:.3f} (last {view.window:,})",
        )
    for line in _decisions(rt)[-6:]:
        table.add_row("  monitor", line[:110])
    return table


def run_demo(
    spec: PipelineSpec,
    settings: Settings,
    events: int = 20_000,
    seed: int = 7,
    bad_every: int = 500,
    console: Console | None = None,
    scenario: str = "drift",
    stream: str | None = None,
) -> DemoResult:
    """Run the demo; ``bad_every`` mixes one bad event in every that many events.

    ``scenario``: ``drift`` (the pattern switches halfway: the monitor's drift
    alarm, a fresh challenger, promotions), ``labels`` (the fraud stream only:
    the labels of 3% of the events, from halfway, are flipped: a rollback) or
    ``quality`` (events from 40% to 60% of the stream come without an amount, or
    the delivery stream's distance: the scorer reports the schema change; with a
    spec whose ``clean`` imputes it, nothing goes to the DLQ for it).
    ``stream``: which generated stream (default: the one that fits the spec).
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    console = console or Console()
    half = events // 2
    name = stream_for(spec.label.field, stream)
    key, number, required = spec.events.key, "amount", "card_id"
    if name == "delivery":
        number, required = "distance_km", "restaurant_id"
    if scenario == "quality":
        dropped = (number, events * 2 // 5, events * 3 // 5)
        records = history(name, events, seed, drift_at=(), dropped=dropped)
    elif name == "delivery":
        if scenario != "drift":
            raise ValueError("the delivery stream has the drift and quality scenarios only")
        records = history("delivery", events, seed)
    elif scenario == "drift":
        records = with_labels(events, FraudStreamConfig(seed=seed, drift_at=(half,)))
    else:
        flipped = (half, half + events // 33)
        config = FraudStreamConfig(seed=seed, drift_at=(), flipped_labels=flipped)
        records = with_labels(events, config)
    rt = EmbeddedRuntime(spec, settings, retain=())  # memory bounded by what is in flight
    started = time.perf_counter()
    produced = 0
    corrupted: set[str] = set()  # their labels are not sent: the event never scored
    with Live(_view(rt, 0, events, started), console=console, refresh_per_second=8) as live:
        for kind, record in records:
            if kind == "event":
                produced += 1
                value = orjson.dumps(record)
                # (the bad kinds spoil the number: events without one stay as they are)
                if bad_every and produced % bad_every == 0 and number in record:
                    bad = BAD_KINDS[(produced // bad_every) % len(BAD_KINDS)]
                    value = corrupt(record, bad, number, required)
                    corrupted.add(record["event_id"])
                rt.produce(rt.topics.events, str(record[key]).encode(), value)
            elif record["event_id"] in corrupted:
                corrupted.discard(record["event_id"])
            else:
                rt.produce(rt.topics.labels, record["event_id"].encode(), orjson.dumps(record))
            if produced % settings.batch_size == 0 and kind == "event":
                rt.step()
                live.update(_view(rt, produced, events, started))
        rt.drain()
        live.update(_view(rt, produced, events, started))
    headline = HEADLINE[rt.learner.target.kind]
    return DemoResult(
        events=produced,
        predictions=rt.log.count(rt.topics.predictions),
        dead_letters=rt.log.count(rt.topics.dlq),
        labels_learned=rt.learner.learned,
        model_versions=rt.learner.version,
        metrics=rt.learner.metrics.as_dict(),
        seconds=time.perf_counter() - started,
        candidates={c.name: c.metrics.as_dict()[headline] for c in rt.learner.candidates.values()},
        scenario=scenario,
        decisions=_decisions(rt),
        champion=str(rt.registry.champion() or ""),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        cleaned={f"{f} {rule}": n for (f, rule), n in rt.scorer.quality.cleaned.items()},
        schema_changes=[_change_text(c) for c in rt.scorer.quality.reported],
        headline=headline,
        pipeline=spec.name,
    )


def _change_text(change: dict[str, Any]) -> str:
    rate = f" ({change['rate']:.0%} of {change['window']} events)" if "rate" in change else ""
    return f"{change['field']}: {change['change']}{rate}"


def summary(result: DemoResult) -> Table:
    table = Table(title=f"summary: {result.pipeline}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("events", f"{result.events:,}")
    table.add_row("predictions", f"{result.predictions:,}")
    table.add_row("dead letters (DLQ)", f"{result.dead_letters:,}")
    table.add_row("labels learned", f"{result.labels_learned:,}")
    table.add_row("model versions published", f"{result.model_versions}")
    for name, value in result.metrics.items():
        if name != "labels":
            table.add_row(f"prequential {name}", f"{value:.4f}")
    for name, value in result.candidates.items():
        table.add_row(f"candidate {name} {result.headline}", f"{value:.4f}")
    table.add_row("scenario", result.scenario)
    for what, n in sorted(result.cleaned.items()):
        table.add_row(f"cleaned {what}", f"{n:,}")
    for line in result.schema_changes:
        table.add_row("schema change", line)
    table.add_row("champion at the end", result.champion)
    for line in result.decisions:
        table.add_row("monitor", line[:120])
    table.add_row("wall time", f"{result.seconds:.1f} s")
    table.add_row("peak RSS", f"{result.peak_rss_mb:,.0f} MB")
    return table
