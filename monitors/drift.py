"""Concept-drift detection on a model's error stream.

River's detectors by name (ADWIN by default, checking after every error;
DDM, Page-Hinkley, KSWIN). A model
that gets better is no alarm: ``ErrorDriftMonitor`` raises one only when the
error rate went up. ADWIN flags any change of its window mean, so its alarms
are kept when the mean rose; Page-Hinkley is built in ``mode="up"``; DDM only
detects rises; KSWIN compares distributions and has no direction (each of its
alarms counts).

A slate pipeline's drift is a drop of the served ranking's quality per request
instead (``RankingDriftMonitor``, a one-sided CUSUM armed after a warm-up; the
spec's ``monitors.ranking.drift``): its per-item labels are mostly negatives, and
their error rate barely moves when what users like changes.
"""

from __future__ import annotations

import base64
import logging
import math
import pickle
from enum import StrEnum
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from river import base

from riverflow.models.errors import ModelSpecError, SignatureError
from riverflow.models.signing import Keys, sign, verify_and_load

log = logging.getLogger(__name__)

# what taking back a saved detector may raise: a field missing or of a wrong type, bad
# base64, a signature of another key, a pickle a River upgrade cannot load
_UNREADABLE = (KeyError, TypeError, ValueError, AttributeError, ImportError,
               pickle.UnpicklingError, SignatureError)  # fmt: skip


class DetectorKind(StrEnum):
    ADWIN = "adwin"
    DDM = "ddm"
    PAGE_HINKLEY = "page_hinkley"
    KSWIN = "kswin"


def _detector_class(kind: DetectorKind) -> Any:
    # river.drift imports scipy.stats (~0.8 s, for KSWIN) when first imported: a stage
    # that builds a detector pays it, a command that only reads a spec does not
    from river import drift

    return {
        DetectorKind.ADWIN: drift.ADWIN,
        DetectorKind.DDM: drift.binary.DDM,
        DetectorKind.PAGE_HINKLEY: drift.PageHinkley,
        DetectorKind.KSWIN: drift.KSWIN,
    }[kind]


