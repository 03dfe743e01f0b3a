"""The monitor's brain: quality per candidate, drift alarms, and the decisions they lead to.

``PipelineMonitor`` is fed the learner's evaluations (a label and every
candidate's prequential prediction) and the scorer's predictions, and applies
the spec's policies to the registry while traffic flows:

- **drift**: each candidate's 0/1 errors go to a detector (ADWIN by default);
  an alarm of the champion starts a *fresh challenger* (the champion's spec,
  reset state), at most ``challengers.max`` alive, each retired after
  ``challengers.patience`` labelled events unless promoted;
- **promote**: a challenger right more often than the champion on the same
  recent labelled events, by ``promote.margin`` and with McNemar's test below
  ``promote.alpha``, after ``promote.min_labels`` paired events, is promoted to
  its latest published version (only a version that learned at least that
  many labels: a model that is not ready is never served);
- **rollback**: the champion's accuracy over the last ``rollback.window``
  labelled events falling ``rollback.drop`` below its level when it was last
  good (or below ``rollback.floor``) moves the pointer back to the version
  served when it was last good, a full rollback window before the fall; the
  learner then continues that version, forgetting what it learned since. The
  level is learned again from a full window after the rollback, so a fall
  that the rollback did not mend (a concept drift) is rolled back only once;
- every decision is returned with its evidence (the stage writes it to
  ``{ns}.model-events``), and none is taken within ``cooldown`` labelled events
  of the previous one.

What the status page shows of all this over time (series, markers) is kept
apart, by ``monitors.history``.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from riverflow.models.registry import ChampionPointer, ModelRegistry
from riverflow.monitors.distribution import DistributionMonitor
from riverflow.monitors.drift import ErrorDriftMonitor
from riverflow.monitors.quality import PairedWindow, WindowedQuality
from riverflow.monitors.spec import MonitorSpec
from riverflow.streams.contracts import ModelEvent

MAX_SEGMENTS = 1_000  # segment values tracked one by one
OTHER_SEGMENT = "(other)"


@dataclass(frozen=True)
class Decision:
    """Something the monitor saw or did, with the numbers that made it so."""

    kind: str  # drift | feature_drift | challenger | retire | promote | rollback
    model: str
    version: int
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    at: float = 0.0
    labels: int = 0  # the monitor's count of labelled events when it happened

    def as_event(self) -> ModelEvent:
        """The ``{ns}.model-events`` record."""
        return ModelEvent(
            kind=self.kind,
            model=self.model,
            version=self.version,
            at=self.at,
            reason=self.reason,
            evidence={**self.evidence, "labels": self.labels},
            by="monitor",
        )


class Watch:
    """One candidate as the monitor follows it."""

    def __init__(self, spec: MonitorSpec, first_label: int) -> None:
        self.quality = WindowedQuality(spec.window, spec.rollback.window)
        self.drift = ErrorDriftMonitor(spec.detector)
        self.version = 0
        self.first_label = first_label


class PipelineMonitor:
    """Quality, drift and decisions for one pipeline; see the module docstring."""

    def __init__(
        self,
        pipeline: str,
        spec: MonitorSpec,
        registry: ModelRegistry,
        lead: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pipeline = pipeline
        self.spec = spec
        self.registry = registry
        self.lead = lead
        self.clock = clock
        self.watches: dict[str, Watch] = {}
        self.duels: dict[str, PairedWindow] = {}  # challenger -> (champion right, it right)
        self.labels = 0
        self.last_decision: int | None = None  # label count of the last promote/rollback
        self.champion: ChampionPointer | None = None
        self.fresh: dict[str, dict[str, Any]] = {}
        self.retired: set[str] = set()  # fresh challengers retired (names are never reused)
        self.level: float | None = None  # champion's accuracy when last seen good
        self.good: deque[tuple[int, ChampionPointer]] = deque(maxlen=10_000)
        self.segments: dict[str, WindowedQuality] = {}
        self.distribution = (
            DistributionMonitor(spec.label_free) if spec.label_free.enabled else None
        )

    # -- inputs -----------------------------------------------------------------

    def refresh(self) -> list[Decision]:
        """Read the champion pointer and the fresh challengers; retire stale ones."""
        pointer = self.registry.champion()
        if pointer != self.champion:
            if self.champion is None or pointer is None or pointer.model != self.champion.model:
                self.duels.clear()  # a new champion: challengers are compared afresh
                self.level = None  # and its level is its own
            self.champion = pointer
        self.fresh = self.registry.challengers()
        out = []
        for name in list(self.fresh):
            watch = self.watches.get(name)
            if name == self.champion_name or watch is None:
                continue
            age = self.labels - watch.first_label
            if age >= self.spec.challengers.patience:
                why = f"not promoted within {self.spec.challengers.patience} labelled events"
                out.append(self._retire(name, why, {"labels": age}))
        return out

    @property
    def champion_name(self) -> str:
        return self.champion.model if self.champion else self.lead

    def on_prediction(
        self, features: dict[str, float], probability: float, model: str, version: int
    ) -> list[Decision]:
        """A served prediction: label-free checks of its features and score."""
        if self.distribution is None:
            return []
        drifted = self.distribution.update(features, probability)
        out = []
        for name, p in drifted:
            d = self._decision(
                "feature_drift", model, version,
                f"distribution of {name} changed (KS test p={p:.2e})",
                {"input": name, "p_value": p,
                 "statistic": self.distribution.inputs[name].statistic},
            )  # fmt: skip
            out.append(d)
        return out

    def on_evaluation(
        self, label: bool, predictions: dict[str, tuple[int, float]], segment: object = None
    ) -> list[Decision]:
        """A label with every candidate's prequential ``(version, probability)``."""
        self.labels += 1
        champion = self.champion_name
        right: dict[str, bool] = {}
        out: list[Decision] = []
        for name, (version, probability) in predictions.items():
            if name in self.retired:
                continue  # the learner has not dropped it yet
            watch = self.watches.get(name)
            if watch is None:
                watch = self.watches[name] = Watch(self.spec, self.labels)
            watch.version = version
            right[name] = ok = watch.quality.update(label, probability)
            if watch.drift.update(not ok):
                out += self._drift(name, watch)
        if segment is not None and champion in right:
            key = str(segment)
            if key not in self.segments and len(self.segments) >= MAX_SEGMENTS:
                key = OTHER_SEGMENT  # a field of too many values: the rest are pooled
            seg = self.segments.get(key)
            if seg is None:
                seg = self.segments[key] = WindowedQuality(self.spec.window)
            seg.update(label, predictions[champion][1])
        if champion in right:
            for name, ok in right.items():
                if name != champion:
                    duel = self.duels.get(name)
                    if duel is None:
                        duel = self.duels[name] = PairedWindow(self.spec.window)
                    duel.update(right[champion], ok)
            out += self._check_rollback(champion)
            out += self._check_promotions(champion)
        return out

    # -- policies -----------------------------------------------------------------

    def _cooling(self) -> bool:
        last = self.last_decision
        return last is not None and self.labels - last < self.spec.cooldown

    def _drift(self, name: str, watch: Watch) -> list[Decision]:
        detector = watch.drift.detector
        evidence = {"detector": self.spec.detector.kind.value,
                    "error_rate": round(1 - watch.quality.accuracy(), 6),
                    "estimation": round(float(getattr(detector, "estimation", 0.0)), 6),
                    "window": len(watch.quality.correct)}  # fmt: skip
        out = [self._decision("drift", name, watch.version,
                              f"error rate of {name} rose", evidence)]  # fmt: skip
        policy = self.spec.challengers
        if name != self.champion_name or not policy.on_drift or policy.max == 0:
            return out
        young = [c for c, w in self.watches.items() if c in self.fresh and c != name
                 and self.labels - w.first_label < self.spec.cooldown]  # fmt: skip
        if young or any(c not in self.watches for c in self.fresh):
            return out  # one started recently is still warming up
        alive = sorted((c for c in self.fresh if c != self.champion_name),
                       key=lambda c: self.fresh[c]["started"])  # fmt: skip
        while len(alive) >= policy.max:
            out.append(self._retire(alive.pop(0), "the challenger cap is reached", {}))
        base = self.fresh.get(name, {}).get("base", name)
        fresh = self._fresh_name(base)
        self.registry.start_challenger(fresh, base, f"drift alarm of champion {name}")
        self.fresh[fresh] = {"base": base, "started": self.clock()}
        out.append(self._decision("challenger", fresh, 0,
                                  f"fresh {base} started after the drift alarm of {name}",
                                  {"base": base, **evidence}))  # fmt: skip
        return out

    def _fresh_name(self, base: str) -> str:
        pattern = re.compile(re.escape(base) + r"\.r(\d+)$")
        names = [*self.registry.names(), *self.fresh, *self.watches, *self.retired]
        used = [int(m.group(1)) for n in names if (m := pattern.match(n))]
        return f"{base}.r{max(used, default=0) + 1}"

    def _retire(self, name: str, why: str, evidence: dict[str, Any]) -> Decision:
        self.registry.retire_challenger(name)
        self.fresh.pop(name, None)
        self.duels.pop(name, None)
        self.retired.add(name)
        watch = self.watches.pop(name, None)
        version = watch.version if watch else 0
        return self._decision("retire", name, version, f"{name} retired: {why}", evidence)

    def _check_rollback(self, champion: str) -> list[Decision]:
        policy = self.spec.rollback
        watch = self.watches[champion]
        since = self.labels - (self.last_decision or 0)
        if not policy.enabled or self.champion is None or since < policy.window:
            return []
        if len(watch.quality.recent) < policy.window:
            return []
        recent = watch.quality.recent.rate()
        if self.level is None:
            # (re)learn the level a fall is measured from: only from a full window of
            # labels after the last promote or rollback. So a fall that a rollback did not
            # mend (a concept drift: the older version is no better) is rolled back once,
            # then becomes the new level, instead of being rolled back again and again.
            if watch.quality.full and since >= self.spec.window:
                self.level = watch.quality.accuracy()
            else:
                return []
        below_floor = policy.floor is not None and recent < policy.floor
        dropped = recent < self.level - policy.drop
        if not (below_floor or dropped):
            if since >= self.spec.window:
                self.level = watch.quality.accuracy()
            if not self.good or self.good[-1][1] != self.champion:
                self.good.append((self.labels, self.champion))
            else:
                self.good[-1] = (self.labels, self.champion)
            return []
        if self._cooling():
            return []
        before = self.labels - policy.window
        # a version pruned since (the registry keeps the champion's newest snapshots)
        # is passed over for an earlier good one
        target = next(
            (p for n, p in reversed(self.good) if n <= before and self.registry.has(p)), None
        )
        if target is None:
            return []
        evidence = {"recent_accuracy": round(recent, 6), "window": policy.window,
                    "good_level": None if self.level is None else round(self.level, 6),
                    "drop": policy.drop, "floor": policy.floor,
                    "from": str(self.champion), "to": str(target)}  # fmt: skip
        why = (f"accuracy over the last {policy.window} labels {recent:.3f} "
               + (f"< floor {policy.floor}" if below_floor
                  else f"fell more than {policy.drop} below {self.level:.3f}"))  # fmt: skip
        self.registry.load(target.model, target.version)  # refuse an unverifiable target
        moved = self.registry.move(target, "rollback", self.champion, why)
        if moved is None:
            return []  # the pointer moved meanwhile: look again with the next label
        self.champion, self.level = target, None
        while self.good and self.good[-1][0] > before:
            self.good.pop()
        self.duels.clear()
        self.last_decision = self.labels
        return [self._decision("rollback", target.model, target.version, why, evidence)]

    def _check_promotions(self, champion: str) -> list[Decision]:
        policy = self.spec.promote
        if not policy.enabled or self._cooling():
            return []
        for name, duel in self.duels.items():
            if len(duel) < policy.min_labels or duel.gain() < policy.margin:
                continue  # (the gain first: the test costs more, per label)
            test = duel.test()
            gain = test.b_accuracy - test.a_accuracy
            if gain < policy.margin or test.p_value >= policy.alpha:
                continue
            version = self.registry.latest(name)
            if version is None:
                continue
            trained = self.registry.meta(name, version).get("metrics", {}).get("labels", 0)
            if trained < policy.min_labels:
                continue  # not ready: its latest version has learned too little
            to = ChampionPointer(name, version)
            why = (f"{name} right on {test.b_accuracy:.3f} vs {test.a_accuracy:.3f} of the "
                   f"last {test.n} labelled events (McNemar p={test.p_value:.2e})")  # fmt: skip
            self.registry.promote(to, "promote", why)
            previous, self.champion = self.champion, to
            self.duels.clear()
            self.level = None
            self.last_decision = self.labels
            evidence = {**test.as_evidence(), "margin": policy.margin, "alpha": policy.alpha,
                        "from": str(previous) if previous else champion,
                        "trained_labels": trained}  # fmt: skip
            return [self._decision("promote", name, version, why, evidence)]
        return []

    def _decision(
        self, kind: str, model: str, version: int, reason: str, evidence: dict[str, Any]
    ) -> Decision:
        return Decision(kind, model, version, reason, evidence, self.clock(), self.labels)
