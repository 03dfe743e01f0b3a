"""Event and label schemas as declared in the spec."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from riverflow.streams.contracts import LabelType
from riverflow.streams.pii import PiiPolicy


class FieldType(StrEnum):
    """Types an event field can declare. ``timestamp`` is epoch seconds (a number)."""

    STR = "str"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    TIMESTAMP = "timestamp"


NUMERIC = {FieldType.INT, FieldType.FLOAT, FieldType.TIMESTAMP}


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

    @model_validator(mode="after")
    def _classes(self) -> LabelSpec:
        if self.type is LabelType.CATEGORY:
            if not self.classes or len(self.classes) < 2:
                raise ValueError("classes: a category label declares at least two classes")
            if len({str(c) for c in self.classes}) != len(self.classes):
                raise ValueError("classes: each class is declared once (compared as text)")
        elif self.classes is not None:
            raise ValueError(f"classes: only a category label has classes (type is {self.type})")
        return self
