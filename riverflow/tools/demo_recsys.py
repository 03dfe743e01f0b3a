"""``riverflow demo --example recsys``: the recommendation pipeline on the embedded
runtime, its users simulated (``tools.recsys``).

Requests of a seeded world go to the scorer; its users click what each ranked
prediction shows them (the position-based model), and the shown items they do not
click become negatives once ``label.after`` has passed (the runtime's clock is the
requests' event time, so a run depends on its seed only). Halfway the season
changes: what every user likes rotates at once. The demo reports, per window of
requests, the clicks per shown slot (CTR@k) and NDCG@10 of the served rankings
against the users' true relevance, beside a popularity ranking of the same
requests: the learned ranker beats it, loses ground at the shift, and recovers.
The summary places each of the monitor's drift alarms in the stream: the request
whose labels tripped it and how many requests had been sent when it was raised.
"""

from __future__ import annotations

import math
import random
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from rich.console import Console
from rich.live import Live
from rich.table import Table

from riverflow.embedded import EmbeddedRuntime
from riverflow.monitors.ranking import ndcg
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.streams.contracts import ModelEvent, Output
from riverflow.tools.demo import _decisions
from riverflow.tools.recsys import RecsysConfig, RecsysWorld, Request, fits

K = 10  # NDCG@10


@dataclass
class Window:
    """One window of requests: the served rankings' quality, and the baseline's."""

    start: int  # the first request's position
    requests: int = 0
    shown: int = 0
    clicks: int = 0
    ndcg: float = 0.0  # sums until ``close``, then means
    popularity_ndcg: float = 0.0
    season: int = 0

    def close(self) -> None:
        self.ndcg /= max(self.requests, 1)
        self.popularity_ndcg /= max(self.requests, 1)

    @property
    def ctr(self) -> float:
        return self.clicks / max(self.shown, 1)


@dataclass(frozen=True)
class DriftAlarm:
    """A drift alarm of the monitor, placed in the stream of requests."""

    labels: int  # the monitor's count of labelled events then
    request: int  # the position of the request whose label tripped it (-1: unknown)
    sent: int  # requests sent to the scorer when it was raised (a batch at a time)
    reason: str


@dataclass
class RecsysDemoResult:
    """What the recommendation demo's summary reports."""

    requests: int
    predictions: int
    dead_letters: int
    labels_learned: int
    clicks: int
    model_versions: int
    windows: list[Window]
    shift_at: int
    seconds: float
    candidates: dict[str, float]  # each candidate's prequential ROC AUC on shown items
    decisions: list[str] = field(default_factory=list)
    drift_alarms: list[DriftAlarm] = field(default_factory=list)
    champion: str = ""
    peak_rss_mb: float = 0.0

    def mean(self, what: str, start: int, end: int) -> float:
        """The mean of a window figure over the windows starting in [start, end)."""
        picked = [getattr(w, what) for w in self.windows if start <= w.start < end]
        return sum(picked) / len(picked) if picked else float("nan")


