"""What riverflow writes to its topics: one class per record.

A producer builds its record with the class and writes ``record.encode()``; a
consumer reads it back with ``Class.decode(raw)`` (validated by pydantic, which
raises ``ValidationError`` for a record that is not one). They are dataclasses,
neither frozen nor pydantic models, for the hot path: the scorer builds one
``Prediction`` per event, and a frozen dataclass's ``__init__`` costs about 1 us
more per record, a validated model several. A record builds the dict it writes
(slotted: its fields read faster); a part of one (``CandidatePrediction``,
``ServedPrediction``) is a plain dataclass, which orjson writes from its
``__dict__`` four times faster than a slotted one (its optional fields that
are None are not in it, so they are not written).

A field that a record may leave out is written only when set: ``None`` for the
fields that are never null, ``UNSET`` for those whose absence means something
else than their null or empty value (``Prediction.explanation``,
``ModelEvent.previous`` and ``ModelEvent.reason``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from functools import cache
from typing import Any, Literal, NamedTuple, Protocol, Self

import orjson
from pydantic import TypeAdapter
from pydantic_core import core_schema


class LabelType(StrEnum):
    """What a label is: a flag (binary classification), a number (regression) or one
    of declared classes (multiclass)."""

    BOOL = "bool"
    INT = "int"
    FLOAT = "float"
    CATEGORY = "category"

    @property
    def regression(self) -> bool:
        return self in (LabelType.INT, LabelType.FLOAT)


Label = bool | int | float | str
"""A label's value once validated: its type is the spec's ``label.type``."""


def pair_id(request_id: str, item_id: str) -> str:
    """The id of a slate's (request, item) pair: its snapshot, its index record, its
    label (``events.slate``)."""
    return f"{request_id}/{item_id}"


class ShownItem(NamedTuple):
    """One item of a slate prediction the user was shown: its pair id, the position
    it was served at, and its entry in the prediction's ``slate``."""

    pair: str
    position: int
    entry: dict[str, Any]


def shown_items(prediction: Mapping[str, Any]) -> list[ShownItem]:
    """The items of a decoded slate prediction (a ``Prediction`` record with
    ``slate``) the user was shown, in served order: the first ``shown`` entries of
    its ``slate``. The one reading of what a slate showed: the learner indexes these
    pairs for the label join and the labels by timeout default exactly these.

    ``TypeError`` for a slate the scorer cannot have written (its ``shown`` count,
    entries' ``shown`` flags and positions disagreeing, an item twice): such a
    record shows nothing, to the index and the timeouts alike.
    """
    request, slate = prediction.get("event_id"), prediction.get("slate")
    shown = prediction.get("shown")
    if not (isinstance(request, str) and isinstance(slate, list)
            and type(shown) is int and 0 <= shown <= len(slate)):  # fmt: skip
        raise TypeError("not a slate prediction: event_id, slate or shown is not of its type")
    out: list[ShownItem] = []
    pairs: set[str] = set()
    for position, entry in enumerate(slate):
        if not (isinstance(entry, dict) and type(entry.get("item")) is str
                and type(entry.get("position")) is int and entry["position"] == position
                and entry.get("shown") is (position < shown)):  # fmt: skip
            raise TypeError(f"slate entry {position} is not the scorer's item at position "
                            f"{position} (shown: the first {shown})")  # fmt: skip
        if position < shown:
            pair = pair_id(request, entry["item"])
            if pair in pairs:
                raise TypeError(f"slate shows item {entry['item']!r} twice")
            pairs.add(pair)
            out.append(ShownItem(pair, position, entry))
    return out


