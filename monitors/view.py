"""What the monitor shows: one JSON document behind the status page and the report.

The monitor stage keeps a ``MonitorView`` up to date; the status page serves it
at ``/status.json`` and draws it, and ``riverflow report`` renders the same
document into a self-contained HTML file and a PNG plot.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from riverflow.errors import error_lines
from riverflow.monitors.errors import ViewError

MarkerKind = Literal[
    "drift", "challenger", "promote", "rollback", "retire", "feature_drift", "search", "prune"
]


class CandidateView(BaseModel):
    """One candidate as the monitor sees it over its recent labelled events."""

    name: str
    role: Literal["champion", "challenger"]
    version: int  # the last published version its live model descends from (0: none yet)
    labels: int  # labelled events the monitor has seen for it
    # windowed, by the label's kind: accuracy, precision, recall, f1, roc_auc, log_loss
    # (bool); accuracy, macro_f1, log_loss (category); mae, rmse, r2 (int, float)
    metrics: dict[str, float]
    drift_alarms: int = 0
    base: str | None = None  # for a fresh challenger: the spec candidate it was started from


class SeriesPoint(BaseModel):
    """One point of a candidate's windowed metric over time."""

    labels: int  # monitor's count of labelled events when the point was taken (the x axis)
    at: float  # unix seconds
    version: int
    value: float  # the view's ``metric`` over the window ending here


class Marker(BaseModel):
    """A decision or alarm, drawn as a vertical line on the charts."""

    labels: int
    at: float
    kind: MarkerKind
    model: str
    text: str  # one line: what happened and the evidence


class SegmentView(BaseModel):
    field: str
    metric: str
    by: dict[str, dict[str, float]]  # segment value -> {"n": count, metric: value}
    gap: float  # largest difference of the metric between two segments with enough labels


class DistributionView(BaseModel):
    """Label-free drift of one input (a feature, or ``score`` for the probability)."""

    statistic: float  # two-sample Kolmogorov-Smirnov statistic, reference vs recent window
    p_value: float
    alarms: int


class RungView(BaseModel):
    """One pruning decision of a search: every configuration's metric at the rung."""

    rung: int
    budget: int  # labels each configuration alive learned in this rung
    labels: int  # labels of the round when it was judged
    scores: dict[str, float | None]  # configuration -> its prequential metric (None: none yet)
    kept: list[str]


class SearchView(BaseModel):
    """A candidate's online model search (``models.search``): its current round."""

    base: str
    round: int
    metric: str
    configurations: list[str]
    rungs: list[RungView] = Field(default_factory=list)
    done: bool = False


class RankingModelView(BaseModel):
    """One model's ranking metrics (``monitors.ranking``), over its recent requests."""

    name: str
    role: Literal["champion", "challenger"]
    # the candidate's current version (as ``CandidateView``), else the version it served
    version: int
    served: int  # completed requests it served in the window (0: it ranks in the shadow)
    reranked: int  # completed requests whose shown items it scored, in the window
    # ctr_at_k, ndcg_at_k (served ranking), coverage, popularity_share (a model that
    # served); rerank_ndcg_at_k (every candidate: the shown items in its own order)
    metrics: dict[str, float]


class RankingPoint(BaseModel):
    """A model's ranking metrics when the monitor had completed ``requests`` requests."""

    requests: int
    at: float  # unix seconds
    version: int
    metrics: dict[str, float]


class RankingView(BaseModel):
    """A slate pipeline's ranking panel: the metrics per model and the request buffer."""

    k: int  # shown items per request (the largest seen)
    window: int  # completed requests (served slates) per window
    models: list[RankingModelView] = Field(default_factory=list)
    # requests: open (awaiting labels), capacity, shadow_waiting (ranked by the
    # challengers, awaiting labels), and since the monitor started: completed, evicted
    # (the buffer was full), late (items of an evicted request), duplicates (a position
    # labelled twice), shadow_dropped (challengers' rankings dropped, the buffer full)
    requests: dict[str, int] = Field(default_factory=dict)
    series: dict[str, list[RankingPoint]] = Field(default_factory=dict)  # by model


class MonitorView(BaseModel):
    pipeline: str
    updated: float
    metric: str = "accuracy"  # what ``series`` holds (a regressor's: mae)
    window: int  # labelled events per sliding window
    champion: dict[str, str | int] | None  # {"model", "version"} as the registry says
    candidates: list[CandidateView] = Field(default_factory=list)
    series: dict[str, list[SeriesPoint]] = Field(default_factory=dict)
    markers: list[Marker] = Field(default_factory=list)
    segments: SegmentView | None = None
    distributions: dict[str, DistributionView] = Field(default_factory=dict)
    anomaly: dict[str, float] = Field(default_factory=dict)  # HalfSpaceTrees: mean, p99 score
    # over the last predictions: per input field the share missing and the share each
    # cleaning rule changed; freshness (monitors.dataquality)
    data_quality: dict[str, Any] = Field(default_factory=dict)
    searches: dict[str, SearchView] = Field(default_factory=dict)  # by searched candidate
    ranking: RankingView | None = None  # a slate pipeline's only


def parse_view(raw: bytes | str, source: str = "view") -> MonitorView:
    """Validate a JSON ``MonitorView``; raise ``ViewError`` naming what is wrong and where."""
    try:
        return MonitorView.model_validate_json(raw)
    except ValidationError as exc:
        lines = "\n".join(f"  {line}" for line in error_lines(exc))
        raise ViewError(f"{source} is not a monitor view:\n{lines}") from None
