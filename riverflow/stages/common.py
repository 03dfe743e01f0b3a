"""What every stage shares: the dead-letter record, the model inputs of a snapshot,
the counters a stage keeps."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from riverflow.streams.contracts import DeadLetter, Message, Output, Processor
from riverflow.streams.guard import Guard, Health
from riverflow.streams.topics import Topics

DLQ_KEEP_BYTES = 256 * 1024  # setting dlq_keep_bytes: the original bytes a DLQ record keeps
ERROR_CHARS = 1000  # an error message is cut to this length


def dead_letter(
    topics: Topics,
    stage: str,
    msg: Message,
    kind: str,
    error: str,
    keep_bytes: int = DLQ_KEEP_BYTES,
) -> Output:
    """The DLQ record of a refused message: its bytes (up to ``keep_bytes``; beyond,
    their length and sha256), its origin, the reason. It always fits its topic."""
    key_b64, key_n, key_sha, key_cut = _kept(msg.key, keep_bytes)
    value_b64, value_n, value_sha, value_cut = _kept(msg.value, keep_bytes)
    if len(error) > ERROR_CHARS:
        error = error[:ERROR_CHARS] + f"... ({len(error)} characters)"
    # lone surrogates in an exception's text would make orjson refuse the record
    error = error.encode("utf-8", "backslashreplace").decode()
    record = DeadLetter(
        stage, kind, error, msg.topic, msg.partition, msg.offset, key_b64, value_b64,
        key_n, key_sha, key_cut, value_n, value_sha, value_cut,
    )  # fmt: skip
    key = msg.key if not key_cut else (key_sha or "").encode()
    return Output(topics.dlq, key, record.encode())


def _kept(raw: bytes | None, limit: int) -> tuple[str | None, int | None, str | None, bool]:
    """base64 (None beyond ``limit``), length, sha256 hex, and whether it was cut."""
    if raw is None:
        return None, None, None, False
    sha = hashlib.sha256(raw).hexdigest()
    if len(raw) > limit:
        return None, len(raw), sha, True
    return base64.b64encode(raw).decode(), len(raw), sha, False


def guarded(
    processor: Processor,
    topics: Topics,
    outage_limit_s: float = 120.0,
    keep_bytes: int = DLQ_KEEP_BYTES,
    health: Health | None = None,
) -> Guard:
    """``processor`` behind the last resort every host runs a stage with
    (``streams.guard``): its internal errors go to the DLQ, outages are waited out."""

    redact = getattr(processor, "redact", None)  # a stage that sees personal data

    def dlq(msg: Message, kind: str, error: str) -> Output:
        if redact is not None:
            msg, note = redact(msg)
            error += note
        return dead_letter(topics, processor.stage, msg, kind, error, keep_bytes)

    # a stage with personal data marked (``pii``) keeps exception messages out of
    # the DLQ and the log: they may quote a value
    personal = bool(getattr(processor, "pii", None))
    return Guard(processor, dlq, outage_limit_s, health, withhold_errors=personal)


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