class Message(NamedTuple):
    """A consumed message, wherever it came from (Kafka or the embedded log).

    A named tuple: made per message read, it costs a third of a frozen dataclass
    (0.25 against 0.8 us), and is as immutable."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None  # when it was produced (Kafka CreateTime), if known


class Output(NamedTuple):
    """A message a processor wants written (a named tuple, as ``Message``)."""

    topic: str
    key: bytes | None
    value: bytes


class Processor(Protocol):
    """What a host (Faust, the confluent loop, the embedded runtime) runs: a named
    stage turning a batch of messages into the messages to write."""

    stage: str

    def process(self, batch: Sequence[Message]) -> list[Output]: ...

    def status(self) -> dict[str, float]:
        """Numbers worth a gauge: the model version served, metrics, counts."""
        ...


class Unset(Enum):
    """A field left out of a record (falsy). Never read from a message: a field that
    is left out is absent from the JSON, not spelled out."""

    UNSET = "unset"

    def __bool__(self) -> Literal[False]:
        return False

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(_no_value)


def _no_value(value: Any) -> Any:
    raise ValueError("is not a value of this field")


UNSET = Unset.UNSET


@cache
def _reader(record: type) -> TypeAdapter[Any]:
    return TypeAdapter(record)


class Record(ABC):
    """A record on a topic: written with ``encode``, read back with ``decode``."""

    __slots__ = ()

    @abstractmethod
    def encode(self) -> bytes:
        """The record's JSON, as it goes on its topic."""

    @classmethod
    def decode(cls, raw: bytes | str) -> Self:
        """The record in ``raw`` (JSON); ``pydantic.ValidationError`` if it is not one."""
        record: Self = _reader(cls).validate_json(raw)
        return record


@dataclass(slots=True)
class Prediction(Record):
    """``{ns}.predictions``: one per valid event.

    What it predicts fits the spec's label: for a bool label ``probability`` (of
    true), as ever; for a number, ``value`` (and ``probability`` null); for a
    category, ``value`` (the predicted class), ``probabilities`` (by class) and
    ``probability`` null. A bool label's prediction has neither ``value`` nor
    ``probabilities``: it reads exactly as before they existed.
    """

    event_id: str
    entity: str
    probability: float | None
    model: str
    version: int
    features: dict[str, float]
    event_time: float
    scored_at: float
    replayed: bool = False  # the event id was seen before: features are the stored snapshot
    # when the spec asks (models.explain) and the current model served it: linear
    # terms or the tree's decision path, None for a model that cannot say
    explanation: list[dict[str, Any]] | Unset | None = UNSET
    # the event's fields the model read beside ``features`` (and the segment field):
    # with them a prediction is the whole record the learner joins a label to
    inputs: dict[str, Any] = field(default_factory=dict)
    # the id of the key that tokenised its personal fields (``streams.pii``), if any:
    # tokens of two key ids are not comparable (a rotation starts entities afresh)
    pii_key: str | None = None
    value: float | int | str | None = None
    probabilities: dict[str, float] | None = None
    # the fields the spec's cleaning changed for it, with the rule: impute, clip or
    # bucket (``models.cleaning``); absent when none was
    cleaned: dict[str, str] = field(default_factory=dict)
    # a slate pipeline's (``events.slate``): the candidates ranked, each with its
    # score, position, whether the user sees it (``shown`` first ones), the
    # probability the policy put it there, its inputs and features; None otherwise
    slate: list[dict[str, Any]] | None = None
    shown: int | None = None

    @property
    def score(self) -> float:
        """One number per prediction, for label-free drift: the probability of true,
        the predicted value, or the predicted class's probability; a slate's, its top
        item's score."""
        if self.probability is not None:
            return self.probability
        if self.slate:  # (a forged one may lack it: then 0.0)
            top = self.slate[0]
            score = top.get("score") if isinstance(top, dict) else None
            return float(score) if isinstance(score, int | float) else 0.0
        if self.probabilities:
            return max(self.probabilities.values())
        return float(self.value) if isinstance(self.value, int | float) else 0.0

    def encode(self) -> bytes:
        record: dict[str, Any] = {
            "event_id": self.event_id,
            "entity": self.entity,
            "probability": self.probability,
        }
        if self.value is not None:
            record["value"] = self.value
        if self.probabilities is not None:
            record["probabilities"] = self.probabilities
        record |= {
            "model": self.model,
            "version": self.version,
            "features": self.features,
            "event_time": self.event_time,
            "scored_at": self.scored_at,
            "replayed": self.replayed,
            "inputs": self.inputs,
        }
        if self.explanation is not UNSET:
            record["explanation"] = self.explanation
        if self.pii_key is not None:
            record["pii_key"] = self.pii_key
        if self.cleaned:
            record["cleaned"] = self.cleaned
        if self.slate is not None:
            record["slate"] = self.slate
            record["shown"] = self.shown
        return orjson.dumps(record)


