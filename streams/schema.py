"""Event and label schemas as declared in the spec."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from riverflow.streams.contracts import Label, LabelType, pair_id
from riverflow.streams.pii import PiiPolicy


class FieldType(StrEnum):
    """Types an event field can declare. ``timestamp`` is epoch seconds (a number)."""

    STR = "str"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    TIMESTAMP = "timestamp"


NUMERIC = {FieldType.INT, FieldType.FLOAT, FieldType.TIMESTAMP}


class SlateSpec(BaseModel):
    """A request event's candidates (recommendation): a list of item objects in one
    field. The scorer scores every (request, item) pair and ranks them; the ``shown``
    top ones are what the user sees, and only they are labelled."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: str = Field(description="the request field holding the candidates (a JSON list)")
    item_id: str = Field(description="the field naming an item inside a candidate")
    fields: dict[str, FieldType] = Field(min_length=1, description="a candidate's fields")
    max_items: int = Field(100, ge=1, le=1000, description="most candidates in one request")
    shown: int = Field(10, ge=1, description="the top k of the ranking the user sees")
    epsilon: float = Field(
        0.0, ge=0.0, le=1.0,
        description="exploration: the chance a request is served its candidates in a "
        "random order instead of by score (epsilon-greedy); each item's propensity, the "
        "chance of its position under this policy, is logged with the prediction",
    )  # fmt: skip

    @model_validator(mode="after")
    def _check(self) -> SlateSpec:
        if self.item_id not in self.fields:
            raise ValueError(f"item_id: {self.item_id!r} is not one of the slate's fields")
        if self.fields[self.item_id] is not FieldType.STR:
            raise ValueError(f"item_id: {self.item_id!r} must have type str")
        if self.shown > self.max_items:
            raise ValueError(f"shown: {self.shown} is more than max_items ({self.max_items})")
        if FieldType.TIMESTAMP in self.fields.values():
            raise ValueError("fields: a candidate has no time of its own (the request's is used)")
        return self


