"""River's synthetic drift streams with drifts at known positions, and how alarms
and decisions are scored against them (the pure half of ``riverflow drift-eval``,
``riverflow.tools.drift_eval``).

Scoring: a drift is *detected* by an alarm from the start of its change to
``accept`` events after its transition (``alarm_figures``); an alarm outside
every drift window is false; promotions and rollbacks are counted outside the
drift windows and on *stationary stretches* (``DriftWindows``).

A drift that the served model's error stream cannot show (its error over the
``AFTER`` events from the middle of the change no higher, by ``Z`` standard
errors, than over the ``BEFORE`` events before it) is reported as undetectable
and left out of recall, never dropped silently; each run is judged on its own
error stream.

Streams (``drifting_stream``): ``sea`` (SEA variants 0 1 2 3 in turn, abrupt),
``sea-gradual`` (the same through River's ``ConceptDriftStream``, each change a
sigmoid ``width`` events wide), ``agrawal`` (Agrawal functions in the order of
``FUNCTIONS``, every switch a large change) and ``agrawal-all`` (functions 0 to
9 in turn, the near-constant 7 and 9 included).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from river import tree
from river.datasets import synth

from riverflow.monitors.drift import DetectorSpec, ErrorDriftMonitor

# Agrawal's classification functions in an order where every switch is a real
# concept change: neighbours (and the last and the first) label 46-72% of the
# same samples differently (``concept_disagreement``). Left out or kept apart:
# functions 7 and 9, near-constant in River's generator (2% and 0% positive);
# 6 and 8, which disagree on 6% of samples (a model of one is a model of the
# other: the switch 6 -> 8 left the error rate at 10-13% and went undetected);
# 1 with 3 (20%) or 5 (28%). ``agrawal-all`` takes all ten, 0 to 9.
FUNCTIONS = (5, 0, 1, 6, 3, 8, 4, 2)
ALL_FUNCTIONS = tuple(range(10))
STREAMS = ("sea", "sea-gradual", "agrawal", "agrawal-all")
GRADUAL_WIDTH = 5_000
BEFORE, AFTER, Z = 1_000, 500, 3.0  # what makes a drift detectable (see the docstring)
Sample = tuple[dict[str, Any], Any]


def concepts(stream: str, segments: int) -> list[int]:
    """The concept of each segment: an Agrawal function or a SEA variant."""
    if stream.startswith("sea"):
        return [i % 4 for i in range(segments)]
    order = ALL_FUNCTIONS if stream == "agrawal-all" else FUNCTIONS
    return [order[i % len(order)] for i in range(segments)]


def stream_width(stream: str) -> int:
    """Events a change takes: 1 (abrupt) but for ``sea-gradual``."""
    return GRADUAL_WIDTH if stream == "sea-gradual" else 1


def drifting_stream(
    n: int, every: int, seed: int, stream: str = "agrawal"
) -> tuple[Iterator[Sample], list[int]]:
    """``n`` samples, the concept changing every ``every`` samples; returns them and
    where each change *starts*.

    Abrupt streams chain segments of ``every`` samples: ``ConceptDriftStream`` with
    ``width=1`` overflows ``math.exp`` a few hundred samples before the drift
    (River 0.26). ``sea-gradual`` centres a ``ConceptDriftStream`` on each change,
    from ``every / 2`` before it to ``every / 2`` after (short enough that its
    sigmoid does not overflow), so the change starts ``width / 2`` before the
    centre. SEA has no noise; its features are named ``x0``-``x2``.
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}: one of {', '.join(STREAMS)}")
    centres = list(range(every, n, every))
    kinds = concepts(stream, len(centres) + 1)
    if stream.startswith("agrawal"):
        parts: list[Iterable[Sample]] = [
            synth.Agrawal(f, seed=seed + i).take(min(every, n - i * every))
            for i, f in enumerate(kinds)
        ]
        return itertools.chain.from_iterable(parts), centres
    if stream == "sea":
        parts = [synth.SEA(variant=v, seed=seed + i).take(min(every, n - i * every))
                 for i, v in enumerate(kinds)]  # fmt: skip
        starts = centres
    else:
        width, half = GRADUAL_WIDTH, every // 2
        parts = [synth.SEA(variant=kinds[0], seed=seed).take(min(half, n))]
        for i, c in enumerate(centres):
            mixed = synth.ConceptDriftStream(
                synth.SEA(variant=kinds[i], seed=seed + 100 + i),
                synth.SEA(variant=kinds[i + 1], seed=seed + i + 1),
                position=half, width=width, seed=seed + 200 + i,
            )  # fmt: skip
            last = i == len(centres) - 1
            parts.append(mixed.take(n - (c - half) if last else every))
        starts = [c - width // 2 for c in centres]
    named = (({f"x{k}": v for k, v in x.items()}, y) for x, y in itertools.chain(*parts))
    return named, starts


def concept_disagreement(
    a: int, b: int, n: int = 10_000, seed: int = 0, stream: str = "agrawal"
) -> float:
    """Share of samples that concepts ``a`` and ``b`` (Agrawal functions, or SEA
    variants for a ``sea`` stream) label differently: each generator draws the
    same samples for the same seed, whatever the concept."""

    def gen(concept: int) -> Iterable[Sample]:
        if stream.startswith("sea"):
            return synth.SEA(variant=concept, seed=seed).take(n)
        return synth.Agrawal(concept, seed=seed).take(n)

    pairs = zip(gen(a), gen(b), strict=True)
    return sum(ya != yb for (_, ya), (_, yb) in pairs) / n


def error_rise(errors: list[bool], start: int, width: int = 1) -> tuple[float, float, float]:
    """The error rate over the ``BEFORE`` events before a change starts and over
    the ``AFTER`` events from the middle of its transition (``width`` events; a
    model that keeps learning follows a slow change, so its error shows it by
    then or not at all), and the rise in standard errors (a two-proportion z; 0 when
    either side is empty)."""
    before = errors[max(0, start - BEFORE) : start]
    after = errors[start + width // 2 : start + width // 2 + AFTER]
    if not before or not after:
        return 0.0, 0.0, 0.0
    p1, p2 = sum(before) / len(before), sum(after) / len(after)
    pooled = (sum(before) + sum(after)) / (len(before) + len(after))
    se = math.sqrt(pooled * (1 - pooled) * (1 / len(before) + 1 / len(after)))
    return p1, p2, (p2 - p1) / se if se else 0.0


def drift_profile(
    errors: list[bool], drifts: list[int], stream: str = "agrawal", width: int = 1
) -> list[dict[str, Any]]:
    """Per drift: the two concepts and their disagreement, the served model's
    error before and after it (``error_rise``) and whether that error stream can
    show it (``detectable``: a rise of at least ``Z`` standard errors). Whether
    it can depends on the model as well as the concepts: one already confused by
    earlier concepts may err as often before a change as after it."""
    kinds = concepts(stream, len(drifts) + 1)
    out = []
    for i, d in enumerate(drifts):
        a, b = kinds[i], kinds[i + 1]
        before, after, z = error_rise(errors, d, width)
        out.append({
            "at": d, "from": a, "to": b,
            "disagreement": concept_disagreement(a, b, 5_000, stream=stream),
            "error_before": before, "error_after": after, "z": round(z, 2), "detectable": z >= Z,
        })  # fmt: skip
    return out


@dataclass(frozen=True)
class DriftWindows:
    """Where a run's drifts are, and which events are far from any.

    Drift ``k`` starts at ``starts[k]`` and takes ``width`` events; an alarm from
    its start to ``accept`` events after its transition detects it. An event is on
    a *stationary stretch* once the concept has been fixed for at least half the
    time between two changes (``(every - width + 1) // 2`` events after the last
    transition ended, or after the start of the stream: SEA 70,000-80,000 with a
    drift every 20,000).
    """

    starts: list[int]
    events: int
    every: int
    accept: int = 2_000
    width: int = 1

    def in_drift(self, i: int) -> bool:
        """Whether event ``i`` is in some drift's window."""
        span = self.accept + self.width - 1
        return any(s <= i < s + span for s in self.starts)

    def stationary(self, i: int) -> bool:
        ended = max((s + self.width - 1 for s in self.starts if s <= i), default=0)
        return i - ended >= (self.every - self.width + 1) // 2


def alarm_figures(
    alarms: Iterable[int], windows: DriftWindows, detectable: list[bool]
) -> dict[str, Any]:
    """Recall over the detectable drifts (the first alarm in a drift's window
    detects it), the mean delay from the start of the change, and false alarms:
    those outside every drift window (more alarms inside one, of other candidates
    or of the champion again, answer the same change)."""
    alarms = sorted(alarms)
    delays: list[int | None] = []
    span = windows.accept + windows.width - 1
    for s in windows.starts:
        hit = next((a for a in alarms if s <= a < s + span), None)
        delays.append(None if hit is None else hit - s)
    seen = [d for d, ok in zip(delays, detectable, strict=True) if ok and d is not None]
    episodes = sum(detectable)
    false = sum(not windows.in_drift(a) for a in alarms)
    return {
        "alarms": len(alarms),
        "detectable": episodes,
        "undetectable": len(detectable) - episodes,
        "detected": len(seen),
        "recall": len(seen) / episodes if episodes else None,
        "mean_delay": statistics.fmean(seen) if seen else None,
        "delays": delays,
        "detected_undetectable": sum(
            d is not None for d, ok in zip(delays, detectable, strict=True) if not ok
        ),
        "false_alarms": false,
        "false_at": [a for a in alarms if not windows.in_drift(a)],
        "false_per_100k": false / windows.events * 100_000,
    }


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


def score(name: str, alarms: list[int], drifts: list[int], n: int, accept: int) -> DetectionScore:
    """The first alarm within ``accept`` events of a drift detects it; any other is
    false (issue 5's scoring of one detector, stricter than ``alarm_figures``)."""
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
        level = acc(d) if d >= window else acc(window)
        stop = drifts[i + 1] if i + 1 < len(drifts) else len(correct)
        t = next((t for t in range(d + window, stop + 1) if acc(t) >= level - 0.02), stop)
        out.append(t - d)
    return out


def default_model() -> Any:
    return tree.HoeffdingTreeClassifier(grace_period=100)