@dataclass(slots=True)
class DeadLetter(Record):
    """``{ns}.dlq``: a message a stage refused, with why and where it came from.

    The original key and value are kept (base64) up to a limit (setting
    ``dlq_keep_bytes``); beyond it ``*_b64`` is None and ``*_truncated`` true, and
    the length and sha256 of the whole still identify it, so the record always
    fits its topic. ``*_bytes`` and ``*_sha256`` are None for an absent key/value.
    """

    stage: str
    error_kind: str
    error: str
    topic: str
    partition: int
    offset: int
    key_b64: str | None
    payload_b64: str | None
    key_bytes: int | None = None
    key_sha256: str | None = None
    key_truncated: bool = False
    payload_bytes: int | None = None
    payload_sha256: str | None = None
    payload_truncated: bool = False

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "stage": self.stage,
                "error_kind": self.error_kind,
                "error": self.error,
                "topic": self.topic,
                "partition": self.partition,
                "offset": self.offset,
                "key_b64": self.key_b64,
                "payload_b64": self.payload_b64,
                "key_bytes": self.key_bytes,
                "key_sha256": self.key_sha256,
                "key_truncated": self.key_truncated,
                "payload_bytes": self.payload_bytes,
                "payload_sha256": self.payload_sha256,
                "payload_truncated": self.payload_truncated,
            }
        )


@dataclass
class CandidatePrediction:
    """One candidate's prequential prediction: made before it learned the label.

    As in ``Prediction``: ``probability`` (of true) for a bool label, ``value`` (and
    its absolute ``error``) for a number, ``value`` (the class) and ``probabilities``
    for a category; what is not set is not written (one read back from a topic
    holds every field, its unset ones None)."""

    version: int  # the candidate's last published version its live model descends from
    probability: float | None = None
    value: float | int | str | None = None
    probabilities: dict[str, float] | None = None
    error: float | None = None  # a number label's: |label - value|

    def __init__(
        self,
        version: int,
        probability: float | None = None,
        value: float | int | str | None = None,
        probabilities: dict[str, float] | None = None,
        error: float | None = None,
    ) -> None:
        # an optional field that is None stays out of __dict__ (the class attribute
        # answers for it): orjson writes the __dict__, so it is left out of the record
        self.version = version
        _set_given(self, probability=probability, value=value, probabilities=probabilities,
                   error=error)  # fmt: skip

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(_unset_none, handler(source))


@dataclass
class ServedPrediction:
    """The prediction the scorer served for an event: the first one emitted for it,
    what the user got (the feature store keeps it with the event's snapshot). Its
    fields as ``CandidatePrediction``'s."""

    model: str
    version: int
    probability: float | None = None
    value: float | int | str | None = None
    probabilities: dict[str, float] | None = None

    def __init__(
        self,
        model: str,
        version: int,
        probability: float | None = None,
        value: float | int | str | None = None,
        probabilities: dict[str, float] | None = None,
    ) -> None:
        self.model = model  # (optional fields as in CandidatePrediction.__init__)
        self.version = version
        # (not _set_given: a slate's scorer makes one per pair, 20 a request)
        if probability is not None:
            self.probability = probability
        if value is not None:
            self.value = value
        if probabilities is not None:
            self.probabilities = probabilities

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(_unset_none, handler(source))


def _set_given(part: Any, **optional: Any) -> None:
    """Set the optional fields given; one left None stays out of ``__dict__``."""
    for name, value in optional.items():
        if value is not None:
            setattr(part, name, value)


def _unset_none(part: Any) -> Any:
    """A prediction part read from a topic, its None fields unset as its ``__init__``
    leaves them (pydantic fills in every field): it encodes as it was written."""
    for name in [k for k, v in part.__dict__.items() if v is None]:
        del part.__dict__[name]
    return part


@dataclass
class LabelPosition:
    """Where a label record was read: its topic, partition and offset."""

    topic: str
    partition: int
    offset: int


