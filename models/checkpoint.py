"""The learner's checkpoint as it is stored: a signed, versioned JSON document.

It is plain data, never a pickle: renaming a class of ours cannot break
yesterday's checkpoint, and reading one runs no code. The models are not in it:
it names the registry versions that hold them (signed there).

Document (``riverflow-learner-checkpoint/1``)::

    {"format": "riverflow-learner-checkpoint/1",
     "saved_at": unix seconds,
     "labels_seen": int,
     "positions": {label partition: next offset to read},
     "candidates": {name: {"version": int, "metrics": plain metric state}},
     "pending": [{"topic", "partition", "offset", "key_b64", "value_b64",
                  "timestamp_ms", "label"}],
     "searches": {searched candidate: its round (``models.search``), if any},
     "timeouts": {predictions partition: next offset}, if the spec labels by timeout}

``pending`` also holds the label messages a ``label.learn: at_timeout`` learner
holds until their prediction's timeout (claimed, not learned yet): restored, they
are claimed again and held again.

``timeouts`` is where the learner's labels by timeout (``label.default`` after
``label.after``) are on the predictions topic: every prediction before it was
defaulted into these models (or found labelled). Absent in a checkpoint of a
learner without them, which then starts them afresh.

A reader refuses (``CheckpointError``, ``SignatureError``) a document it cannot
vouch for: a bad signature, another format, a missing field.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import orjson

from riverflow.models.errors import CheckpointError
from riverflow.models.signing import KEYED_MAGIC, MAGIC, Keys, sign_bytes, verify_bytes
from riverflow.streams.contracts import Label, Message

FORMAT = "riverflow-learner-checkpoint/1"
_WHAT = "learner checkpoint"


@dataclass(frozen=True)
class LearnerCheckpoint:
    """What the learner restarts from, saved with every snapshot it commits."""

    versions: dict[str, int]  # candidate -> its last published version
    metrics: dict[str, dict[str, Any]]  # candidate -> its prequential metrics' plain state
    labels_seen: int
    positions: dict[int, int]  # label partition -> next offset to read
    pending: list[tuple[Message, Label]]  # labels waiting (event or timeout), with their value
    saved_at: float = 0.0  # unix seconds: a rollback after this is applied on restore
    # searched candidate -> where its round is (``SuccessiveHalving.state``)
    searches: dict[str, dict[str, Any]] = field(default_factory=dict)
    # predictions partition -> next offset its labels by timeout examine
    timeouts: dict[int, int] = field(default_factory=dict)

    def encode(self, key: Keys) -> bytes:
        """The signed document."""
        document = {
            "format": FORMAT,
            "saved_at": self.saved_at,
            "labels_seen": self.labels_seen,
            "positions": {str(p): o for p, o in sorted(self.positions.items())},
            "candidates": {
                name: {"version": version, "metrics": self.metrics[name]}
                for name, version in self.versions.items()
            },
            "pending": [_pending(msg, label) for msg, label in self.pending],
        }
        if self.searches:
            document["searches"] = self.searches
        if self.timeouts:
            document["timeouts"] = {str(p): o for p, o in sorted(self.timeouts.items())}
        return sign_bytes(orjson.dumps(document), key)

    @classmethod
    def decode(cls, raw: bytes, key: Keys) -> LearnerCheckpoint:
        """The checkpoint in ``raw``, if its signature verifies and its format is ours."""
        if raw.startswith((MAGIC, KEYED_MAGIC)):
            raise CheckpointError(
                f"{_WHAT} is a signed pickle written by an earlier riverflow, not a "
                f"{FORMAT} document: refused. Delete the key rf:<pipeline>:learner:checkpoint "
                "to start the learner from the spec's models and the labels topic's start "
                "(published versions and the champion pointer stay)"
            )
        try:
            document = orjson.loads(verify_bytes(raw, key, _WHAT))
        except orjson.JSONDecodeError as exc:
            raise CheckpointError(f"{_WHAT} is signed but not JSON: {exc}") from exc
        found = document.get("format") if isinstance(document, dict) else None
        if found != FORMAT:
            raise CheckpointError(f"{_WHAT} format {found!r} is unknown (expected {FORMAT!r})")
        try:
            candidates = document["candidates"]
            return cls(
                versions={name: int(c["version"]) for name, c in candidates.items()},
                metrics={name: dict(c["metrics"]) for name, c in candidates.items()},
                labels_seen=int(document["labels_seen"]),
                positions={int(p): int(o) for p, o in document["positions"].items()},
                pending=[_message(item) for item in document["pending"]],
                saved_at=float(document["saved_at"]),
                searches=dict(document.get("searches", {})),
                timeouts={int(p): int(o) for p, o in document.get("timeouts", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{_WHAT} ({FORMAT}) is malformed: {exc!r}") from exc


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text, validate=True)


def _pending(msg: Message, label: Label) -> dict[str, Any]:
    return {
        "topic": msg.topic,
        "partition": msg.partition,
        "offset": msg.offset,
        "key_b64": _b64(msg.key),
        "value_b64": _b64(msg.value),
        "timestamp_ms": msg.timestamp_ms,
        "label": label,
    }


def _message(item: dict[str, Any]) -> tuple[Message, Label]:
    ts = item["timestamp_ms"]
    msg = Message(
        str(item["topic"]), int(item["partition"]), int(item["offset"]),
        _unb64(item["key_b64"]), _unb64(item["value_b64"]), None if ts is None else int(ts),
    )  # fmt: skip
    label = item["label"]
    if type(label) not in (bool, int, float, str):
        raise TypeError(f"a waiting label's value {label!r} is not a label")
    return msg, label
