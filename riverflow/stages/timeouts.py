"""Labels by timeout: a scored event with no label message within ``label.after`` of
its prediction is labelled ``label.default`` (the spec's ``label: {default, after}``).

The predictions topic is the timer queue. The learner keeps a second, trailing
position on it (``Timeouts.positions``, per partition) that only moves over
predictions served more than ``after`` ago: each of them defaults the ids
``features.scored.defaulted_ids`` names (the event, or the shown items of a
slate, ``streams.contracts.shown_items``: the very pairs the learner indexes). So
the learner holds no timer per event: what waits is the topic itself, and memory
stays that of the learner's index of scored events. The positions go into the
learner's checkpoint, so a restarted learner neither defaults a prediction twice
into its models nor skips one.

A default is claimed in the store like a label message (``FeatureStore.claim_labels``,
under the token ``run:d{partition}:{offset}`` of its prediction): whichever of the
real label and the default is claimed first is learned; the other finds the mark.

With ``label.learn: at_timeout`` a label message is claimed when it arrives but held
(``Learner.held``, in the checkpoint's waiting labels) until its prediction falls
due here: then the prediction's ids are learned together in its order (a slate's
shown items by position), each with its held label or the default. So clicks and
their negatives reach the models interleaved as they were served, not in bursts
``after`` apart.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from riverflow.errors import RiverflowError
from riverflow.features.scored import defaulted_ids
from riverflow.streams.contracts import Label, Message
from riverflow.streams.schema import LabelLearning, LabelSpec

log = logging.getLogger(__name__)

DEFAULT_MARK = "d"
"""A default's token names its prediction's partition after this letter
(``run:d3:1042``): a label message's names the labels partition (``run:3:1042``)."""


def is_default_token(token: str) -> bool:
    """Whether a learned-mark was left by a label by timeout (not by a label message)."""
    parts = token.split(":")
    return len(parts) == 3 and parts[1].startswith(DEFAULT_MARK)


@dataclass(frozen=True)
class LabelTimeout:
    """What an unlabelled scored event becomes (``default``) and after how long;
    ``hold``: label messages wait for the timeout too (``label.learn: at_timeout``),
    so every id of a prediction is learned at once, in its order."""

    default: Label
    after_s: float
    hold: bool = False


def label_timeout(label: LabelSpec, label_horizon_s: float) -> LabelTimeout | None:
    """The spec's label by timeout, None if it has none.

    ``RiverflowError`` if ``after`` is longer than the label horizon: the learner's
    index lets a scored event go at the horizon, so its default would find nothing
    to label (and the predictions topic keeps its records only that long).
    """
    after, default = label.after_s, label.default_label
    if after is None or default is None:
        return None
    if after > label_horizon_s:
        raise RiverflowError(
            f"label.after ({label.after}, {after:g} s) is longer than the label horizon "
            f"RIVERFLOW_LABEL_HORIZON_S ({label_horizon_s:g} s): a scored event leaves "
            "the learner's index at the horizon, before its default. Raise the horizon "
            "or shorten label.after"
        )
    return LabelTimeout(default, after, hold=label.learn is LabelLearning.AT_TIMEOUT)


