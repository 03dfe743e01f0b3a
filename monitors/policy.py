"""The monitor's brain: quality per candidate, drift alarms, and the decisions they lead to.

``PipelineMonitor`` is fed the learner's evaluations (a label and every
candidate's prequential prediction) and the scorer's predictions, and applies
the spec's policies to the registry while traffic flows:

What a model is scored on follows the spec's label (``models.target``): a
classifier's 0/1 errors, a regressor's absolute errors (windowed metrics in
``quality``; regressors are promoted on paired error differences and not
rolled back, see below).

- **drift**: the champion's errors (0/1, or absolute) go to a detector (ADWIN by
  default; a challenger's would act on nothing: it is judged by its duel); an
  alarm starts a *fresh challenger* (the champion's spec,
  reset state), at most ``challengers.max`` alive, each retired after
  ``challengers.patience`` labelled events unless promoted;
- **promote**: a challenger whose paired e-value against the champion
  (``quality.PairedDuel``: a betting e-process on the labels both predicted,
  after ``promote.min_labels`` of warm-up) reaches ``1 / promote.alpha``, and
  that is right on at least ``promote.margin`` more of the last ``window``
  paired events, is promoted to its latest published version (only a version
  that learned at least ``promote.min_labels`` labels: a model that is not
  ready is never served). However often it is checked, a challenger that is
  not better is promoted with probability at most ``alpha``;
- **promote, slate pipelines that explore** (``explores``: ``events.slate.epsilon``
  > 0; one that does not is judged as above, on its shown items' labels): a
  challenger is judged by its rankings, not by its per-item accuracy. Each served
  slate its latest version ranked in the shadow is, once the request's clicks are
  in, a paired request of ``offpolicy.OffPolicyDuel``: the champion's clicks per
  shown slot as served against the item-position IPS estimate of the challenger's,
  served with the same exploration. Its e-value reaching ``1 / promote.alpha``
  (after ``promote.min_labels`` shown items of warm-up), a mean gain over the last
  ``ranking.window`` paired requests of at least ``promote.margin`` and a ready
  latest version promote it, with the same guarantee;
- **rollback** (classifiers): the champion's accuracy over the last ``rollback.window``
  labelled events falling ``rollback.drop`` below its level when it was last
  good (or below ``rollback.floor``) makes the last three versions served
  while it was good (a version counts once the monitor has read past the labels
  it learned without a fall: ``_served_good``), a full rollback window before the
  fall, rollback targets;
  each is shadow-scored on those same recent labelled events and the pointer
  moves to the best only if it is right on more of them than the champion was,
  by a one-sided sign test at ``rollback.alpha / 3`` on the labels where they
  differ (else they are tried again a window later, and a fall that lasts a
  full quality window becomes the new level: a concept drift, not a bad
  version). The learner then continues that version, forgetting what it
  learned since;
- drift detectors settle: every champion change (promote, rollback) gives the
  new champion a fresh detector fed after ``window`` more labels: the errors
  of a model that was just swapped in, often a young one (falling as it
  learns, jumping when a tree splits), are no drift;
- every decision is returned with its evidence (the stage writes it to
  ``{ns}.model-events``); no promotion is taken within ``cooldown`` labelled
  events of the previous promote or rollback, no rollback within
  ``rollback.window``.

What the status page shows of all this over time (series, markers) is kept
apart, by ``monitors.history``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from riverflow.errors import outage
from riverflow.models.errors import ModelError
from riverflow.models.registry import ChampionPointer, ModelRegistry, UnsureMoves
from riverflow.models.target import Target
from riverflow.monitors.distribution import DistributionMonitor
from riverflow.monitors.drift import ErrorDriftMonitor
from riverflow.monitors.offpolicy import OffPolicyDuel, explored_weights
from riverflow.monitors.quality import (
    PairedDuel,
    WindowedMulticlass,
    WindowedQuality,
    WindowedRegression,
)
from riverflow.monitors.spec import MonitorSpec
from riverflow.streams.contracts import Label, LabelPosition, ModelEvent

log = logging.getLogger(__name__)

MAX_SEGMENTS = 1_000  # segment values tracked one by one
OTHER_SEGMENT = "(other)"
ROLLBACK_TARGETS = 3  # earlier good versions shadow-scored before a rollback
MEMORY_GOOD = 10  # versions served while good that the monitor's saved memory keeps
PENDING = 100  # versions served while good on labels they had learned, held (``_served_good``)


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
    source: LabelSource | None = None  # the label that tripped a drift alarm
    champion: bool | None = None  # for a drift alarm: was the model serving then

    def as_event(self) -> ModelEvent:
        """The ``{ns}.model-events`` record."""
        src = self.source
        return ModelEvent(
            kind=self.kind,
            model=self.model,
            version=self.version,
            at=self.at,
            reason=self.reason,
            evidence={**self.evidence, "labels": self.labels},
            by="monitor",
            event_id=src.event_id if src else None,
            label_at=src.label_at if src else None,
            label_time=src.label_time if src else None,
            champion=self.champion,
        )


@dataclass(frozen=True)
class LabelSource:
    """Which label an evaluation is of: its event id, where it was read, when written."""

    event_id: str
    label_at: LabelPosition | None = None
    label_time: float | None = None


def sign_test(wins: int, losses: int) -> float:
    """One-sided exact sign test: the chance of at least ``wins`` of the
    ``wins + losses`` discordant labels going one way if either way is as likely."""
    n = wins + losses
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


Windowed = WindowedQuality | WindowedMulticlass | WindowedRegression


def windowed(target: Target, size: int, recent: int | None = None) -> Windowed:
    """The windowed quality of a model of the target's kind."""
    if target.kind == "regression":
        return WindowedRegression(size, recent)
    if target.kind == "multiclass":
        return WindowedMulticlass(size, recent)
    return WindowedQuality(size, recent)