class _Users:
    """The world's users: each new ranked prediction clicked, and scored against the
    truth (and against a popularity ranking of the same candidates)."""

    def __init__(self, world: RecsysWorld, rt: EmbeddedRuntime, seed: int, window: int) -> None:
        self.world, self.rt, self.window = world, rt, window
        self.rng = random.Random(seed)
        self.requests: dict[str, Request] = {}
        self.windows: list[Window] = []
        self.clicks = 0
        self.predictions: list[dict[str, Any]] = []
        self.sent = 0  # requests sent to the scorer
        self.alarms: list[DriftAlarm] = []

    def seen(self, outputs: list[Output]) -> None:
        topics = self.rt.topics
        self.predictions += [orjson.loads(o.value) for o in outputs
                             if o.topic == topics.predictions]  # fmt: skip
        for o in outputs:
            if o.topic == topics.model_events and b'"drift"' in o.value:
                event = ModelEvent.decode(o.value)
                if event.kind == "drift" and event.by == "monitor":
                    self.alarms.append(self._alarm(event))

    def _alarm(self, event: ModelEvent) -> DriftAlarm:
        evidence = event.evidence or {}
        request = str(evidence.get("request") or (event.event_id or "").split("/")[0])
        tail = request.rsplit("-", 1)[-1]
        return DriftAlarm(int(evidence.get("labels", 0)), int(tail) if tail.isdigit() else -1,
                          self.sent, event.reason or "")  # fmt: skip

    def answer(self) -> None:
        predictions, self.predictions = self.predictions, []
        for p in predictions:
            request = self.requests.pop(p["event_id"])
            clicks = self.world.click_labels(p, self.rng)
            for click in clicks:
                self.rt.produce(self.rt.topics.labels, click["request_id"].encode(),
                                orjson.dumps(click))  # fmt: skip
            self.clicks += len(clicks)
            self._score(request, [c["item"] for c in p["slate"]], len(clicks), p["shown"])

    def _score(self, request: Request, ranking: list[str], clicks: int, shown: int) -> None:
        at = request.position // self.window * self.window
        if not self.windows or self.windows[-1].start != at:
            if self.windows:
                self.windows[-1].close()
            self.windows.append(Window(at, season=self.world.season(request.position)))
        w = self.windows[-1]
        truth = {i: self.world.relevance(request, i) for i in request.slate}
        ideal = list(truth.values())
        w.requests += 1
        w.shown += shown
        w.clicks += clicks
        w.ndcg += ndcg([truth[i] for i in ranking], K, ideal)
        popular = self.world.by_popularity(request)
        w.popularity_ndcg += ndcg([truth[i] for i in popular], K, ideal)