class TimerQueue(Protocol):
    """The predictions topic as the labels by timeout read it: from positions the
    caller moves (``streams.trailing.TrailingReader`` on Kafka, the embedded log)."""

    def start(self, positions: Mapping[int, int]) -> dict[int, int]:
        """``positions`` (partition -> next offset), with a start for every partition
        of the topic that has none (the first record within the label horizon)."""
        ...

    def fetch(self, positions: Mapping[int, int]) -> Mapping[int, Sequence[Message]]:
        """Per partition, a bounded run of its records from ``positions`` on, in
        order; the next call goes on from wherever the caller moved them."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DueDefault:
    """A prediction whose timeout fell due, and the ids it defaults."""

    msg: Message
    ids: list[str]
    due_at: float  # when it fell due (served + after), on the queue's clock


def served_at(msg: Message, prediction: Any) -> float | None:
    """When a prediction was served: its Kafka timestamp, or (the embedded log keeps
    none) its ``scored_at``; None if it says neither."""
    if msg.timestamp_ms is not None:
        return msg.timestamp_ms / 1000
    scored = prediction.get("scored_at") if isinstance(prediction, dict) else None
    if isinstance(scored, int | float) and type(scored) is not bool and math.isfinite(scored):
        return float(scored)
    return None


class Timeouts:
    """Where the labels by timeout are on the predictions topic, and which are due.

    ``indexed``: per partition, the next prediction the learner's index of scored
    events has not read yet: the timeouts never pass it, so a default never
    misses an event the index was only late to read. ``clock``: the time
    predictions are stamped in (wall time; a replay's event time). At most
    ``limit`` predictions are due per call.

    ``labels_read``: the time on ``clock`` before which every label message
    produced has been read by the learner (None while that is not known). A
    prediction falls due only once its timeout is past that time too: a learner
    that lags on the labels topic, or was down, reads the labels in its backlog
    before it defaults their predictions, so a click within ``after`` is never
    beaten by its default. Not given: every label is read when it is due.
    """

    def __init__(
        self,
        timeout: LabelTimeout,
        queue: TimerQueue,
        indexed: Callable[[], Mapping[int, int]],
        clock: Callable[[], float] = time.time,
        limit: int = 5000,
        labels_read: Callable[[], float | None] | None = None,
    ) -> None:
        self.timeout = timeout
        self.queue = queue
        self.indexed = indexed
        self.clock = clock
        self.limit = limit
        self.labels_read = labels_read
        self._positions: dict[int, int] | None = None

    @property
    def positions(self) -> dict[int, int]:
        """Per predictions partition, the next prediction to examine."""
        if self._positions is None:
            self._positions = self.queue.start({})
        return self._positions

    def restore(self, saved: Mapping[int, int]) -> None:
        """Go on from a checkpoint's positions (partitions it lacks from the start)."""
        self._positions = self.queue.start(saved)

    def due(self) -> list[DueDefault]:
        """The predictions served more than ``after`` ago, and more than ``after``
        before the labels read (``labels_read``), from the positions on (in order per
        partition, up to the first not due yet); positions do not move until
        ``advance``."""
        after = self.timeout.after_s
        now = until = self.clock()
        if self.labels_read is not None:
            read = self.labels_read()
            if read is None:  # how far the labels were read is not known yet
                return []
            until = min(now, read)
        positions, indexed = self.positions, self.indexed()
        out: list[DueDefault] = []
        for p, run in self.queue.fetch(positions).items():
            at, end = positions.get(p, 0), indexed.get(p, 0)
            for msg in run:
                if len(out) >= self.limit or msg.offset >= end:
                    break
                if msg.offset < at:
                    continue
                try:
                    prediction = orjson.loads(msg.value or b"")
                except orjson.JSONDecodeError:
                    prediction = None
                served = served_at(msg, prediction)
                if served is not None and served > now + after:
                    # stamped further ahead than the timeout itself: no clock is that
                    # wrong, so not a record to hold the partition's timeouts behind
                    log.warning("%s[%s]@%s is stamped %.0f s ahead: its timeout is due now",
                                msg.topic, p, msg.offset, served - now)  # fmt: skip
                    served = None
                if served is not None and served + after > until:
                    break
                due_at = now if served is None else served + after
                out.append(DueDefault(msg, defaulted_ids(prediction), due_at))
        return out

    def advance(self, msg: Message) -> None:
        """The prediction ``msg`` is done with: defaulted, or found labelled."""
        positions = self.positions
        positions[msg.partition] = max(positions.get(msg.partition, 0), msg.offset + 1)

    def close(self) -> None:
        self.queue.close()