class EventSchema(BaseModel):
    """Fields of an event and the roles some of them play."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fields: dict[str, FieldType] = Field(min_length=1)
    key: str = Field(description="entity key field: partitions the stream, keys the features")
    event_id: str = Field(description="unique id field: joins labels, dedups replays")
    time: str = Field(description="event-time field (timestamp): places events in windows")
    pii: dict[str, PiiPolicy] = Field(
        default_factory=dict,
        description="personal fields and what intake does with them: hash (a keyed "
        "HMAC token, stable: features and joins still work) or drop (streams.pii)",
    )
    slate: SlateSpec | None = Field(
        None, description="a request's candidates: the events are ranking requests"
    )

    @property
    def pair_fields(self) -> dict[str, FieldType]:
        """The fields of a (request, item) pair: the request's and a candidate's (the
        event's alone without a slate)."""
        if self.slate is None:
            return self.fields
        return {**self.fields, **self.slate.fields}

    @model_validator(mode="after")
    def _slate_fields(self) -> EventSchema:
        if self.slate is None:
            return self
        if self.slate.field in self.fields:
            raise ValueError(f"slate.field: {self.slate.field!r} is also a request field")
        for name in self.slate.fields:
            if name in self.fields:
                raise ValueError(f"slate.fields.{name}: also a request field")
        return self

    @model_validator(mode="after")
    def _pii_fields(self) -> EventSchema:
        for name, policy in self.pii.items():
            if name not in self.fields:
                raise ValueError(f"events.pii.{name}: not an event field")
            if policy is PiiPolicy.HASH and self.fields[name] is not FieldType.STR:
                raise ValueError(
                    f"events.pii.{name}: hash needs a str field ({self.fields[name]} here): "
                    "its token is a string"
                )
            if name in (self.event_id, self.time):
                raise ValueError(f"events.pii.{name}: the event id and time cannot be marked")
            if policy is PiiPolicy.DROP and name == self.key:
                raise ValueError(f"events.pii.{name}: the key cannot be dropped (hash it)")
        return self


class LabelLearning(StrEnum):
    """When a pipeline with a label timeout learns a label message (``label.learn``)."""

    AT_ONCE = "at_once"  # when it arrives (its event's default comes later, alone)
    AT_TIMEOUT = "at_timeout"  # with its prediction's other ids, when the timeout falls due


class LabelSpec(BaseModel):
    """Where ground truth comes from, what it is, and how it joins its event."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    field: str = Field(description="the label field in label messages")
    event_id: str = Field("event_id", description="field carrying the event id it labels")
    type: LabelType = Field(
        LabelType.BOOL,
        description='bool (true/false, 0/1 or "0"/"1"), int, float, or category (one of classes)',
    )
    classes: list[str | int] | None = Field(
        None, description="the values a category label takes (category only)"
    )
    item: str | None = Field(
        None, description="slate pipelines: the field naming the item a label is for"
    )
    default: bool | int | float | str | None = Field(
        None,
        description="the label of a scored event with no label message within `after` "
        "(with `after`; of the label's type)",
    )
    after: str | None = Field(
        None,
        description="how long after its prediction a scored event without a label "
        "message is labelled `default` (500ms, 30s, 30m, 1h, 7d; with `default`)",
    )
    learn: LabelLearning = Field(
        LabelLearning.AT_ONCE,
        description="with `after`: when a label message is learned. at_once: when it "
        "arrives; at_timeout: held until its prediction's timeout falls due, then every "
        "id the prediction labels (a slate's shown items, in position order) is learned "
        "together, each with its label message's value if one came, else `default`",
    )

    def join_id(self, record: Mapping[str, Any]) -> str:
        """The id a validated label message joins: its event's, or (slates) its pair's."""
        if self.item is None:
            return str(record[self.event_id])
        return pair_id(record[self.event_id], record[self.item])

    @model_validator(mode="after")
    def _classes(self) -> LabelSpec:
        if self.type is LabelType.CATEGORY:
            if not self.classes or len(self.classes) < 2:
                raise ValueError("classes: a category label declares at least two classes")
            if len({str(c) for c in self.classes}) != len(self.classes):
                raise ValueError("classes: each class is declared once (compared as text)")
        elif self.classes is not None:
            raise ValueError(f"classes: only a category label has classes (type is {self.type})")
        if (self.default is None) != (self.after is None):
            given, missing = ("default", "after") if self.after is None else ("after", "default")
            raise ValueError(f"{given}: a label by timeout needs both default and after "
                             f"({missing} is missing)")  # fmt: skip
        if self.learn is LabelLearning.AT_TIMEOUT and self.after is None:
            raise ValueError("learn: at_timeout holds a label message until its prediction's "
                             "timeout: it needs default and after")  # fmt: skip
        if self.after is not None:
            after_s(self.after)
            self.default_label  # noqa: B018 (refuses a default that is not of the type)
        return self

    @property
    def after_s(self) -> float | None:
        """``after`` in seconds; None without a label by timeout."""
        return None if self.after is None else after_s(self.after)

    @property
    def default_label(self) -> Label | None:
        """``default`` as a label of ``type`` (a category's as its declared class);
        ``ValueError`` naming the field if it is not one."""
        value, kind = self.default, self.type
        if value is None:
            return None
        if kind is LabelType.BOOL:
            if type(value) is bool:
                return value
        elif kind is LabelType.INT:
            if type(value) is int or (type(value) is float and value.is_integer()):
                return int(value)
        elif kind is LabelType.FLOAT:
            if isinstance(value, int | float) and type(value) is not bool and math.isfinite(value):
                return float(value)
        else:
            for c in self.classes or []:
                if value == c or (type(value) is not bool and str(value) == str(c)):
                    return c
            raise ValueError(f"default: {value!r} is not one of the declared classes")
        raise ValueError(f"default: {value!r} does not fit label.type {kind}")


_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def after_s(text: str) -> float:
    """A label timeout in seconds (``'30m'`` -> 1800.0), as feature windows are written
    (``features.definitions.parse_duration``: transport does not import features)."""
    match = _DURATION.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"after: not a duration: {text!r} (use e.g. 500ms, 30s, 30m, 1h, 7d)")
    return int(match.group(1)) * _UNIT_S[match.group(2)]