def run_recsys_demo(
    spec: PipelineSpec,
    settings: Settings,
    requests: int = 10_000,
    seed: int = 7,
    console: Console | None = None,
    window: int = 500,
    world_users: int = 2_000,
    world_items: int = 1_000,
) -> RecsysDemoResult:
    """Run the recommendation demo (``spec``: a slate spec of ``examples/recsys.yaml``'s
    shape; the season changes at half the ``requests``; ``world_users`` and
    ``world_items``: the simulated world's (fewer users, more clicks of each to learn
    their tastes from)."""
    why = fits(spec)
    if why is not None:
        raise ValueError(f"the recommendation demo simulates examples/recsys.yaml's requests, "
                         f"and {why}")  # fmt: skip
    assert spec.events.slate is not None
    console = console or Console()
    shift = requests // 2
    # the summary's shortest span (just after the shift) is a quarter of the first half:
    # a window starts in it only if windows are no longer (3,000 requests in windows of
    # 1,000 said "nan" for it and for the last quarter)
    window = max(1, min(window, shift // 4))
    config = RecsysConfig(seed=seed, shown=spec.events.slate.shown, shift_at=(shift,),
                          users=world_users, items=world_items)  # fmt: skip
    world = RecsysWorld(config)
    now = [config.start_ts]
    holder: list[_Users] = []
    rt = EmbeddedRuntime(spec, settings, retain=(), clock=lambda: now[0],
                         on_output=lambda out: holder[0].seen(out))  # fmt: skip
    users = _Users(world, rt, seed, window)
    holder.append(users)
    started = time.perf_counter()
    batch = settings.batch_size
    stream = world.requests(requests)
    with Live(_view(rt, users, 0, requests, started), console=console,
              refresh_per_second=8) as live:  # fmt: skip
        done = 0
        while done < requests:
            chunk = [r for _, r in zip(range(batch), stream, strict=False)]
            for r in chunk:
                users.requests[r.request_id] = r
                event = world.event(r)
                rt.produce(rt.topics.events, r.user.encode(), orjson.dumps(event))
            now[0] = chunk[-1].ts
            users.sent += len(chunk)
            # everything in flight, the clicks too: a step reads one batch of labels,
            # and clicks that fell behind would come after their request's timeout
            rt.drain()
            users.answer()
            done += len(chunk)
            live.update(_view(rt, users, done, requests, started))
        rt.drain()
        users.answer()
        # the last shown items' timeouts: their negatives come once `after` has passed
        now[0] += (spec.label.after_s or 0.0) + 1.0
        rt.drain()
        live.update(_view(rt, users, done, requests, started))
    if users.windows:
        users.windows[-1].close()
    return RecsysDemoResult(
        requests=requests,
        predictions=rt.log.count(rt.topics.predictions),
        dead_letters=rt.log.count(rt.topics.dlq),
        labels_learned=rt.learner.learned,
        clicks=users.clicks,
        model_versions=rt.learner.version,
        windows=users.windows,
        shift_at=shift,
        seconds=time.perf_counter() - started,
        candidates={c.name: c.metrics.as_dict()["roc_auc"] for c in rt.learner.candidates.values()},
        decisions=_decisions(rt),
        drift_alarms=users.alarms,
        champion=str(rt.registry.champion() or ""),
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def _view(rt: EmbeddedRuntime, users: _Users, done: int, total: int, started: float) -> Table:
    table = Table(title=f"riverflow demo: {rt.spec.name} (embedded runtime)", show_header=False)
    table.add_row("requests", f"{done:,} / {total:,}")
    table.add_row("clicks", f"{users.clicks:,}")
    table.add_row("labels learned", f"{rt.learner.learned:,}")
    table.add_row("serving model", f"{rt.scorer.champion.name} v{rt.scorer.champion.version}")
    table.add_row("requests/s", f"{done / max(time.perf_counter() - started, 1e-9):,.0f}")
    for w in users.windows[-4:-1]:  # closed ones: their figures are means
        table.add_row(f"  requests {w.start:,}+ (season {w.season})",
                      f"CTR@k {w.ctr:.3f}  NDCG@{K} {w.ndcg:.3f} "
                      f"(popularity {w.popularity_ndcg:.3f})")  # fmt: skip
    return table


def recsys_summary(result: RecsysDemoResult) -> Table:
    table = Table(title="summary: recommendation (slates)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("requests", f"{result.requests:,}")
    table.add_row("ranked predictions", f"{result.predictions:,}")
    table.add_row("dead letters (DLQ)", f"{result.dead_letters:,}")
    table.add_row("clicks", f"{result.clicks:,}")
    table.add_row("labels learned (clicks and timeouts)", f"{result.labels_learned:,}")
    table.add_row("model versions published", f"{result.model_versions}")
    for name, value in result.candidates.items():
        table.add_row(f"candidate {name} ROC AUC (shown items)", f"{value:.4f}")
    shift = result.shift_at
    spans = (("before the shift", shift // 2, shift), ("just after it", shift, shift + shift // 4),
             ("in the last quarter", shift + shift // 2, 2 * shift))  # fmt: skip
    for label, start, end in spans:
        if math.isnan(result.mean("ndcg", start, end)):  # (a run of a handful of requests)
            table.add_row(f"NDCG@{K} {label}", "no requests in it (too few for the summary)")
            continue
        table.add_row(
            f"NDCG@{K} {label}",
            f"{result.mean('ndcg', start, end):.3f} (popularity "
            f"{result.mean('popularity_ndcg', start, end):.3f}), CTR@k "
            f"{result.mean('ctr', start, end):.3f}",
        )
    for a in result.drift_alarms:
        where = "before" if a.request < shift else "after"
        table.add_row(f"drift alarm, {where} the shift",
                      f"@{a.labels:,} labels: request {a.request:,}'s ({a.request - shift:+,}), "
                      f"raised with {a.sent:,} sent ({a.sent - shift:+,})")  # fmt: skip
    table.add_row("champion at the end", result.champion)
    for line in result.decisions:
        table.add_row("monitor", line[:120])
    table.add_row("wall time", f"{result.seconds:.1f} s")
    table.add_row("peak RSS", f"{result.peak_rss_mb:,.0f} MB")
    return table
