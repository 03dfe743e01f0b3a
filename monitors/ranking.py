"""Ranking quality of a slate pipeline: clicks on what was served, per model version.

A slate pipeline's learner writes one evaluation per shown item (the slate
contract: ``request``, ``position``, ``shown``, ``propensity``). The clicks of a
request come early and its timeout negatives later, so ``OpenRequests`` holds
each request's shown items until all ``shown`` of them are labelled, in a
bounded buffer (the oldest request is dropped beyond it, and counted). A
completed request (``ServedRequest``) gives, over the last ``window`` requests:

- ``ctr_at_k``: clicks on the top k per shown slot (clicks / (k * requests)),
  of the model that served the request;
- ``ndcg_at_k``: mean NDCG@k of the served ranking with the clicks as relevance;
  a request with no click has no ideal ranking and counts as 0, as the usual
  definition over logged clicks does;
- ``rerank_ndcg_at_k``: for every candidate, the same over the shown items
  re-ranked by its own prequential scores. This is the figure that compares
  models: the served order's NDCG is inflated by position bias (users click
  the top more because it is the top), every re-ranking is not.

From the served slates (``{ns}.predictions``, no label needed), per serving
model over its last ``window`` requests (``Exposure``):

- ``coverage``: distinct items shown over distinct items seen as candidates
  (or over a declared catalogue size);
- ``popularity_share``: share of the shown slots taken by the most popular
  ``head`` share of items, popularity being how often an item is a candidate in
  the window: a property of the items and the request stream, the same for every
  ranker, so the share says how much a ranker favours the head (a ranker blind
  to popularity gets about the head's share of candidate slots).

The serving model's per-request CTR@k (or NDCG@k) also feeds a one-sided drift
detector (``monitors.drift.RankingDriftMonitor``, a CUSUM armed after a warm-up):
its drops are the slate pipeline's drift alarms (``RankingAlarm``), which the
monitor stage hands to the policy as the per-label error detector's would be.

A challenger's rankings of whole slates (``on_targets``: the monitor stage has
its latest published version rank one served slate in ``offpolicy_every``) give,
once their requests' clicks are in, its off-policy CTR@k: item-position SNIPS
from the logged propensities (``monitors.offpolicy``), over its last ``window``
ranked requests, with its interval.

ROC AUC and log loss over shown items are not here: a slate's evaluations are
ordinary per-item evaluations, so the monitor's windowed quality per candidate
(``monitors.quality.WindowedQuality``) already is exactly that.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from riverflow.monitors.drift import RankingDriftMonitor, RankingDriftSpec
from riverflow.monitors.history import MAX_POINTS
from riverflow.monitors.offpolicy import OffPolicyEstimator
from riverflow.monitors.view import RankingModelView, RankingPoint, RankingView

HEAD_SHARE = 0.1  # the "head" of popularity_share: this share of the most popular items


def dcg(gains: Sequence[float], k: int) -> float:
    """Discounted cumulative gain of the first ``k`` gains (log2 discount)."""
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))


def ndcg(gains: Sequence[float], k: int, ideal: Sequence[float] | None = None) -> float:
    """``dcg(gains)`` over the best DCG of the same gains (or of ``ideal``, all the
    relevant gains there were); 0 when there is nothing relevant."""
    best = dcg(sorted(ideal if ideal is not None else gains, reverse=True), k)
    return dcg(gains, k) / best if best > 0 else 0.0


class WindowMean:
    """The mean of the last ``size`` numbers, O(1) per number (the running sum is
    recomputed from the window once per ``size`` numbers, so float error does not pile up)."""

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.total = 0.0
        self.count = 0  # every number seen, not only those in the window

    def add(self, value: float) -> None:
        if len(self.values) == self.values.maxlen:
            self.total -= self.values[0]
        self.values.append(value)
        self.total += value
        self.count += 1
        if self.count % (self.values.maxlen or 1) == 0:
            self.total = sum(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def mean(self) -> float:
        return self.total / len(self.values) if self.values else 0.0


class ClickQuality:
    """CTR@k and NDCG@k of a ranking policy over its last ``window`` requests."""

    def __init__(self, window: int) -> None:
        self.ctr = WindowMean(window)
        self.ndcg = WindowMean(window)

    def add(
        self, clicks: Sequence[bool], k: int, gains: Sequence[float] | None = None
    ) -> tuple[float, float]:
        """One served request: the clicks on its top ``k`` in served order (and
        optionally graded gains of those items: default the clicks); its CTR@k and NDCG@k."""
        if len(clicks) < k:
            raise ValueError(f"clicks for {len(clicks)} of {k} shown positions")
        clicked = [float(bool(c)) for c in clicks[:k]]
        ctr = sum(clicked) / k
        gain = ndcg(list(gains[:k]) if gains is not None else clicked, k)
        self.ctr.add(ctr)
        self.ndcg.add(gain)
        return ctr, gain

    def __len__(self) -> int:
        return len(self.ctr)


class Exposure:
    """Coverage and popularity share of a ranking policy over its last ``window``
    served requests (see the module docstring); ``catalogue`` if the number of
    items is known, else the distinct candidates of the window.

    Finding the head sorts the window's distinct candidates (up to the catalogue),
    too much to do for every batch the monitor exports: the figures are
    recomputed once per twentieth of a window of requests, and read as they were
    in between.
    """

    def __init__(self, window: int, head: float = HEAD_SHARE, catalogue: int | None = None) -> None:
        if not 0 < head < 1:
            raise ValueError(f"head: {head}, need 0 < head < 1")
        self.head = head
        self.catalogue = catalogue
        self._rows: deque[tuple[tuple[str, ...], tuple[str, ...]]] = deque(maxlen=window)
        self._shown: Counter[str] = Counter()
        self._candidates: Counter[str] = Counter()
        self._every = max(1, window // 20)
        self._figures: dict[str, float] | None = None
        self._since = 0  # requests added since the figures were computed

    def add(self, shown: Sequence[str], candidates: Sequence[str]) -> None:
        """One served request: the items shown and every candidate (the shown ones
        among them: a shown item is a candidate even if not listed)."""
        row = (tuple(shown), tuple(dict.fromkeys([*candidates, *shown])))
        if len(self._rows) == self._rows.maxlen:
            old_shown, old_candidates = self._rows[0]
            _subtract(self._shown, old_shown)
            _subtract(self._candidates, old_candidates)
        self._rows.append(row)
        self._shown.update(row[0])
        self._candidates.update(row[1])
        self._since += 1

    def __len__(self) -> int:
        return len(self._rows)

    def as_dict(self) -> dict[str, float]:
        if not self._rows:
            return {}
        if self._figures is None or self._since >= self._every:
            self._figures, self._since = self._compute(), 0
        return dict(self._figures)

    def _compute(self) -> dict[str, float]:
        catalogue = self.catalogue or max(len(self._candidates), 1)
        head_size = max(1, math.ceil(self.head * len(self._candidates)))
        head = {item for item, _ in self._candidates.most_common(head_size)}
        slots = sum(self._shown.values())
        top = sum(n for item, n in self._shown.items() if item in head)
        return {"coverage": len(self._shown) / catalogue,
                "popularity_share": top / slots if slots else 0.0}  # fmt: skip


def _subtract(counts: Counter[str], items: Iterable[str]) -> None:
    for item in items:
        counts[item] -= 1
        if counts[item] <= 0:
            del counts[item]


class RankingQuality:
    """CTR@k, NDCG@k, coverage and popularity share of one ranking policy over the
    last ``window`` requests whose clicks are known (offline: the simulator, a demo)."""

    def __init__(self, k: int, window: int = 10_000, catalogue: int | None = None) -> None:
        if k < 1:
            raise ValueError(f"k: {k}, need at least 1")
        self.k = k
        self.clicks = ClickQuality(window)
        self.exposure = Exposure(window, HEAD_SHARE, catalogue)

    def add(
        self,
        ranking: Sequence[str],
        clicks: Sequence[bool],
        gains: Sequence[float] | None = None,
        candidates: Sequence[str] = (),
    ) -> None:
        """One served request: its ranking, the clicks on its shown top, optionally
        graded gains of the shown items (default: the clicks) and the candidates
        (default: the ranking)."""
        shown = ranking[: self.k]
        self.clicks.add(clicks, len(shown), gains)
        self.exposure.add(shown, candidates or ranking)

    def __len__(self) -> int:
        return len(self.clicks)

    def as_dict(self) -> dict[str, float]:
        if not len(self.clicks):
            return {}
        clicks = self.clicks
        return {f"ctr_at_{self.k}": clicks.ctr.mean(), f"ndcg_at_{self.k}": clicks.ndcg.mean(),
                **self.exposure.as_dict()}  # fmt: skip


# -- the monitor's side: evaluations grouped by request --------------------------------


@dataclass(frozen=True, slots=True)
class ShownItem:
    """One labelled shown item of a request, as its evaluation tells it."""

    item: str
    position: int
    clicked: bool
    propensity: float | None
    scores: Mapping[str, tuple[int, float]]  # candidate -> (version, its probability of a click)


@dataclass(frozen=True, slots=True)
class ServedRequest:
    """A request whose every shown item is labelled, its items in served order."""

    request: str
    items: tuple[ShownItem, ...]
    served: tuple[str, int] | None  # the model and version that served it, if known

    @property
    def clicks(self) -> list[bool]:
        return [i.clicked for i in self.items]

    def reranked_clicks(self, candidate: str) -> list[bool] | None:
        """The clicks in the order ``candidate``'s scores put the shown items (ties
        kept in served order); None unless it scored every one of them."""
        if not all(candidate in i.scores for i in self.items):
            return None
        order = sorted(self.items, key=lambda i: (-i.scores[candidate][1], i.position))
        return [i.clicked for i in order]


@dataclass
class _Open:
    shown: int
    items: dict[int, ShownItem] = field(default_factory=dict)  # by position
    served: tuple[str, int] | None = None


class OpenRequests:
    """Shown items grouped by request until all ``shown`` of them are labelled.

    At most ``capacity`` requests wait; beyond it the oldest (first seen) is
    dropped and counted in ``evicted``, and its id remembered (the last
    ``capacity`` of them) so that its later items are dropped too (``late``)
    instead of opening a request that could never complete. An item at a
    position already held (or beyond the ``shown`` its request's first item
    said) is counted in ``duplicates`` and ignored.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: {capacity}, need at least 1")
        self.capacity = capacity
        self._open: OrderedDict[str, _Open] = OrderedDict()
        self._dropped: OrderedDict[str, None] = OrderedDict()
        self.evicted = self.late = self.duplicates = self.completed = 0

    def add(
        self, request: str, shown: int, item: ShownItem, served: tuple[str, int] | None = None
    ) -> ServedRequest | None:
        """One labelled shown item; the request once this completes it, else None."""
        if request in self._dropped:
            self.late += 1
            return None
        entry = self._open.get(request)
        if entry is None:
            entry = self._open[request] = _Open(shown)
            while len(self._open) > self.capacity:
                old, _ = self._open.popitem(last=False)
                self.evicted += 1
                self._dropped[old] = None
                if len(self._dropped) > self.capacity:
                    self._dropped.popitem(last=False)
        if item.position in entry.items or item.position >= entry.shown:
            self.duplicates += 1
            return None
        entry.items[item.position] = item
        if entry.served is None:
            entry.served = served
        if len(entry.items) < entry.shown:
            return None
        del self._open[request]
        self.completed += 1
        items = tuple(entry.items[p] for p in sorted(entry.items))
        return ServedRequest(request, items, entry.served)

    def __len__(self) -> int:
        return len(self._open)


