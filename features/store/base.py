"""What every store shares: the request, the snapshot, the served prediction, the
claim outcome, the ``FeatureStore`` protocol and how a snapshot is stored.

A snapshot is msgpack ``[model inputs JSON, [aggregate vector per group], late]``;
the vector layout is in ``features.definitions`` and ``FeaturePlan.values``
turns it into feature values. Once the event is scored, ``record_served``
makes it ``[..., late, [model, version, probability]]`` (a fourth element,
written once: the first prediction served is the one kept). A store keeps a
snapshot for the replay window only: long enough for a scorer to recognise its
own replays (count them once, serve the same answer). What a label joins,
days later, is read back from the predictions topic (``features.scored``); the
store keeps the labels' learned-marks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import msgpack
import msgspec
import orjson

from riverflow.features.definitions import FeaturePlan
from riverflow.streams.contracts import ServedPrediction

# msgspec's msgpack encoder writes what msgpack.packb writes for a snapshot or a served
# probability (strings, numbers, lists, None: byte for byte, tests/features/
# test_snapshot_encoding.py) in a fifth of the time; a slate request makes 20 of each
_encode = msgspec.msgpack.Encoder().encode


# Not frozen: a batch makes one of each per event (per pair of a slate), and a frozen
# dataclass's __init__ costs 5x a plain one's (0.85 against 0.17 us with 8 fields)
@dataclass(slots=True)
class FeatureRequest:
    """One event's part in a batch update: what to add, where, and its model inputs."""

    event_id: str
    ts: float
    entities: dict[str, str]  # entity name (``card_id``, ``card_id+merchant``) -> value
    numbers: dict[str, float]
    context: bytes  # JSON of the model inputs taken from the event
    distinct: dict[str, str] = field(default_factory=dict)  # fields counted distinct, as str
    # entities this event reads nothing from and adds nothing to: a slate's request
    # counts once in each entity it touches, with its first candidate there (the
    # scorer gives the other pairs that one's aggregates)
    read_only: tuple[str, ...] = ()
    # ``context`` decoded, when the caller has it (the scorer built the JSON from it):
    # the store's in-process snapshot takes it rather than parsing ``context`` again
    inputs: dict[str, Any] | None = None


def feature_request(
    plan: FeaturePlan,
    event: Mapping[str, Any],
    event_id: str,
    ts: float,
    context: bytes,
    entities: dict[str, str] | None = None,
    read_only: tuple[str, ...] = (),
    inputs: dict[str, Any] | None = None,
) -> FeatureRequest:
    """What the plan needs from one event: its entity keys (``entities`` if the caller
    has them: ``plan.entity_values(event)``), numbers and distinct values; ``inputs``:
    ``context`` decoded, if the caller has it (it must equal ``orjson.loads(context)``)."""
    return FeatureRequest(
        event_id,
        ts,
        plan.entity_values(event) if entities is None else entities,
        {f: event[f] for f in plan.number_fields},
        context,
        {f: str(event[f]) for f in plan.distinct_fields},
        read_only,
        inputs,
    )


def packed(served: ServedPrediction) -> bytes:
    """A served prediction as the snapshot's fourth element stores it: ``[model,
    version, probability]``, and for a label that is no flag ``[model, version, None,
    value, probabilities]``."""
    if served.probability is not None:
        return _encode([served.model, served.version, float(served.probability)])
    return msgpack.packb([served.model, served.version, None, served.value, served.probabilities])


@dataclass(slots=True)  # (not frozen: see FeatureRequest)
class FeatureSnapshot:
    """What an event was scored with: its model inputs and its window aggregates,
    and the prediction served for it once one was recorded."""

    event_id: str
    inputs: dict[str, Any]
    # a slate pair's are None (False from Redis) where it read only (FeatureRequest)
    aggregates: list[Any]
    replayed: bool = False
    late: bool = False  # too late for some window: scored, but not counted there
    served: ServedPrediction | None = None

    @classmethod
    def decode(cls, event_id: str, raw: bytes, replayed: bool = False) -> FeatureSnapshot:
        context, aggregates, late, *rest = msgpack.unpackb(raw)
        served = ServedPrediction(*rest[0]) if rest else None
        return cls(event_id, orjson.loads(context), aggregates, replayed, bool(late), served)


# A stored snapshot is a 3-element msgpack array (fixarray header 0x93) until its
# served prediction is added as a fourth element (header 0x94): the header byte
# says whether one is stored, without decoding the record.
_UNSERVED, _SERVED = 0x93, 0x94
SERVED_HEAD = bytes([_SERVED])


