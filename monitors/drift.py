"""Concept-drift detection on a model's error stream.

River's detectors by name (ADWIN by default, checking after every error;
DDM, Page-Hinkley, KSWIN). A model
that gets better is no alarm: ``ErrorDriftMonitor`` raises one only when the
error rate went up. ADWIN flags any change of its window mean, so its alarms
are kept when the mean rose; Page-Hinkley is built in ``mode="up"``; DDM only
detects rises; KSWIN compares distributions and has no direction (each of its
alarms counts).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from river import base, drift

from riverflow.models.errors import ModelSpecError


class DetectorKind(StrEnum):
    ADWIN = "adwin"
    DDM = "ddm"
    PAGE_HINKLEY = "page_hinkley"
    KSWIN = "kswin"


_CLASSES: dict[DetectorKind, Any] = {
    DetectorKind.ADWIN: drift.ADWIN,
    DetectorKind.DDM: drift.binary.DDM,
    DetectorKind.PAGE_HINKLEY: drift.PageHinkley,
    DetectorKind.KSWIN: drift.KSWIN,
}


class DetectorSpec(BaseModel):
    """``{kind: adwin, params: {delta: 0.002}}``: parameters are the River class's own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: DetectorKind = DetectorKind.ADWIN
    params: dict[str, Any] = Field(default_factory=dict)


def build_detector(spec: DetectorSpec) -> base.DriftDetector | base.BinaryDriftDetector:
    cls = _CLASSES[spec.kind]
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

    def update(self, error: float) -> bool:
        """One model's loss on a label (0/1, or an absolute error): True on a rise."""
        detector = self.detector
        before = detector.estimation if isinstance(detector, drift.ADWIN) else 0.0
        if isinstance(detector, base.BinaryDriftDetector):
            detector.update(bool(error))
        else:
            detector.update(error)
        if not detector.drift_detected:
            return False
        if isinstance(detector, drift.ADWIN) and detector.estimation <= before:
            return False  # the error rate fell: the model got better, no alarm
        self.alarms += 1
        return True