@dataclass
class _Window:
    """A model's windows, and when it last had a request (``last``: the monitor's
    count of completed requests, or of served slates, then)."""

    version: int
    last: int
    clicks: ClickQuality | None = None
    exposure: Exposure | None = None
    reranked: WindowMean | None = None
    offpolicy: OffPolicyEstimator | None = None
    drift: RankingDriftMonitor | None = None


@dataclass(frozen=True, slots=True)
class RankingAlarm:
    """A drop of a serving model's ranking quality (``RankingDriftMonitor``), for the
    monitor's policy: ``evidence`` names the signal and its levels."""

    model: str
    version: int
    request: str  # the completed request that tripped it
    reason: str
    evidence: dict[str, object]


class RankingMonitor:
    """The ranking metrics of a slate pipeline per model (see the module docstring).

    Fed by the monitor stage: ``on_item`` with every labelled shown item (its
    evaluation), ``on_slate`` with every served slate (its prediction). A model
    that served nothing for a whole ``window`` of requests leaves the served
    figures; a candidate that scored none in a window leaves the re-ranked ones.
    Every twentieth of a window of completed requests, each model's figures
    are kept as a point of its series (the page's chart).

    Each serving model's completed requests also feed its drift detector
    (``drift``: ``monitors.drift.RankingDriftMonitor``, on the request's CTR@k or
    NDCG@k), made with its served window: a model that starts serving, or serves
    again after a window idle, warms it up from scratch, and so does a rollback
    (the version it serves going back). A drop is queued in ``alarms``, read by
    the stage with ``take_alarms``; ``drift=None`` leaves the detectors out.
    """

    def __init__(
        self,
        window: int,
        open_requests: int,
        head: float = HEAD_SHARE,
        clock: Callable[[], float] = time.time,
        drift: RankingDriftSpec | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window: {window}, need at least 1")
        self.window = window
        self.drift = drift
        self.alarms: list[RankingAlarm] = []
        self.head = head
        self.clock = clock
        self.series: dict[str, list[RankingPoint]] = {}
        self.open = OpenRequests(open_requests)
        self.k = 0
        self.slates = 0
        self._served: dict[str, _Window] = {}  # serving model -> CTR@k, NDCG@k
        self._exposed: dict[str, _Window] = {}  # serving model -> coverage, popularity
        self._reranked: dict[str, _Window] = {}  # candidate -> NDCG@k of its re-ranking
        # served requests a challenger ranked in the shadow: request -> {name: (version,
        # its top k)}, until the request completes (as many as requests may wait)
        self._targets: OrderedDict[str, dict[str, tuple[int, tuple[str, ...]]]] = OrderedDict()
        self._offpolicy: dict[str, _Window] = {}  # challenger -> its off-policy estimator
        self.targets_dropped = 0  # shadow rankings dropped before their request completed

    def on_item(
        self,
        request: str,
        shown: int,
        item: ShownItem,
        served: tuple[str, int] | None,
        counted: bool = False,
    ) -> ServedRequest | None:
        """One labelled shown item; the request if this completed it. ``counted``: the
        item was read again after a restart, and the drift detectors restored
        (``restore_drift``) had counted the request it completes, if it completes one
        (its items were all read before, then)."""
        done = self.open.add(request, shown, item, served)
        if done is not None:
            self._complete(done, counted)
        return done

    def drift_memory(self) -> dict[str, Any]:
        """Each serving model's drift detector (``restore_drift`` takes them back): a
        fresh one after a restart takes the level it sees then as its reference, and a
        monitor restarted after the served quality fell never raised the alarm."""
        return {model: {"version": w.version, "detector": w.drift.state()}
                for model, w in self._served.items() if w.drift is not None}  # fmt: skip

    def restore_drift(self, memory: object) -> None:
        """The drift detectors ``drift_memory`` saved (those of this spec's detector)."""
        if self.drift is None or not isinstance(memory, dict):
            return
        for model, saved in memory.items():
            if model in self._served or not isinstance(saved, dict):
                continue
            try:
                version = int(saved["version"])
            except (KeyError, TypeError, ValueError):
                continue
            detector = RankingDriftMonitor.restored(self.drift, saved.get("detector") or {})
            if detector is not None:
                w = _Window(version, self.open.completed, clicks=ClickQuality(self.window))
                w.drift = detector
                self._served[str(model)] = w

    def _complete(self, req: ServedRequest, counted: bool = False) -> None:
        k = len(req.items)
        self.k = max(self.k, k)
        n = self.open.completed
        if req.served is not None:
            model, version = req.served
            w = self._served.get(model)
            if w is None:
                w = self._served[model] = _Window(version, n, clicks=ClickQuality(self.window))
                if self.drift is not None:
                    w.drift = RankingDriftMonitor(self.drift)
            if w.drift is not None and version < w.version:
                w.drift.reset()  # rolled back: the level of an earlier version is its own
            w.version, w.last = version, n
            assert w.clicks is not None
            ctr, gain = w.clicks.add(req.clicks, k)
            if w.drift is not None and not counted:
                value = ctr if w.drift.spec.signal == "ctr" else gain
                self._detect(w.drift, model, version, req.request, value)
        for name, (version, _) in req.items[0].scores.items():
            clicks = req.reranked_clicks(name)
            if clicks is None:
                continue
            w = self._reranked.get(name)
            if w is None:
                w = self._reranked[name] = _Window(version, n, reranked=WindowMean(self.window))
            w.version, w.last = version, n
            assert w.reranked is not None
            w.reranked.add(ndcg([float(c) for c in clicks], k))
        self._estimate(req, k, n)
        _forget_idle(self._served, n, self.window)
        _forget_idle(self._reranked, n, self.window)
        _forget_idle(self._offpolicy, n, self.window)
        if n % max(1, self.window // 20) == 0:
            self._sample(n)

    def _detect(self, detector: RankingDriftMonitor, model: str, version: int, request: str,
                value: float) -> None:  # fmt: skip
        if not detector.update(value):
            return
        signal = f"{detector.spec.signal}_at_k"
        last = detector.last
        reason = (f"{signal} of {model}'s served rankings fell from "
                  f"{last['level_before']:.3f} to {last['level_after']:.3f} over its last "
                  f"{last['after_requests']:.0f} requests")  # fmt: skip
        evidence: dict[str, object] = {"detector": "ranking_cusum", "signal": signal,
                                       "request": request, **last}  # fmt: skip
        self.alarms.append(RankingAlarm(model, version, request, reason, evidence))

    def take_alarms(self) -> list[RankingAlarm]:
        """The drops detected since the last call (oldest first)."""
        alarms, self.alarms = self.alarms, []
        return alarms

    def on_targets(self, request: str, targets: Mapping[str, tuple[int, Sequence[str]]]) -> None:
        """Challengers' own rankings of a served request's whole slate: name -> (the
        version that ranked it, its top items); estimated off-policy once the
        request's clicks are in. At most as many wait as requests may; oldest dropped."""
        self._targets[request] = {n: (v, tuple(top)) for n, (v, top) in targets.items()}
        while len(self._targets) > self.open.capacity:
            self._targets.popitem(last=False)
            self.targets_dropped += 1

    def _estimate(self, req: ServedRequest, k: int, n: int) -> None:
        """Item-position SNIPS of each challenger that ranked ``req``
        (``monitors.offpolicy``), from the logged propensities."""
        targets = self._targets.pop(req.request, None)
        propensities = [i.propensity for i in req.items]
        if targets is None or any(p is None for p in propensities):
            return
        shown = [i.item for i in req.items]
        for name, (version, top) in targets.items():
            w = self._offpolicy.get(name)
            if w is None:
                estimator = OffPolicyEstimator(positions=k, window=self.window)
                w = self._offpolicy[name] = _Window(version, n, offpolicy=estimator)
            assert w.offpolicy is not None
            if k < w.offpolicy.positions:
                continue  # a shorter slate than the estimator's: no value at every position
            w.version, w.last = version, n
            w.offpolicy.add(shown, cast(list[float], propensities), req.clicks, top)

    def _sample(self, n: int) -> None:
        now = self.clock()
        for m in self._models():
            points = self.series.setdefault(m.name, [])
            points.append(RankingPoint(requests=n, at=now, version=m.version,
                                       metrics=m.metrics))  # fmt: skip
            if len(points) > MAX_POINTS:
                del points[::2]

    def on_slate(self, model: str, version: int, shown: Sequence[str],
                 candidates: Sequence[str]) -> None:  # fmt: skip
        """A served slate: the items shown, in order, and every candidate."""
        self.slates += 1
        w = self._exposed.get(model)
        if w is None:
            w = self._exposed[model] = _Window(
                version, self.slates, exposure=Exposure(self.window, self.head)
            )
        w.version, w.last = version, self.slates
        assert w.exposure is not None
        w.exposure.add(shown, candidates)
        _forget_idle(self._exposed, self.slates, self.window)

    def forget(self, name: str) -> None:
        """A retired candidate: its re-ranked figures and its series go."""
        self._reranked.pop(name, None)
        self._offpolicy.pop(name, None)
        self.series.pop(name, None)

    def view(self, champion: str, series: bool = True) -> RankingView:
        """The ranking panel; ``champion``: the name of the serving candidate;
        ``series=False`` leaves out the chart's points."""
        models = self._models(champion)
        o = self.open
        requests = {"open": len(o), "capacity": o.capacity, "completed": o.completed,
                    "evicted": o.evicted, "late": o.late, "duplicates": o.duplicates,
                    "shadow_waiting": len(self._targets),
                    "shadow_dropped": self.targets_dropped}  # fmt: skip
        shown = {n: list(p) for n, p in self.series.items()} if series else {}
        return RankingView(k=self.k, window=self.window, models=models, requests=requests,
                           series=shown)  # fmt: skip

    def _models(self, champion: str | None = None) -> list[RankingModelView]:
        """Every model's figures. A model's version is the candidate's (as the monitor's
        quality names it), else the one it served."""
        models = []
        names = [*self._reranked, *self._served, *self._exposed, *self._offpolicy]
        for name in dict.fromkeys(names):
            metrics: dict[str, float] = {}
            versions, served, reranked = [], 0, 0
            if (w := self._reranked.get(name)) is not None and w.reranked is not None:
                versions.append(w.version)
                reranked = len(w.reranked)
                metrics["rerank_ndcg_at_k"] = w.reranked.mean()
            if (w := self._served.get(name)) is not None and w.clicks is not None:
                versions.append(w.version)
                served = len(w.clicks)
                metrics["ctr_at_k"] = w.clicks.ctr.mean()
                metrics["ndcg_at_k"] = w.clicks.ndcg.mean()
            if (w := self._exposed.get(name)) is not None and w.exposure is not None:
                versions.append(w.version)
                metrics.update(w.exposure.as_dict())
            if (w := self._offpolicy.get(name)) is not None and w.offpolicy is not None:
                versions.append(w.version)
                metrics.update(_offpolicy_figures(w.offpolicy))
            role: Literal["champion", "challenger"] = (
                "champion" if name == champion else "challenger"
            )
            models.append(RankingModelView(name=name, role=role, version=versions[0],
                                           served=served, reranked=reranked,
                                           metrics=metrics))  # fmt: skip
        return models


def _offpolicy_figures(estimator: OffPolicyEstimator) -> dict[str, float]:
    """SNIPS of a challenger's clicks per request as CTR@k (per shown slot, as the served
    ``ctr_at_k``) with its interval, and how many requests and matches it rests on
    (no value until every position was matched at least once)."""
    est = estimator.snips()
    k = estimator.positions
    out = {"offpolicy_requests": float(est.requests), "offpolicy_matched": float(est.matched)}
    if math.isfinite(est.value):  # the interval within what a CTR can be
        out |= {"offpolicy_ctr_at_k": est.value / k, "offpolicy_ctr_low": max(0.0, est.low / k),
                "offpolicy_ctr_high": min(1.0, est.high / k)}  # fmt: skip
    return out


def _forget_idle(windows: dict[str, _Window], now: int, window: int) -> None:
    for name in [n for n, w in windows.items() if now - w.last > window]:
        del windows[name]
