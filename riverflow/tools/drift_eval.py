"""How well drift detection works, measured on River's synthetic drift streams.

``riverflow drift-eval`` runs this: Agrawal streams with abrupt drifts at known
positions (concepts switched every N samples), a Hoeffding tree learning
prequentially, and every detector fed the same error stream, scored by

- episode recall: drifts followed by an alarm within ``accept`` events;
- detection delay: events from the drift to that first alarm;
- false alarms: every other alarm, per 100,000 events;

beside a detector that never fires and one that always fires. Each drift is
reported with how much the two concepts disagree and the model's error rate
just before and after it: a detector on the error stream can only see a drift
that raises the error. A second
experiment measures recovery: events until the served model's windowed
accuracy is back within 2 points of its pre-drift level, with no monitor
(the champion keeps learning) and with the monitor policy (an alarm starts a
fresh challenger, promoted once it beats the champion on the same events).
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from river import tree
from river.datasets import synth

from riverflow.monitors.drift import DetectorKind, DetectorSpec, ErrorDriftMonitor

# Agrawal's classification functions in an order where every switch is a real
# concept change: neighbours (and the last and the first) label 46-72% of the
# same samples differently (``concept_disagreement``). Left out or kept apart:
# functions 7 and 9, near-constant in River's generator (2% and 0% positive);
# 6 and 8, which disagree on 6% of samples (a model of one is a model of the
# other: the switch 6 -> 8 left the error rate at 10-13% and went undetected);
# 1 with 3 (20%) or 5 (28%).
FUNCTIONS = (5, 0, 1, 6, 3, 8, 4, 2)
Sample = tuple[dict[str, Any], Any]


def drifting_stream(
    n: int, every: int, seed: int, stream: str = "agrawal"
) -> tuple[Iterator[Sample], list[int]]:
    """``n`` samples, the concept switching abruptly every ``every`` samples.

    ``agrawal``: River's Agrawal functions in the order of ``FUNCTIONS``; ``sea``:
    River's SEA (no noise) through its variants 0 1 2 3 in turn (thresholds 8, 9,
    7, 9.5 on the sum of the first two features), features named ``x0``-``x2``.
    The segments are chained here rather than nested in ``ConceptDriftStream``:
    with ``width=1`` (abrupt) its sigmoid overflows ``math.exp`` a few hundred
    samples before the drift position (River 0.26), and a wider width is not abrupt.
    """
    drifts = list(range(every, n, every))
    if stream == "agrawal":
        segments = [
            synth.Agrawal(FUNCTIONS[i % len(FUNCTIONS)], seed=seed + i).take(min(every, n - start))
            for i, start in enumerate(range(0, n, every))
        ]
        return itertools.chain.from_iterable(segments), drifts
    if stream == "sea":
        seas = [
            synth.SEA(variant=i % 4, seed=seed + i).take(min(every, n - start))
            for i, start in enumerate(range(0, n, every))
        ]
        named = ((({f"x{k}": v for k, v in x.items()}), y) for x, y in itertools.chain(*seas))
        return named, drifts
    raise ValueError(f"unknown stream {stream!r}: agrawal or sea")


def stationary_stream(n: int, seed: int) -> Iterator[Sample]:
    return iter(synth.Agrawal(FUNCTIONS[0], seed=seed).take(n))


def concept_disagreement(a: int, b: int, n: int = 10_000, seed: int = 0) -> float:
    """Share of samples that Agrawal functions ``a`` and ``b`` label differently
    (the generator draws the same samples for the same seed, whatever the function)."""
    pairs = zip(
        synth.Agrawal(a, seed=seed).take(n), synth.Agrawal(b, seed=seed).take(n), strict=True
    )
    return sum(ya != yb for (_, ya), (_, yb) in pairs) / n


def drift_profile(errors: list[bool], drifts: list[int]) -> list[dict[str, Any]]:
    """Per drift: the two concepts, their disagreement, and the model's error rate
    over the 1,000 events before it and the 500 after."""
    out = []
    for i, d in enumerate(drifts):
        a, b = FUNCTIONS[i % len(FUNCTIONS)], FUNCTIONS[(i + 1) % len(FUNCTIONS)]
        before, after = errors[max(0, d - 1000) : d], errors[d : d + 500]
        out.append({
            "at": d, "from": a, "to": b, "disagreement": concept_disagreement(a, b),
            "error_before": sum(before) / len(before), "error_after": sum(after) / len(after),
        })  # fmt: skip
    return out


@dataclass
class DetectionScore:
    """Episode recall, delay and false alarms of one detector on one stream."""

    name: str
    episodes: int
    detected: int
    delays: list[int]
    false_alarms: int
    events: int

    @property
    def recall(self) -> float:
        return self.detected / self.episodes if self.episodes else float("nan")

    @property
    def mean_delay(self) -> float:
        return statistics.fmean(self.delays) if self.delays else float("nan")

    @property
    def false_per_100k(self) -> float:
        return self.false_alarms / self.events * 100_000

    def as_dict(self) -> dict[str, Any]:
        return {
            "detector": self.name, "episodes": self.episodes, "detected": self.detected,
            "recall": self.recall, "mean_delay": self.mean_delay,
            "false_alarms": self.false_alarms, "false_per_100k": self.false_per_100k,
        }  # fmt: skip


def score(name: str, alarms: list[int], drifts: list[int], n: int, accept: int) -> DetectionScore:
    """The first alarm within ``accept`` events of a drift detects it; any other is false."""
    alarms = sorted(alarms)
    detecting: set[int] = set()
    delays = []
    for i, d in enumerate(drifts):
        end = min(d + accept, drifts[i + 1] if i + 1 < len(drifts) else n)
        hit = next((a for a in alarms if d <= a < end), None)
        if hit is not None:
            detecting.add(hit)
            delays.append(hit - d)
    false = sum(a not in detecting for a in alarms)
    return DetectionScore(name, len(drifts), len(delays), delays, false, n)


def prequential_errors(samples: Iterator[Sample], model_factory: Callable[[], Any]) -> list[bool]:
    """The 0/1 error of a model that keeps learning (no monitor): test, then train."""
    model = model_factory()
    errors = []
    for x, y in samples:
        errors.append(model.predict_one(x) != y)
        model.learn_one(x, y)
    return errors


def detect(errors: list[bool], spec: DetectorSpec) -> list[int]:
    """Positions where the monitor raised an alarm on this error stream."""
    monitor = ErrorDriftMonitor(spec)
    return [i for i, e in enumerate(errors) if monitor.update(e)]


@dataclass
class PolicyRun:
    """What was served under the monitor policy: correctness per event and its moves."""

    correct: list[bool] = field(default_factory=list)
    alarms: list[int] = field(default_factory=list)
    promotions: list[int] = field(default_factory=list)


def serve_with_monitor(
    samples: Iterator[Sample],
    model_factory: Callable[[], Any],
    spec: DetectorSpec,
    min_labels: int = 200,
    patience: int = 5_000,
) -> PolicyRun:
    """Champion + challenger: an alarm starts a fresh challenger; it replaces the
    champion once more right than the champion on the same (>= min_labels) events,
    and is dropped after ``patience`` events without doing so."""
    run = PolicyRun()
    champion = model_factory()
    challenger: Any = None
    duel: deque[int] = deque()  # challenger right minus champion right, per shared event
    monitor = ErrorDriftMonitor(spec)
    for i, (x, y) in enumerate(samples):
        served_right = champion.predict_one(x) == y
        run.correct.append(served_right)
        if challenger is not None:
            duel.append(int(challenger.predict_one(x) == y) - int(served_right))
            challenger.learn_one(x, y)
            if len(duel) >= min_labels and sum(duel) > 0:
                champion, challenger = challenger, None
                monitor = ErrorDriftMonitor(spec)
                run.promotions.append(i)
            elif len(duel) >= patience:
                challenger = None
        champion.learn_one(x, y)
        if monitor.update(not served_right):
            run.alarms.append(i)
            if challenger is None:
                challenger, duel = model_factory(), deque()
    return run


def recovery_times(correct: list[bool], drifts: list[int], window: int = 1_000) -> list[int]:
    """Per drift: events until windowed accuracy (all after the drift) is back within
    2 points of the ``window`` events before it; censored at the next drift."""
    prefix = [0]
    for c in correct:
        prefix.append(prefix[-1] + c)

    def acc(end: int) -> float:  # accuracy over (end - window, end]
        return (prefix[end] - prefix[end - window]) / window

    out = []
    for i, d in enumerate(drifts):
        level = acc(d)
        stop = drifts[i + 1] if i + 1 < len(drifts) else len(correct)
        t = next((t for t in range(d + window, stop + 1) if acc(t) >= level - 0.02), stop)
        out.append(t - d)
    return out


@dataclass
class DriftEvalConfig:
    events: int = 200_000
    every: int = 25_000
    stationary: int = 1_000_000
    accept: int = 2_000
    seed: int = 42


def default_model() -> Any:
    return tree.HoeffdingTreeClassifier(grace_period=100)


def run_drift_eval(cfg: DriftEvalConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Both experiments; returns the figures ``riverflow drift-eval`` prints and saves."""
    samples, drifts = drifting_stream(cfg.events, cfg.every, cfg.seed)
    errors = prequential_errors(samples, default_model)
    log(f"drifting stream: {cfg.events:,} events, drifts at {drifts}")
    profile = drift_profile(errors, drifts)
    for p in profile:
        log(f"  at {p['at']:,}: function {p['from']} -> {p['to']} "
            f"(disagree on {p['disagreement']:.0%} of samples), model error "
            f"{p['error_before']:.1%} -> {p['error_after']:.1%}")  # fmt: skip
    scores = [score(k.value, detect(errors, DetectorSpec(kind=k)), drifts, cfg.events, cfg.accept)
              for k in DetectorKind]  # fmt: skip
    scores.append(score("never fires", [], drifts, cfg.events, cfg.accept))
    scores.append(score("always fires", list(range(cfg.events)), drifts, cfg.events, cfg.accept))

    plain = [not e for e in errors]
    samples, _ = drifting_stream(cfg.events, cfg.every, cfg.seed)
    policy = serve_with_monitor(samples, default_model, DetectorSpec())
    without, with_monitor = recovery_times(plain, drifts), recovery_times(policy.correct, drifts)
    log(f"recovery: {statistics.fmean(without):,.0f} events without monitor, "
        f"{statistics.fmean(with_monitor):,.0f} with")  # fmt: skip

    stationary_errors = prequential_errors(
        stationary_stream(cfg.stationary, cfg.seed), default_model
    )
    stationary = score("adwin", detect(stationary_errors, DetectorSpec()), [], cfg.stationary, 0)
    return {
        "config": cfg.__dict__,
        "drifts": drifts,
        "drift_profile": profile,
        "detection": [s.as_dict() for s in scores],
        "recovery": {
            "without_monitor": without,
            "with_monitor": with_monitor,
            "mean_without": statistics.fmean(without),
            "mean_with": statistics.fmean(with_monitor),
            "ratio": statistics.fmean(without) / statistics.fmean(with_monitor),
            "promotions": policy.promotions,
            "alarms": policy.alarms,
        },
        "stationary": stationary.as_dict(),
    }