class Watch:
    """One candidate as the monitor follows it."""

    def __init__(self, spec: MonitorSpec, first_label: int, target: Target | None = None) -> None:
        self.quality = windowed(target or Target(), spec.window, spec.rollback.window)
        self.drift = ErrorDriftMonitor(spec.detector)
        self.version = 0
        self.first_label = first_label
        # the detector is fed from this label count on (``settle``: a quality window
        # after the model was swapped in)
        self.settled_at = first_label

    def settle(self, spec: MonitorSpec, labels: int) -> None:
        """A fresh detector, fed once ``spec.window`` more labels have passed."""
        self.drift = ErrorDriftMonitor(spec.detector)
        self.settled_at = labels + spec.window


class PipelineMonitor:
    """Quality, drift and decisions for one pipeline; see the module docstring."""

    def __init__(
        self,
        pipeline: str,
        spec: MonitorSpec,
        registry: ModelRegistry,
        lead: str,
        clock: Callable[[], float] = time.time,
        target: Target | None = None,
        explores: bool = False,
    ) -> None:
        self.pipeline = pipeline
        self.target = target or Target()
        self.spec = spec
        self.registry = registry
        self.unsure = UnsureMoves(registry)  # promotions and rollbacks whose write raised
        # a drift alarm whose challenger's write raised: its decisions so far (``settle``)
        self._unfinished: tuple[str, dict[str, Any], list[Decision]] | None = None
        self._kept: list[Decision] = []  # made by a call that raised later (``settle``)
        # the checks (in order: "rollback", "promote", "slate") a server outage stopped,
        # owed: ``settle`` runs them; the outage, for ``raise_owed``
        self._owed: list[str] = []
        self._failed: Exception | None = None
        self.lead = lead
        self.clock = clock
        self.watches: dict[str, Watch] = {}
        self.duels: dict[str, PairedDuel] = {}  # challenger -> its test against the champion
        self.labels = 0
        self.last_decision: int | None = None  # label count of the last promote/rollback
        self.champion: ChampionPointer | None = None
        self.fresh: dict[str, dict[str, Any]] = {}
        self.retired: set[str] = set()  # fresh challengers retired (names are never reused)
        self.level: float | None = None  # champion's accuracy when last seen good
        self.good: deque[tuple[int, ChampionPointer]] = deque(maxlen=10_000)
        # versions served while good, but only on labels they had learned (the learner
        # runs ahead): the learner's count of labels when each was published, and the
        # version; good once this monitor has read past that count without a fall
        self.pending: deque[tuple[int, ChampionPointer]] = deque(maxlen=PENDING)
        self._learned_at: tuple[ChampionPointer, int | None] | None = None  # (read once)
        # the last rollback.window labels the champion predicted, where a rollback
        # target is shadow-scored: (inputs, label, it right, the learner's count of
        # labels when it learned it: None if not given; a target that learned one is
        # not scored on them)
        self.recent: deque[tuple[dict[str, Any] | None, Label, bool, int | None]] = deque(
            maxlen=spec.rollback.window
        )
        self.fallen_at: int | None = None  # label count when the current fall began
        self.shadow_at: int | None = None  # label count of the last refused rollback
        self.segments: dict[str, Windowed] = {}
        self.distribution = (
            DistributionMonitor(spec.label_free) if spec.label_free.enabled else None
        )
        # a slate pipeline that explores (``events.slate.epsilon`` > 0): challengers are
        # promoted on their rankings; one that does not has nothing to weigh a
        # challenger's rankings by, and promotes on the per-item duel, as fraud does
        self.explores = explores
        self.slate_duels: dict[str, OffPolicyDuel] = {}  # challenger -> its off-policy test
        # request -> (the model that served it, each challenger's weights on its shown
        # positions) until its clicks are in; as many as ``ranking.open_requests``
        self.slate_waiting: OrderedDict[str, tuple[str, dict[str, tuple[float, ...]]]] = (
            OrderedDict()
        )
        self.slates_unweighted = 0  # ranked slates whose propensities were not epsilon-greedy's
        # the champion's per-label errors feed its detector; a slate pipeline's stage
        # turns it off and calls ``on_ranking_drift`` instead (``monitors.ranking``)
        self.error_drift = True

    # -- inputs -----------------------------------------------------------------

    def settle(self) -> list[Decision]:
        """What a call that raised on a registry write left undone, done now: a drift
        alarm whose fresh challenger was not started (its detector has fired, so the
        record run again would not raise it again), the promotions and rollbacks
        whose write was applied after all (Redis lost its reply), as if it had
        answered, and the checks a server outage stopped (``raise_owed``), on the
        state their record left. Call it before ``refresh``: that one would take the
        moved pointer for someone else's move."""
        applied = self.unsure.applied()  # (reads first: nothing is done twice)
        if self._unfinished is not None:
            name, evidence, made = self._unfinished  # (a raise keeps what it made)
            with self._dropped_unless_outage("fresh challenger"):
                self._challenge(name, evidence, made)
            self._unfinished = None
            self._kept += made
        self.unsure.clear()
        out, self._kept = self._kept, []
        for m, (why, evidence, good_until) in applied:  # (each move's context: attempt)
            out.append(self._moved(m.kind, m.to, why, evidence, good_until, m.at))
        if applied:
            self._owed = []  # a move was made: what the owed checks were to decide
        while self._owed:
            with self._keeping(out), self._dropped_unless_outage(f"{self._owed[0]} check"):
                out += self._run_check(self._owed[0])
            del self._owed[0]
        self._failed = None
        return out

    @contextlib.contextmanager
    def _dropped_unless_outage(self, what: str) -> Iterator[None]:
        """Something owed, done by ``settle``: a server outage raises (the guard waits,
        it stays owed), anything else is logged and dropped: raised at every batch's
        ``settle``, it would send every record to the DLQ."""
        try:
            yield
        except Exception as exc:
            if outage(exc) is not None:
                raise
            log.error("monitor: the owed %s raised, dropped: %s: %s", what,
                      type(exc).__name__, exc)  # fmt: skip

    def raise_owed(self) -> None:
        """Raise the server outage that stopped a check since the last call, if one
        did. A record's checks are its last step: the record is taken in, and the
        check is owed (``settle`` runs it), so a caller that gives the record again
        after the outage would count it twice."""
        failed, self._failed = self._failed, None
        if failed is not None:
            raise failed

    def _owe(self, exc: Exception) -> bool:
        """Whether ``exc`` is a server outage: then it is kept for ``raise_owed``, and
        what it stopped is owed rather than raised."""
        if outage(exc) is None:
            return False
        self._failed = self._failed or exc
        return True

    def _check(self, kind: str, out: list[Decision]) -> None:
        """The ``kind`` check now, its decisions added to ``out``; if a server outage
        stops it (or an earlier check is owed: they run in order), it is owed instead
        (``raise_owed``). Anything else raises, ``out`` kept for ``settle``."""
        if not self._owed:
            try:
                out += self._run_check(kind)
                return
            except Exception as exc:
                if not self._owe(exc):
                    self._kept += out
                    raise
        if kind not in self._owed:
            self._owed.append(kind)

    def _run_check(self, kind: str) -> list[Decision]:
        champion = self.champion_name
        if kind == "rollback":
            return self._check_rollback(champion)
        if kind == "promote":
            return self._check_promotions(champion)
        return self._check_slate_promotions(champion)

    @contextlib.contextmanager
    def _keeping(self, out: list[Decision]) -> Iterator[None]:
        """The decisions in ``out``, made before a registry call raised, come with the
        next ``settle``: what they did is done (a challenger retired, a drift's detector
        reset), and the call run again would not make them again."""
        try:
            yield
        except BaseException:
            self._kept += out
            raise

    def refresh(self) -> list[Decision]:
        """Read the champion pointer and the fresh challengers; retire stale ones."""
        pointer = self.registry.champion()
        if pointer != self.champion:
            # (no pointer yet: the lead is served; its first pointer is no swap)
            before, self.champion = self.champion_name, pointer
            if self.champion_name != before:
                self._champion_changed()
        self.fresh = self.registry.challengers()
        out: list[Decision] = []
        with self._keeping(out):
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

    # -- what a restarted monitor must not forget --------------------------------

    def memory(self) -> dict[str, Any]:
        """What the labels to come cannot teach a restarted monitor. For a rollback:
        the champion's level when it was last good, and the versions served while it
        was (newest last, at most ``MEMORY_GOOD`` of them, and those held until the
        monitor has read past what they learned: ``pending``); without them, a monitor
        restarted during a fall learns its level from the fall and knows no version
        to go back to: the champion is never rolled back. And the labels since the
        last promotion or rollback, and each fresh challenger's age in labels:
        without them, a restart ends the cool-down and gives every challenger its
        patience again. And the challengers' duels with the champion (``duels``):
        without them, every restart began each duel afresh, and a monitor restarted
        more often than a duel takes never promoted. And the champion's drift detector
        (``drift``): a fresh one after a restart sees only the errors since, and a
        monitor restarted once its champion's errors had risen never raised the alarm
        (nor started the fresh challenger it brings)."""
        good = [[p.model, p.version] for _, p in list(self.good)[-MEMORY_GOOD:]]
        since = None if self.last_decision is None else self.labels - self.last_decision
        ages = {name: self.labels - w.first_label for name, w in self.watches.items()
                if name in self.fresh and name != self.champion_name}  # fmt: skip
        duels = {name: duel.state() for name, duel in self.duels.items()}
        pending = [[n, p.model, p.version] for n, p in self.pending]
        memory = {"champion": self.champion_name, "level": self.level, "good": good,
                  "pending": pending, "since_decision": since, "ages": ages,
                  "duels": duels}  # fmt: skip
        watch = self.watches.get(self.champion_name)
        if watch is not None and self.error_drift:
            memory["drift"] = {"version": watch.version,
                               "settling": max(0, watch.settled_at - self.labels),
                               **watch.drift.state(self.registry.key)}  # fmt: skip
        return memory

    def restore(self, memory: Mapping[str, Any] | None) -> bool:
        """Take back what ``memory`` saved, if it is of the champion served now (a
        memory of another champion's level says nothing of this one's). The versions
        it names count as served a full window before any label this monitor sees;
        the last decision and the challengers' ages count back from the labels it
        has seen. True if taken."""
        if not memory or memory.get("champion") != self.champion_name or self.good:
            return False
        try:
            level = memory.get("level")
            good = [ChampionPointer(str(m), int(v)) for m, v in memory.get("good") or []]
            pending = [(int(n), ChampionPointer(str(m), int(v)))
                       for n, m, v in memory.get("pending") or []]  # fmt: skip
            since = memory.get("since_decision")
            since = None if since is None else int(since)
            ages = {str(n): int(a) for n, a in (memory.get("ages") or {}).items()}
            level = None if level is None else float(level)
            warmup, window = self.spec.promote.min_labels, self.spec.window
            duels = {str(n): PairedDuel.restored(warmup, window, d)
                     for n, d in (memory.get("duels") or {}).items()}  # fmt: skip
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            log.warning("the monitor's saved memory is not readable, ignored: %s", exc)
            return False
        self.level = level
        before = -self.spec.rollback.window
        self.good.extend((before, pointer) for pointer in good)
        self.pending.extend(pending)
        if since is not None and self.last_decision is None:
            self.last_decision = self.labels - since
        for name, age in ages.items():  # (those still fresh; none seen yet)
            if name in self.fresh and name not in self.watches:
                self.watches[name] = Watch(self.spec, self.labels - age, self.target)
        for name, duel in duels.items():  # (of this champion: the memory is its)
            if name not in self.retired and name not in self.duels and not self.explores:
                self.duels[name] = duel
        self._restore_drift(memory.get("drift"))
        return True

    def _restore_drift(self, saved: object) -> None:
        """The champion's drift detector as ``memory`` saved it, if of this spec's
        detector (``restore`` checked the memory is of this champion)."""
        if not isinstance(saved, dict) or self.champion_name in self.watches:
            return
        try:
            version, settling = int(saved["version"]), int(saved["settling"])
        except (KeyError, TypeError, ValueError):
            return
        drift = ErrorDriftMonitor.restored(self.spec.detector, saved, self.registry.key)
        if drift is None:
            return
        watch = self.watches[self.champion_name] = Watch(self.spec, self.labels, self.target)
        watch.version, watch.drift = version, drift
        watch.settled_at = self.labels + settling

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
        self,
        label: Label,
        predictions: dict[str, tuple[int, Any]],
        segment: object = None,
        source: LabelSource | None = None,
        inputs: dict[str, Any] | None = None,
        seen: int | None = None,
        paired: bool = True,
    ) -> list[Decision]:
        """A label with every candidate's prequential ``(version, answer)``: the
        probability of true (a bool label), the value (a number), or the class and
        the class probabilities (a category); ``source`` names the label, ``inputs``
        are what the models were given, ``seen`` the learner's count of labels when
        it learned it (its evaluation's ``labels_seen``). ``paired`` False: the duels
        and the champion's drift detector counted it before a restart (``restore``),
        and leave it out."""
        self.labels += 1
        champion = self.champion_name
        loss: dict[str, float] = {}  # 0/1 (wrong) for a classifier, |error| for a regressor
        out: list[Decision] = []
        for name, (version, answer) in predictions.items():
            if name in self.retired:
                continue  # the learner has not dropped it yet
            watch = self.watches.get(name)
            if watch is None:
                watch = self.watches[name] = Watch(self.spec, self.labels, self.target)
            watch.version = version
            loss[name] = watch.quality.add(label, answer)
            if (
                name == champion
                and self.error_drift
                and paired
                and self.labels >= watch.settled_at
                and watch.drift.update(loss[name])
            ):
                out += self._drift(name, watch, source)
        if segment is not None and champion in loss:
            key = str(segment)
            if key not in self.segments and len(self.segments) >= MAX_SEGMENTS:
                key = OTHER_SEGMENT  # a field of too many values: the rest are pooled
            seg = self.segments.get(key)
            if seg is None:
                seg = self.segments[key] = windowed(self.target, self.spec.window)
            seg.add(label, predictions[champion][1])
        if champion in loss:
            regression = self.target.kind == "regression"
            self.recent.append((inputs, label, not loss[champion], seen))
            for name, error in loss.items():
                # (a slate's: by its rankings)
                if name != champion and not self.explores and paired:
                    duel = self.duels.get(name)
                    if duel is None:
                        duel = self.duels[name] = PairedDuel(
                            self.spec.promote.min_labels, self.spec.window
                        )
                    if regression:
                        duel.update_errors(loss[champion], error)
                    else:
                        duel.update(not loss[champion], not error)
            if not regression:  # a regressor's fall is left to drift and promotion
                self._check("rollback", out)
            if not self.explores:
                self._check("promote", out)
        return out

    def on_ranked_slate(
        self,
        request: str,
        served_by: str,
        served: Sequence[str],
        propensities: Sequence[object],
        rankings: Mapping[str, Sequence[str]],
    ) -> None:
        """A served slate that challengers ranked in the shadow: the model that served
        it, its items in served order with their propensities (every candidate), and
        each challenger's top as many items as were shown. Kept until its clicks are in
        (``on_ranked_request``); the oldest dropped beyond ``ranking.open_requests``."""
        logged = [float(p) for p in propensities
                  if isinstance(p, int | float) and not isinstance(p, bool)]  # fmt: skip
        weights: dict[str, tuple[float, ...]] = {}
        try:
            if len(logged) < len(propensities):
                raise ValueError("a propensity is missing, or not a number")
            for name, top in rankings.items():
                weights[name] = explored_weights(served, logged, top, len(top))
        except ValueError:  # not epsilon-greedy's propensities: nothing to weigh them by
            self.slates_unweighted += 1
            return
        self.slate_waiting[request] = (served_by, weights)
        while len(self.slate_waiting) > self.spec.ranking.open_requests:
            self.slate_waiting.popitem(last=False)

    def on_ranked_request(self, request: str, clicks: Sequence[bool]) -> list[Decision]:
        """A completed request's clicks on its shown positions: if the champion served it
        and challengers ranked it, each one's off-policy duel takes it; then the slate
        promotion is checked."""
        waiting = self.slate_waiting.pop(request, None)
        if waiting is None:
            return []
        served_by, weights = waiting
        champion = self.champion_name
        if served_by != champion:
            return []  # served before the champion changed: no evidence about this one
        for name, w in weights.items():
            if name == champion or name in self.retired or len(w) != len(clicks):
                continue
            duel = self.slate_duels.get(name)
            if duel is None:
                warmup = math.ceil(self.spec.promote.min_labels / len(w))
                duel = self.slate_duels[name] = OffPolicyDuel(warmup, self.spec.ranking.window)
            duel.update(clicks, w)
        out: list[Decision] = []
        self._check("slate", out)
        return out

    # -- policies -----------------------------------------------------------------

    def _cooling(self) -> bool:
        last = self.last_decision
        return last is not None and self.labels - last < self.spec.cooldown

    def on_ranking_drift(
        self, name: str, reason: str, evidence: dict[str, Any], source: LabelSource | None
    ) -> list[Decision]:
        """A drop of the served ranking's quality (a slate pipeline's detector,
        ``monitors.ranking``): for the champion, the drift alarm and what follows it."""
        watch = self.watches.get(name)
        if watch is None or name != self.champion_name or name in self.retired:
            return []
        watch.drift.alarms += 1  # the candidate's count of alarms, as the page shows it
        return self._drift(name, watch, source, (reason, evidence))

    def _drift(
        self,
        name: str,
        watch: Watch,
        source: LabelSource | None,
        ranking: tuple[str, dict[str, Any]] | None = None,
    ) -> list[Decision]:
        """The drift alarm of ``name`` (its error detector's, or ``ranking``'s: the
        reason and evidence of a slate pipeline's), and a fresh challenger."""
        detector = watch.drift.detector
        is_champion = name == self.champion_name
        evidence = {"detector": self.spec.detector.kind.value,
                    "statistic": watch.drift.statistic(),
                    self.error_name: round(self._error(watch), 6),
                    "estimation": round(float(getattr(detector, "estimation", 0.0)), 6),
                    "window": min(watch.quality.count, self.spec.window)}  # fmt: skip
        what = "absolute error" if self.target.kind == "regression" else "error rate"
        why = f"{what} of {name} rose"
        if ranking is not None:
            why, evidence = ranking[0], {**ranking[1], self.error_name: evidence[self.error_name]}
        alarm = self._decision("drift", name, watch.version, why, evidence)
        out = [dataclasses.replace(alarm, source=source, champion=is_champion)]
        policy = self.spec.challengers
        if not is_champion or not policy.on_drift or policy.max == 0:
            return out
        try:
            self._challenge(name, evidence, out)
        except Exception as exc:  # a registry write raised: the detector has fired
            if not self._owe(exc):  # already, so ``settle`` finishes it
                self._unfinished = (name, evidence, out)  # (``out`` kept: this raises)
                raise
            self._unfinished = (name, evidence, [])  # (``out`` returned: the record is in)
        return out

    def _challenge(self, name: str, evidence: dict[str, Any], out: list[Decision]) -> None:
        """A fresh challenger after the drift alarm of the champion ``name`` (the
        oldest retired first at the cap), unless one is still warming up; its decisions
        are added to ``out`` as they are made."""
        young = [c for c, w in self.watches.items() if c in self.fresh and c != name
                 and self.labels - w.first_label < self.spec.cooldown]  # fmt: skip
        if young or any(c not in self.watches for c in self.fresh):
            return  # one started recently is still warming up
        alive = sorted((c for c in self.fresh if c != self.champion_name),
                       key=lambda c: self.fresh[c]["started"])  # fmt: skip
        while len(alive) >= self.spec.challengers.max:
            out.append(self._retire(alive.pop(0), "the challenger cap is reached", {}))
        base = self.fresh.get(name, {}).get("base", name)
        fresh = self._fresh_name(base)
        self.registry.start_challenger(fresh, base, f"drift alarm of champion {name}")
        self.fresh[fresh] = {"base": base, "started": self.clock()}
        out.append(self._decision("challenger", fresh, 0,
                                  f"fresh {base} started after the drift alarm of {name}",
                                  {"base": base, **evidence}))  # fmt: skip

    @property
    def error_name(self) -> str:
        """What a model's drift detector watches, as its evidence names it."""
        return "mean_abs_error" if self.target.kind == "regression" else "error_rate"

    @staticmethod
    def _error(watch: Watch) -> float:
        q = watch.quality
        return q.headline() if isinstance(q, WindowedRegression) else 1 - q.accuracy()

    def _fresh_name(self, base: str) -> str:
        pattern = re.compile(re.escape(base) + r"\.r(\d+)$")
        names = [*self.registry.names(), *self.fresh, *self.watches, *self.retired]
        used = [int(m.group(1)) for n in names if (m := pattern.match(n))]
        return f"{base}.r{max(used, default=0) + 1}"

    def _retire(self, name: str, why: str, evidence: dict[str, Any]) -> Decision:
        self.registry.retire_challenger(name)
        self.fresh.pop(name, None)
        self.duels.pop(name, None)
        self.slate_duels.pop(name, None)
        self.retired.add(name)
        watch = self.watches.pop(name, None)
        version = watch.version if watch else 0
        return self._decision("retire", name, version, f"{name} retired: {why}", evidence)

    def _check_rollback(self, champion: str) -> list[Decision]:
        policy = self.spec.rollback
        quality = self.watches[champion].quality
        assert not isinstance(quality, WindowedRegression)  # a classifier's accuracy falls
        since = self.labels - (self.last_decision or 0)
        if not policy.enabled or self.champion is None or since < policy.window:
            return []
        if len(quality.recent) < policy.window:
            return []
        recent = quality.recent.rate()
        if self.level is None:
            # (re)learn the level a fall is measured from, from a full quality window (a
            # promoted challenger's own, as it was watched before). A target must do
            # better on the recent labels, so a level learned from a bad stretch rolls
            # nothing back that would not mend it.
            if quality.full:
                self.level = quality.accuracy()
            else:
                return []
        below_floor = policy.floor is not None and recent < policy.floor
        dropped = recent < self.level - policy.drop
        if not (below_floor or dropped):
            self.fallen_at = self.shadow_at = None
            self.level = quality.accuracy()
            self._served_good(self.champion)
            return []
        self.pending.clear()  # they learned labels this monitor now sees fall
        # (no cool-down here: a rollback is taken only to a version shown better on the
        # recent labels, and a champion that collapsed right after a promotion cannot wait)
        if self.fallen_at is None:
            self.fallen_at = self.labels
        if self.labels - self.fallen_at >= self.spec.window:
            # fallen for a full window and no earlier version did better on it: a new
            # concept, not a bad version. Its level is learned again (from the next label)
            self.level = self.fallen_at = self.shadow_at = None
            return []
        if self.shadow_at is not None and self.labels - self.shadow_at < policy.window:
            return []  # refused a window ago: try again on labels it has not seen
        before = self.labels - policy.window
        # the last few versions served while it was good, a full window before the fall
        # (one pruned since is passed over): the newest may already have learned what
        # made it fall (a burst of bad labels that it first fitted)
        targets: list[tuple[int, ChampionPointer]] = []
        for n, p in reversed(self.good):
            if n <= before and p not in (t for _, t in targets) and self.registry.has(p):
                targets.append((n, p))
                if len(targets) == ROLLBACK_TARGETS:
                    break
        if not targets or len(self.recent) < policy.window:
            return []
        served = sum(ok for _, _, ok, _ in self.recent) / len(self.recent)
        alpha = policy.alpha / len(targets)  # Bonferroni: the best of several is tested
        best: tuple[float, int, ChampionPointer, int, int] | None = None
        oldest = min((s for *_, s in self.recent if s is not None), default=None)
        for n, target in targets:
            # refuses an unverifiable target (raises) before anything is decided
            version = self.registry.load(target.model, target.version)
            # (an imported version's count is of the learner it came from)
            learned = version.meta.get("labels_seen")
            if (oldest is not None and isinstance(learned, int) and learned >= oldest
                    and "imported_from" not in version.meta):  # fmt: skip
                # it learned some of the labels it would be scored on (the learner
                # published it before this monitor saw it served): scored on what it
                # was trained on, it would look right on them, as a version that
                # fitted a burst of bad labels does on that burst
                continue
            shadow = self._shadow(version.model)
            if shadow is None:
                break  # labels without inputs (an older learner): nothing can be shown
            p_value = sign_test(*shadow)
            if best is None or p_value < best[0]:
                best = (p_value, n, target, *shadow)
        if best is None:
            self.shadow_at = self.labels
            return []
        p_value, n, target, target_only, champion_only = best
        accuracy = served + (target_only - champion_only) / len(self.recent)
        evidence = {"recent_accuracy": round(recent, 6), "window": policy.window,
                    "good_level": None if self.level is None else round(self.level, 6),
                    "drop": policy.drop, "floor": policy.floor,
                    "from": str(self.champion), "to": str(target),
                    "shadow_labels": len(self.recent), "targets_scored": len(targets),
                    "champion_window_accuracy": round(served, 6),
                    "target_window_accuracy": round(accuracy, 6),
                    "target_only_right": target_only, "champion_only_right": champion_only,
                    "sign_test_p": p_value, "alpha": alpha}  # fmt: skip
        if p_value >= alpha:
            self.shadow_at = self.labels
            return []  # not shown to mend it: no move (tried again a window later)
        why = (f"accuracy over the last {policy.window} labels {recent:.3f} "
               + (f"< floor {policy.floor}" if below_floor
                  else f"fell more than {policy.drop} below {self.level:.3f}")
               + f"; {target} right on {accuracy:.3f} of them"
               + f" (sign test p={p_value:.1e})")  # fmt: skip
        # (a move that raises refuses nothing: the check owed, run again, moves)
        with self.unsure.attempt("rollback", target, (why, evidence, n)):
            moved = self.registry.move(target, "rollback", self.champion, why)
        if moved is None:
            self.shadow_at = self.labels
            return []  # the pointer moved meanwhile: look again with the next label
        return [self._moved("rollback", target, why, evidence, n, moved.at)]

    def _served_good(self, pointer: ChampionPointer) -> None:
        """The champion ``pointer`` was served while it was good: a rollback target from
        now on, unless it had learned the labels it was judged on. The learner runs
        ahead of the monitor: 300 labels into a burst of flipped labels it published a
        version that fitted them, and the pointer followed while the monitor had read
        only the burst's first labels, no fall shown yet. Counted good then, that
        version, scored on the rest of the burst, was right on it and was rolled back
        to during the burst (CI, 2026-12-04). Such a version is held (``pending``) until
        this monitor has read past the labels it learned without a fall (a fall forgets
        it), then counted good, even if the pointer has moved on since (a monitor
        lagging the learner by more than a publication never sees a version served on
        labels after its own). A version whose count is unknown, or imported (its
        count is another learner's), is counted good at once, as are labels without
        the learner's count."""
        seen = self.recent[-1][3] if self.recent else None
        learned = None if seen is None else self._learned(pointer)
        if learned is not None and seen is not None and seen <= learned:
            if all(p != pointer for _, p in self.pending):
                self.pending.append((learned, pointer))
        elif not self.good or self.good[-1][1] != pointer:
            self.good.append((self.labels, pointer))
        else:
            self.good[-1] = (self.labels, pointer)
        ready = [] if seen is None else [e for e in self.pending if e[0] < seen]
        for entry in ready:  # the monitor has read past what they learned, no fall
            self.pending.remove(entry)
            self.good.append((self.labels, entry[1]))

    def _learned(self, pointer: ChampionPointer) -> int | None:
        """The learner's count of labels when ``pointer`` was published (None: not known,
        imported, or not in the registry: the spec's fresh v0, or pruned); one
        registry read per version."""
        if self._learned_at is None or self._learned_at[0] != pointer:
            try:
                meta = self.registry.meta(pointer.model, pointer.version)
            except ModelError:
                meta = {}
            count = meta.get("labels_seen")
            known = isinstance(count, int) and "imported_from" not in meta
            self._learned_at = (pointer, count if known else None)
        return self._learned_at[1]

    def _shadow(self, model: Any) -> tuple[int, int] | None:
        """``model`` scored on the champion's last ``rollback.window`` labels: how many
        it got right that the champion got wrong, and the other way round (None
        unless each label came with its inputs and the window is full)."""
        if len(self.recent) < self.spec.rollback.window:
            return None
        model_only = champion_only = 0
        for inputs, label, champion_right, _ in self.recent:
            if inputs is None:
                return None  # from a learner that does not pass them on
            right = self.target.right(model, inputs, label)
            model_only += right and not champion_right
            champion_only += champion_right and not right
        return model_only, champion_only

    def _champion_changed(self) -> None:
        """A model was swapped in: its errors are not a drift, its level is its own,
        challengers are compared with it afresh."""
        self.duels.clear()
        self.slate_duels.clear()
        self.slate_waiting.clear()
        self.level = self.fallen_at = self.shadow_at = None
        self.recent.clear()
        watch = self.watches.get(self.champion_name)
        if watch is not None:
            watch.settle(self.spec, self.labels)

    def _check_promotions(self, champion: str) -> list[Decision]:
        """The per-label promotion: on the challengers' paired duels."""

        def why(name: str, duel: PairedDuel, e_value: float, threshold: float) -> str:
            if self.target.kind == "regression":
                alone, champ, gain = "with the smaller error", "", "scaled error reduction"
            else:
                alone, champ, gain = "right alone", " alone", "accuracy"
            return (f"{name} {alone} on {duel.wins}, the champion{champ} on {duel.losses} "
                    f"of {duel.n} paired labelled events (e-value {e_value:.3g} >= 1/alpha = "
                    f"{threshold:g}); {duel.recent_gain():+.4f} {gain} over the last "
                    f"{len(duel.recent)}")  # fmt: skip

        return self._promote_first(champion, self.duels, why, lambda duel: duel.as_evidence())

    def _check_slate_promotions(self, champion: str) -> list[Decision]:
        """A slate pipeline's promotion: on the challengers' off-policy duels."""
        alpha = self.spec.promote.alpha

        def why(name: str, duel: OffPolicyDuel, e_value: float, threshold: float) -> str:
            return (f"{name} would have had {duel.challenger_ctr():.4f} clicks per shown slot "
                    f"(off-policy IPS), the champion had {duel.champion_ctr():.4f} as served, "
                    f"on the same {duel.n} requests (e-value {e_value:.3g} >= 1/alpha = "
                    f"{threshold:g}; gain at least {duel.lower_bound(alpha):+.4f} with "
                    f"confidence 1 - alpha, however often looked at)")  # fmt: skip

        return self._promote_first(
            champion, self.slate_duels, why, lambda duel: duel.as_evidence(alpha)
        )

    def _promote_first(
        self,
        champion: str,
        duels: Mapping[str, Any],
        why: Callable[[str, Any, float, float], str],
        evidence: Callable[[Any], dict[str, Any]],
    ) -> list[Decision]:
        """Promote the first of ``duels`` whose e-value reached ``1 / alpha`` with a
        recent gain of at least ``margin`` and a ready latest version (none while
        promotion is off or cooling down): ``why`` says it, ``evidence`` is its duel's."""
        policy = self.spec.promote
        if not policy.enabled or self._cooling():
            return []
        threshold = 1 / policy.alpha
        for name, duel in duels.items():
            e_value = duel.e_value()
            if e_value < threshold or duel.recent_gain() < policy.margin:
                continue
            ready = self._ready(name)
            if ready is None:
                continue
            version, trained = ready
            proof = {**evidence(duel), "margin": policy.margin, "alpha": policy.alpha,
                     "from": self._serving(champion), "trained_labels": trained}  # fmt: skip
            return [self._promote(name, version, why(name, duel, e_value, threshold), proof)]
        return []

    def _ready(self, name: str) -> tuple[int, int] | None:
        """A challenger's latest published version and the labels it learned, if it
        learned ``promote.min_labels``: a model that is not ready is never served."""
        version = self.registry.latest(name)
        if version is None:
            return None
        trained = self.registry.meta(name, version).get("metrics", {}).get("labels", 0)
        if trained < self.spec.promote.min_labels:
            return None  # not ready: its latest version has learned too little
        return version, trained

    def _serving(self, champion: str) -> str:
        """The champion a promotion moves away from, as its evidence names it."""
        return str(self.champion) if self.champion else champion

    def _promote(self, name: str, version: int, why: str, evidence: dict[str, Any]) -> Decision:
        to = ChampionPointer(name, version)
        with self.unsure.attempt("promote", to, (why, evidence, None)):
            moved = self.registry.promote(to, "promote", why)
        return self._moved("promote", to, why, evidence, None, moved.at)

    def _moved(
        self,
        kind: str,
        to: ChampionPointer,
        why: str,
        evidence: dict[str, Any],
        good_until: int | None,
        at: float,
    ) -> Decision:
        """The pointer moved to ``to`` by this monitor's ``kind`` of decision, at ``at``
        (the move's time in the registry's history: the audit log's reconciler,
        ``riverflow.stages.audit``, knows the decision's record by it): the champion is
        ``to``; after a rollback, the versions served while it was good are those up to
        ``good_until`` labels."""
        self.champion = to
        while good_until is not None and self.good and self.good[-1][0] > good_until:
            self.good.pop()
        self.pending.clear()  # (versions of the line moved away from)
        self._champion_changed()
        self.last_decision = self.labels
        return self._decision(kind, to.model, to.version, why, evidence, at)

    def _decision(
        self,
        kind: str,
        model: str,
        version: int,
        reason: str,
        evidence: dict[str, Any],
        at: float | None = None,
    ) -> Decision:
        when = self.clock() if at is None else at
        return Decision(kind, model, version, reason, evidence, when, self.labels)