class DetectorSpec(BaseModel):
    """``{kind: adwin, params: {delta: 0.002}}``: parameters are the River class's own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: DetectorKind = DetectorKind.ADWIN
    params: dict[str, Any] = Field(default_factory=dict)


def build_detector(spec: DetectorSpec) -> base.DriftDetector | base.BinaryDriftDetector:
    cls = _detector_class(spec.kind)
    params = dict(spec.params)
    if spec.kind is DetectorKind.PAGE_HINKLEY:
        params.setdefault("mode", "up")
    if spec.kind is DetectorKind.ADWIN:
        # look for a cut after every error, not every 32nd (River's default): an
        # alarm up to 31 labels sooner, no more false ones (1,000,000 stationary
        # errors at 2% and 10%: none either way)
        params.setdefault("clock", 1)
    try:
        detector: base.DriftDetector | base.BinaryDriftDetector = cls(**params)
    except (TypeError, ValueError) as exc:
        raise ModelSpecError(f"drift detector {spec.kind.value}: bad parameters ({exc})") from exc
    return detector


class ErrorDriftMonitor:
    """Feeds a model's errors (0/1, or a regressor's absolute errors) to a detector;
    ``update`` is True on a rise of the error rate (the mean error)."""

    def __init__(self, spec: DetectorSpec | None = None) -> None:
        self.spec = spec or DetectorSpec()
        self.detector = build_detector(self.spec)
        self._adwin = self.spec.kind is DetectorKind.ADWIN
        self.alarms = 0

    def statistic(self) -> dict[str, float]:
        """What the detector measures now: ADWIN's error estimate and window width,
        DDM's lowest error rate and its deviation, Page-Hinkley's cumulative sum and
        its minimum, KSWIN's p-value (River's attributes; those a detector lacks are left out)."""
        out = {}
        names = ("estimation", "width", "_p_min", "_s_min", "_sum_increase", "_min_increase",
                 "p_value")  # fmt: skip
        for name in names:
            value = getattr(self.detector, name, None)
            if isinstance(value, int | float | np.floating) and not isinstance(value, bool):
                out[name.lstrip("_")] = round(float(value), 6)
        return out

    def state(self, keys: Keys) -> dict[str, Any]:
        """What ``restored`` takes back: the detector's spec, its alarms, and the
        detector itself (a River object: a pickle signed with ``keys``, in base64)."""
        blob = base64.b64encode(sign(self.detector, keys)).decode()
        return {"spec": self.spec.model_dump(mode="json"), "alarms": self.alarms,
                "detector": blob}  # fmt: skip

    @classmethod
    def restored(
        cls, spec: DetectorSpec, state: dict[str, Any], keys: Keys
    ) -> ErrorDriftMonitor | None:
        """The monitor ``state()`` saved, if it is of a detector ``spec`` builds (a
        detector of other parameters says nothing of this one's) and signed with a key
        of ``keys``; None otherwise (it cannot be read, or is refused: logged)."""
        try:
            if DetectorSpec.model_validate(state["spec"]) != spec:
                return None
            alarms = int(state["alarms"])
            detector = verify_and_load(base64.b64decode(state["detector"], validate=True), keys)
        except _UNREADABLE as exc:
            log.warning("a saved drift detector is not readable, a fresh one used: %s", exc)
            return None
        kind = _detector_class(spec.kind)
        if type(detector) is not kind:
            log.warning("a saved drift detector is a %s, not a %s: a fresh one used",
                        type(detector).__name__, kind.__name__)  # fmt: skip
            return None
        monitor = cls(spec)
        monitor.detector, monitor.alarms = detector, alarms
        return monitor

    def update(self, error: float) -> bool:
        """One model's loss on a label (0/1, or an absolute error): True on a rise."""
        detector = self.detector
        adwin: Any = detector if self._adwin else None  # its error estimate, before
        before = adwin.estimation if adwin is not None else 0.0
        if isinstance(detector, base.BinaryDriftDetector):
            detector.update(bool(error))
        else:
            detector.update(error)
        if not detector.drift_detected:
            return False
        if adwin is not None and adwin.estimation <= before:
            return False  # the error rate fell: the model got better, no alarm
        self.alarms += 1
        return True


# -- a slate pipeline's drift: the served ranking's quality per request -------------------


class RankingDriftSpec(BaseModel):
    """The drift detector of a slate pipeline (``RankingDriftMonitor``): a one-sided
    CUSUM on a per-request quality of the served ranking, armed after a warm-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    signal: Literal["ctr", "ndcg"] = Field(
        "ctr", description="per completed request: ctr (clicks on the shown top k / k) or "
        "ndcg (NDCG@k of the served order, the clicks as relevance; 0 without a click)",
    )  # fmt: skip
    reference: int = Field(
        2_000, ge=10, description="requests the reference level and spread follow (an "
        "exponential average over about this many)",
    )  # fmt: skip
    allowance: float = Field(
        0.25, gt=0, description="k: a drop below the reference of more than this many "
        "standard deviations accumulates",
    )  # fmt: skip
    threshold: float = Field(
        20.0, gt=0, description="h: an alarm when the accumulated drop exceeds this many "
        "standard deviations",
    )  # fmt: skip
    min_requests: int = Field(
        2_000, ge=1, description="requests the serving model completes with no drop before "
        "an alarm can fire (a cold model's quality rises and swings as it learns: a drop "
        "before that starts the warm-up again)",
    )  # fmt: skip


MIN_SPREAD = 0.01  # the standard deviation a constant signal is read with
SETTLE = 100  # requests of a reference (its level and spread) before the sum starts


class RankingDriftMonitor:
    """A drop of the served ranking's quality, one request at a time (``update``: its
    ``RankingDriftSpec.signal``, in [0, 1]).

    A lower one-sided CUSUM (Page's): each request's shortfall from the reference
    level, in standard deviations less the allowance ``k``, is summed (never below
    0) and an alarm raised when the sum exceeds ``h``. The reference level and
    spread are exponential averages over about ``reference`` requests, so they follow
    a model that learns (its quality rising, which no lower CUSUM alarms on) while a
    sudden drop is summed within tens of requests, long before the reference moves.
    With k = 0.25 and h = 20 a stationary normal signal raises one false alarm in
    about 300,000 requests (Siegmund's approximation), and a drop of one standard
    deviation is found in about 30 requests. ADWIN, the per-label detector, has no
    direction (its cuts drop the oldest buckets, and its mean after a cut is not the
    recent level), and Page-Hinkley measures from the mean since its start, which a
    model learning from cold keeps below its level; both need thresholds in the
    signal's units, this one's are in its standard deviations.

    The warm-up: the sum starts after ``SETTLE`` requests (a reference to measure
    from), and it alarms only once ``min_requests`` requests passed with no drop (the
    level has settled: the quality of a cold model rises, or swings while it
    learns); a drop before that starts the warm-up again, from the new level. After
    an alarm the detector starts again and warms up anew as well: a model relearning
    after a drift is not a second one.
    """

    def __init__(self, spec: RankingDriftSpec | None = None) -> None:
        self.spec = spec or RankingDriftSpec()
        self.alarms = 0
        self.restarts = 0  # drops while warming up: the warm-up started again
        self.last: dict[str, float] = {}  # the last alarm's figures
        self.reset()

    def reset(self) -> None:
        """Warm up again (a new level is expected: the serving version was rolled back)."""
        self.requests = 0  # values seen since the reset
        self.mean = 0.0  # the reference level
        self.var = 0.0  # and the squared spread around it
        self.cusum = 0.0
        self.run = (0, 0.0)  # values (count, sum) since the sum last left 0

    @property
    def armed(self) -> bool:
        return self.requests >= self.spec.min_requests

    def _spread(self) -> float:
        return max(math.sqrt(self.var), MIN_SPREAD)

    def state(self) -> dict[str, Any]:
        """What ``restored`` takes back (plain numbers)."""
        return {"spec": self.spec.model_dump(mode="json"), "requests": self.requests,
                "mean": self.mean, "var": self.var, "cusum": self.cusum, "run": list(self.run),
                "alarms": self.alarms, "restarts": self.restarts, "last": self.last}  # fmt: skip

    @classmethod
    def restored(cls, spec: RankingDriftSpec, state: dict[str, Any]) -> RankingDriftMonitor | None:
        """The detector ``state()`` saved, if of ``spec`` (None otherwise, or if it
        cannot be read: logged)."""
        try:
            if RankingDriftSpec.model_validate(state["spec"]) != spec:
                return None
            detector = cls(spec)
            detector.requests = int(state["requests"])
            detector.mean, detector.var = float(state["mean"]), float(state["var"])
            detector.cusum = float(state["cusum"])
            n, total = state["run"]
            detector.run = (int(n), float(total))
            detector.alarms, detector.restarts = int(state["alarms"]), int(state["restarts"])
            detector.last = {str(k): float(v) for k, v in state["last"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("a saved ranking drift detector is not readable, a fresh one used: %s",
                        exc)  # fmt: skip
            return None
        return detector

    def update(self, value: float) -> bool:
        """One completed request's quality: True on a drop (then the detector restarts)."""
        if not 0.0 <= value <= 1.0:  # (a NaN too)
            raise ValueError(f"a per-request ranking quality in [0, 1], not {value!r}")
        spec = self.spec
        if self.requests >= SETTLE:
            shortfall = (self.mean - value) / self._spread() - spec.allowance
            self.cusum = max(0.0, self.cusum + shortfall)
            n, total = self.run
            self.run = (n + 1, total + value) if self.cusum > 0 else (0, 0.0)
            if self.cusum > spec.threshold and not self.armed:
                self.restarts += 1  # a drop while warming up: the level is not settled yet
                self.reset()
            elif self.cusum > spec.threshold:
                n, total = self.run
                self.alarms += 1
                self.last = {"level_before": round(self.mean, 6),
                             "level_after": round(total / n, 6), "after_requests": float(n),
                             "spread": round(self._spread(), 6), "cusum": round(self.cusum, 6),
                             "requests": float(self.requests + 1),
                             "warmup_restarts": float(self.restarts)}  # fmt: skip
                self.reset()
                return True
        # the reference: the running mean and variance at first, then exponential
        self.requests += 1
        weight = 1.0 / min(self.requests, spec.reference)
        deviation = value - self.mean
        self.mean += weight * deviation
        self.var = (1 - weight) * (self.var + weight * deviation * deviation)
        return False