@dataclass(slots=True)
class Evaluation(Record):
    """``{ns}.evaluations``: a label, every candidate's prequential prediction for it,
    and the prediction that was served."""

    event_id: str
    label: bool | int | float | str  # as the spec's label.type declares it
    labels_seen: int
    predictions: dict[str, CandidatePrediction]
    # None only if the label was claimed after the scorer stored the event's snapshot
    # and before it recorded the prediction (between its two store calls for the
    # batch, or, if the scorer died there, until its replay), or if the event was
    # scored by a version of riverflow that did not record served predictions
    served: ServedPrediction | None = None
    segment: str | int | float | bool | None = None  # the spec's monitors.segment field, if set
    # where the label was read and when it was written (its Kafka timestamp, in
    # seconds; None from a learner older than these fields): what a drift alarm
    # tripped by this label names
    label_at: LabelPosition | None = None
    label_time: float | None = None
    # what the models were given for the event, so the monitor can score another
    # version on recent labels (rollback targets are shadow-scored)
    inputs: dict[str, Any] | None = None
    # the learner's model search decisions taken on this label (``models.search``:
    # its ``search`` / ``prune`` model-events), so the monitor can show them
    search: list[dict[str, Any]] | None = None
    # the label came from the spec's timeout (``label.default`` after ``label.after``),
    # not from a label message: ``label_at`` is then where its prediction was read,
    # ``label_time`` when the timeout fell due. Absent when false
    defaulted: bool = False
    # a slate's shown item (``event_id`` is its pair id): the request, the position
    # it was served at, how many were shown, and the probability the policy put it there
    request: str | None = None
    position: int | None = None
    shown: int | None = None
    propensity: float | None = None

    def encode(self) -> bytes:
        record: dict[str, Any] = {
            "event_id": self.event_id,
            "label": self.label,
            "labels_seen": self.labels_seen,
            "predictions": self.predictions,
            "served": self.served,
        }
        for name in ("segment", "label_at", "label_time", "inputs", "search", "request",
                     "position", "shown", "propensity"):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                record[name] = value
        if self.defaulted:
            record["defaulted"] = True
        return orjson.dumps(record)


@dataclass(slots=True)
class ModelEvent(Record):
    """``{ns}.model-events``: the audit log of the registry.

    ``published`` (a new version; ``parent`` and ``labels_seen`` set) or a move
    of the champion pointer: ``advance`` (the learner), ``promote``, ``rollback``
    (``previous`` set to where it pointed before, None if nowhere). The learner
    also writes ``started`` / ``dropped`` (a fresh challenger it began / stopped
    training) and ``rebased`` (a candidate continued from the version it was
    rolled back to); the CLI writes ``imported``. The monitor (``by: monitor``)
    writes its decisions with their ``evidence``: ``drift``, ``feature_drift``,
    ``challenger``, ``retire``, ``promote``, ``rollback``. A ``drift`` event also
    names the label that tripped it (``event_id``, ``label_at``, ``label_time``)
    and whether the model was the ``champion`` then. A model search
    (``models.search``, ``by: learner``) writes ``search`` (a round began) and
    ``prune`` (a rung's decision, with its evidence). A version or pointer move whose
    maker was killed before logging it is written by the monitor
    (``riverflow.stages.audit``) with ``evidence: {"recovered": true, "late_s": ...}``.
    """

    kind: str
    model: str
    version: int
    parent: int | None = None
    labels_seen: int | None = None
    previous: dict[str, str | int] | Unset | None = UNSET
    at: float | None = None
    reason: str | Unset = UNSET
    evidence: dict[str, Any] | None = None
    by: str | None = None
    event_id: str | None = None
    label_at: LabelPosition | None = None
    label_time: float | None = None
    champion: bool | None = None

    def encode(self) -> bytes:
        record: dict[str, Any] = {"kind": self.kind, "model": self.model, "version": self.version}
        for name, left_out in _MODEL_EVENT_OPTIONAL.items():
            value = getattr(self, name)
            if value is not left_out:
                record[name] = value
        return orjson.dumps(record)


# ModelEvent's optional fields, in the order they are written, and the value that
# leaves each out
_MODEL_EVENT_OPTIONAL: dict[str, Unset | None] = {
    "parent": None,
    "labels_seen": None,
    "previous": UNSET,
    "at": None,
    "reason": UNSET,
    "evidence": None,
    "by": None,
    "event_id": None,
    "label_at": None,
    "label_time": None,
    "champion": None,
}
