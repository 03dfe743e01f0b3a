"""What every stage shares: the dead-letter record, the model inputs of a snapshot,
the counters a stage keeps."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from riverflow.streams.contracts import DeadLetter, Message, Output
from riverflow.streams.topics import Topics


def dead_letter(topics: Topics, stage: str, msg: Message, kind: str, error: str) -> Output:
    """The DLQ record of a refused message: its bytes, its origin, the reason."""
    b64 = base64.b64encode
    record = DeadLetter(
        stage=stage,
        error_kind=kind,
        error=error,
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        key_b64=None if msg.key is None else b64(msg.key).decode(),
        payload_b64=None if msg.value is None else b64(msg.value).decode(),
    )
    return Output(topics.dlq, msg.key, record.encode())


def monitor_only_field(segment: str | None, inputs: Sequence[str]) -> str | None:
    """The segment field a snapshot keeps for the monitor alone (None when it is none,
    or a model input anyway): the scorer stores it, the learner leaves it out of ``x``."""
    return segment if segment and segment not in inputs else None


def model_inputs(stored: dict[str, Any], extra: str | None) -> dict[str, Any]:
    """The event fields a snapshot keeps for the models: all but ``extra`` (a field kept
    only for the monitor)."""
    if extra is None:
        return stored
    return {k: v for k, v in stored.items() if k != extra}


@dataclass
class StageCounters:
    """What a stage has done so far (the demo summary and, later, metrics read these)."""

    consumed: int = 0
    produced: int = 0
    dead_letters: int = 0
    late_events: int = 0  # scored, but too late to count in some feature window