def with_served(raw: bytes, served: bytes) -> bytes | None:
    """The stored snapshot with its served prediction added, or None if it has one."""
    if raw[0] != _UNSERVED:
        return None
    return SERVED_HEAD + raw[1:] + served


class Claim(Enum):
    """What claiming a label found (``FeatureStore.claim_labels``)."""

    CLAIMED = "claimed"  # marked learned under this label's token now: learn it
    MISSING = "missing"  # the event is not scored (yet), nor its label learned
    DUPLICATE = "duplicate"  # a label for this event was learned already
    ORPHANED = "orphaned"  # a label for this event went to the DLQ as an orphan


# the learned-mark of an event whose label went to the DLQ as an orphan
ORPHAN = "orphan"


class FeatureStore(Protocol):
    """What the processors (and the read path) need from a store."""

    # batches computed in process, batches run on the server, commits refused
    batches: dict[str, int]

    def update_and_read(
        self, batch: Sequence[FeatureRequest], commit: bool = True
    ) -> list[FeatureSnapshot]:
        """Add each event to its tiles and read its windows, in order.

        An event id seen within the replay window is not counted again: its
        stored snapshot is returned with ``replayed=True`` (and its ``served``
        prediction, if any).

        ``commit=False`` lets a store hold the batch's writes back until
        ``record_served``, which then writes them with the predictions in one
        step (the scorer's path: one round trip per batch).
        """
        ...

    def record_served(self, served: Sequence[tuple[str, ServedPrediction]]) -> bool:
        """Store the prediction served for each event with its snapshot.

        The first one recorded for an event stays: a replayed event does not
        overwrite it. Events without a stored snapshot are skipped, and so are
        events of other batches than the last ``update_and_read``'s (the store
        finds a snapshot by its event's time, which it knows for that batch).

        False when the batch held back by ``update_and_read(commit=False)`` was
        refused: nothing of it was written, and the caller runs it again with
        ``update_and_read(batch)`` (which then reads what the store holds) and
        serves from that.
        """
        ...

    def claim_labels(
        self,
        event_ids: Sequence[str],
        tokens: Sequence[str],
        known: Sequence[bool],
        stale: Callable[[str], bool],
    ) -> list[Claim]:
        """Mark each event's label learned under its token, where the learner holds
        the scored event (``known``): one call for the batch.

        Per event: ``ORPHANED`` if it is marked an orphan; ``DUPLICATE`` if it is
        marked learned, unless ``stale(its token)`` says that learning was lost (a
        learner died before its checkpoint): then a known event's mark is taken
        over (``CLAIMED``) and an unknown one is ``MISSING``; unmarked, a known
        event is marked (``CLAIMED``) and an unknown one is ``MISSING``.

        ``stale`` is asked once per marked event (not an orphan's mark), so the
        learner counts the duplicates whose mark is a label by timeout's.
        """
        ...

    def mark_orphans(self, event_ids: Sequence[str]) -> None:
        """Mark events whose label went to the DLQ as orphans (unless marked already),
        for the label horizon: a later claim of them is ``ORPHANED``."""
        ...

    def release_learned(self, event_ids: Sequence[str], keep_s: float) -> None:
        """Let go of the learned-marks of labels learned into a committed checkpoint:
        they expire ``keep_s`` from now (0: deleted now), instead of at the label
        horizon. Until then a duplicate label is still a ``DUPLICATE``; after, it
        finds no mark (and the learner no longer holds its event): an orphan."""
        ...

    def read(self, entities: Mapping[str, str], at: float | None = None) -> dict[str, float]:
        """Current feature values of the given entities (name -> value), changing nothing.

        Windows end at event time ``at``, by default at each entity's newest
        event; ``last`` is then the newest value. A session feature is that of
        the session open at ``at`` (0s if none is), by default the newest
        session. Features of entities not given, and z-scores (they need an
        event), are left out.
        """
        ...


def evict_oldest(records: dict[str, Any], order: deque[str], bound: int) -> deque[str]:
    """Drop the oldest of ``records`` beyond ``bound`` (``order``: their keys as they
    were added, some gone since); returns ``order``, rebuilt once it is mostly keys
    that are gone (records forgotten out of order)."""
    while len(records) > bound:
        records.pop(order.popleft(), None)
    if len(order) > 2 * max(len(records), 1024):
        return deque(k for k in order if k in records)
    return order


def encode_snapshot(context: bytes, vectors: Sequence[list[Any] | None], late: bool) -> bytes:
    """A snapshot as stored, without a served prediction (see the module docstring)."""
    return _encode([context.decode(), vectors, int(late)])
