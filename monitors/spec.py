"""How the pipeline spec declares its monitor: windows, detectors and policies.

Every field has a default, so a spec without a ``monitors:`` section gets a
monitor that watches quality and drift, starts a fresh challenger on a drift
alarm of the champion, promotes a challenger that is significantly better,
and rolls the champion back when it drops sharply.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from riverflow.models.errors import ModelSpecError
from riverflow.monitors.drift import DetectorSpec, RankingDriftSpec, build_detector


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromotePolicy(_Frozen):
    """Promote a challenger that beats the champion on the same recent labelled events."""

    enabled: bool = True
    min_labels: int = Field(
        500, ge=10, description="paired events of warm-up before the test counts (and labels "
        "the challenger's version must have learned)",
    )  # fmt: skip
    margin: float = Field(
        0.005, ge=0, le=1, description="accuracy the challenger must gain over the last window"
    )
    alpha: float = Field(
        0.001, gt=0, lt=1,
        description="chance of ever promoting a challenger that is not better (e-process)",
    )  # fmt: skip


class RollbackPolicy(_Frozen):
    """Roll the champion back to its last good version when it degrades, if that version
    does better on the recent labels (shadow-scored there before the pointer moves)."""

    enabled: bool = True
    window: int = Field(200, ge=20, description="recent labelled events the check looks at")
    drop: float = Field(
        0.1, gt=0, le=1, description="accuracy fall below the level of its last good version"
    )
    floor: float | None = Field(None, ge=0, le=1, description="accuracy below this: roll back")
    alpha: float = Field(
        0.01, gt=0, lt=1,
        description="sign test level: the target must beat the champion on the recent labels",
    )  # fmt: skip


class ChallengerPolicy(_Frozen):
    """On a drift alarm of the champion, start a fresh challenger (same spec, reset state)."""

    on_drift: bool = True
    max: int = Field(2, ge=0, description="fresh challengers alive at once (oldest retired)")
    patience: int = Field(
        10_000, ge=100, description="labelled events a fresh challenger gets to win; then retired"
    )


class LabelFreeSpec(_Frozen):
    """Drift in the feature and score distributions, and input anomaly scores."""

    enabled: bool = True
    reference: int = Field(2_000, ge=50, description="predictions in the reference window")
    window: int = Field(1_000, ge=50, description="predictions in the recent window")
    every: int = Field(500, ge=1, description="test every this many predictions")
    alpha: float = Field(1e-4, gt=0, lt=1, description="KS test level (per input, per test)")
    anomaly: bool = Field(True, description="score inputs with River's HalfSpaceTrees")
    anomaly_every: int = Field(
        10, ge=1, description="score every n-th prediction (HalfSpaceTrees: ~200 µs each)"
    )


class QualitySpec(_Frozen):
    """Data quality as the scorer counts it (``riverflow.stages.quality``)."""

    window: int = Field(1_000, ge=10, description="events per window of the field rates")
    schema_missing_rate: float = Field(
        0.2, gt=0, lt=1, description="a field missing in more of a window is a schema change"
    )


class RankingSpec(_Frozen):
    """Ranking metrics of a slate pipeline (``monitors.ranking``): read from the
    evaluations that name a ``request`` and the slates served; unused otherwise."""

    window: int = Field(
        2_000, ge=10, description="completed requests per window of CTR@k and NDCG@k, and "
        "served slates per window of coverage and popularity share",
    )  # fmt: skip
    open_requests: int = Field(
        100_000, ge=10, description="requests held until all their shown items are labelled "
        "(clicks come early, timeout negatives late); beyond it the oldest is dropped, counted",
    )  # fmt: skip
    head: float = Field(
        0.1, gt=0, lt=1, description="popularity_share counts the slots of this share of the "
        "most popular items (the most frequent candidates of the window)",
    )  # fmt: skip
    offpolicy_every: int = Field(
        10, ge=1, description="every n-th served slate, each challenger's latest version ranks "
        "its whole slate for the off-policy estimate (a prediction per candidate item)",
    )  # fmt: skip
    drift: RankingDriftSpec = Field(default_factory=RankingDriftSpec)


class MonitorSpec(_Frozen):
    window: int = Field(1_000, ge=20, description="labelled events per sliding quality window")
    detector: DetectorSpec = Field(default_factory=DetectorSpec)
    promote: PromotePolicy = Field(default_factory=PromotePolicy)
    rollback: RollbackPolicy = Field(default_factory=RollbackPolicy)
    challengers: ChallengerPolicy = Field(default_factory=ChallengerPolicy)
    cooldown: int = Field(
        1_000, ge=0, description="labelled events after a decision before the next one"
    )
    segment: str | None = Field(None, description="event field whose values are compared")
    segment_min_labels: int = Field(100, ge=1, description="labels a segment needs to count")
    label_free: LabelFreeSpec = Field(default_factory=LabelFreeSpec)
    quality: QualitySpec = Field(default_factory=QualitySpec)
    ranking: RankingSpec = Field(default_factory=RankingSpec)

    @model_validator(mode="after")
    def _check(self) -> MonitorSpec:
        if self.rollback.window > self.window:
            raise ValueError("rollback.window: must not exceed window")
        try:
            build_detector(self.detector)
        except ModelSpecError as exc:
            raise ValueError(f"detector: {exc}") from None
        return self
