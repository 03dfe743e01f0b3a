"""A seeded generator of hostile messages for a pipeline's events topic, mixed with
valid events: what the fuzz tests feed a stage to show that no message can crash or
stall it.

Each message carries its class (what was done to it) and the DLQ kind the scorer
answers it with under the default settings (None: a valid event, which must get
exactly one prediction). The classes: deep nesting (top level and in an extra field),
huge and negative timestamps, numbers beyond any sane or any float range, NaN and
Infinity, lone UTF-16 surrogates in each string field and in a key, raw bytes that
are not UTF-8, wrong types and missing fields per field, JSON that is not an
object, invalid JSON and binary garbage, an empty value and no value at all,
oversized values (up to ~3.5 MiB) and keys, duplicate keys, and valid events with
hostile extra fields (which the scorer drops or refuses, as labelled).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from riverflow.streams.schema import EventSchema, FieldType

DEEP = 10_000  # levels: far beyond orjson's 1024 and the interpreter's recursion limit
BIG = 3_500_000  # bytes of the few oversized values (topics take 4 MiB)


@dataclass(frozen=True)
class Hostile:
    """One message for the events topic: its class, the DLQ kind it should get
    (None: valid), and for a valid event its id."""

    cls: str
    kind: str | None
    key: bytes | None
    value: bytes | None
    event_id: str | None = None


def _raw(event: dict[str, Any], field: str, literal: str | bytes) -> bytes:
    """``event`` as JSON with ``field``'s value written as ``literal`` (what orjson
    will not write: NaN, 1e400, lone surrogates, giant integers)."""
    marker = "\x00MARK\x00"
    body = orjson.dumps({**event, field: marker})
    raw = literal if isinstance(literal, bytes) else literal.encode()
    return body.replace(orjson.dumps(marker), raw)


Build = Callable[[dict[str, Any]], bytes | None]


def _field_as(field: str, literal: str | bytes) -> Build:
    return lambda e: _raw(e, field, literal)


def _suffix_of(field: str, escaped: str) -> Build:
    return lambda e: _raw(e, field, _suffixed(e[field], escaped))


def _constant(raw: bytes) -> Build:
    return lambda e: raw


def _without(field: str) -> Build:
    return lambda e: orjson.dumps({k: v for k, v in e.items() if k != field})


def _suffixed(value: str, escaped: str) -> str:
    """The JSON string of ``value`` followed by ``escaped`` (JSON escapes, as written)."""
    return orjson.dumps(value).decode()[:-1] + escaped + '"'


class HostileEvents:
    """Valid events of ``schema`` and hostile variants of them, from ``seed``."""

    def __init__(
        self,
        schema: EventSchema,
        seed: int = 0,
        start_ts: float = 1.7e9,
        optional: Collection[str] = (),
    ) -> None:
        """``optional``: fields the spec lets be missing or null (``clean:``); an
        event without one, or with null, is valid."""
        self.schema = schema
        self.optional = frozenset(optional)
        self.rng = random.Random(seed)
        self.seed = seed
        self.ts = start_ts
        self.n = 0
        s = schema
        self.strings = [f for f, t in s.fields.items() if t is FieldType.STR]
        self.floats = [f for f, t in s.fields.items() if t is FieldType.FLOAT]
        self.numbers = [f for f, t in s.fields.items() if t in (FieldType.FLOAT, FieldType.INT)]
        self.classes: dict[str, Callable[[dict[str, Any]], tuple[str | None, bytes | None]]] = {}
        self._declare()

    def valid_event(self) -> dict[str, Any]:
        rng, s = self.rng, self.schema
        self.n += 1
        self.ts += rng.expovariate(1.0)
        event: dict[str, Any] = {}
        for name, t in s.fields.items():
            if t is FieldType.STR:
                event[name] = f"{name[:3]}{rng.randrange(8)}"
            elif t is FieldType.INT:
                event[name] = rng.randrange(-1000, 1000)
            elif t is FieldType.FLOAT:
                event[name] = round(rng.uniform(0, 500), 2)
            elif t is FieldType.BOOL:
                event[name] = rng.random() < 0.5
            else:
                event[name] = round(self.ts, 3)
        event[s.key] = f"h{rng.randrange(50):03d}"
        event[s.event_id] = f"h{self.seed}-{self.n:07d}"
        return event

    def _declare(self) -> None:
        s, c = self.schema, self.classes
        deep = b"[" * DEEP + b"]" * DEEP

        def on(kind: str | None, f: Callable[[dict[str, Any]], bytes | None]) -> Any:
            return lambda e: (kind, f(e))

        c["deep_array"] = on("too_deep", lambda e: deep)
        c["deep_object"] = on("too_deep", lambda e: b'{"a":' * DEEP + b"1" + b"}" * DEEP)
        c["deep_extra"] = on("too_deep", lambda e: _raw(e, "extra", deep.decode()))
        c["deep_field"] = on("too_deep", lambda e: _raw(e, s.key, deep.decode()))
        c["nested_1000_extra"] = on(None, lambda e: _raw(e, "extra", "[" * 1000 + "]" * 1000))
        for ts, name in (
            ("1e20", "ts_1e20"),
            ("1e300", "ts_1e300"),
            ("1.7976931348623157e308", "ts_max_float"),
            ("253402300800", "ts_year_10000"),
            ("100000000000000000000000", "ts_bigint"),
        ):
            c[name] = on("out_of_range", _field_as(s.time, ts))
        c["ts_negative"] = on("wrong_value", lambda e: _raw(e, s.time, "-1"))
        c["ts_nan"] = on("not_finite", lambda e: _raw(e, s.time, "NaN"))
        c["ts_string"] = on("wrong_type", lambda e: _raw(e, s.time, '"2024-01-01"'))
        for f in self.numbers:
            c[f"{f}_1e300"] = on("out_of_range", _field_as(f, "1e300"))
            c[f"{f}_giant_int"] = on("out_of_range", _field_as(f, "9" * 400))
            c[f"{f}_nan"] = on("not_finite", _field_as(f, "NaN"))
            c[f"{f}_infinity"] = on("not_finite", _field_as(f, "-Infinity"))
            c[f"{f}_1e400"] = on("not_finite", _field_as(f, "1e400"))
            c[f"{f}_bool"] = on("wrong_type", _field_as(f, "true"))
            c[f"{f}_string"] = on("wrong_type", _field_as(f, '"12.5"'))
        for f in self.floats:
            c[f"{f}_int"] = on(None, _field_as(f, "100000000000"))
        for f in self.strings:
            c[f"surrogate_{f}"] = on("invalid_text", _field_as(f, '"a\\ud800"'))
            c[f"low_surrogate_{f}"] = on("invalid_text", _field_as(f, '"\\udc00"'))
            c[f"not_utf8_{f}"] = on("invalid_json", _field_as(f, b'"\xff"'))
            c[f"{f}_number"] = on("wrong_type", _field_as(f, "5"))
            c[f"{f}_null"] = on(self._unless_optional(f, "wrong_type"), _field_as(f, "null"))
            c[f"pair_{f}"] = on(None, _suffix_of(f, "\\ud83d\\ude00"))
            c[f"nul_{f}"] = on(None, _suffix_of(f, "\\u0000b"))
        for f in s.fields:
            c[f"missing_{f}"] = on(self._unless_optional(f, "missing_field"), _without(f))
        for f in self.numbers:
            if f in self.optional:
                c[f"{f}_null"] = on(None, _field_as(f, "null"))
        c["surrogate_in_key"] = on(
            "invalid_text", lambda e: orjson.dumps(e)[:-1] + b',"\\ud800x":1}'
        )
        c["extra_surrogate"] = on("invalid_text", lambda e: _raw(e, "note", '"\\udfff"'))
        c["extra_nan"] = on(None, lambda e: _raw(e, "note", "NaN"))
        c["extra_1e400"] = on(None, lambda e: _raw(e, "note", "1e400"))
        c["extra_giant_int"] = on(None, lambda e: _raw(e, "note", "9" * 1000))
        c["extra_long_string"] = on(None, lambda e: _raw(e, "note", '"' + "x" * 30_000 + '"'))
        c["duplicate_key_last_valid"] = on(
            None, lambda e: orjson.dumps(e)[:1] + f'"{s.time}":"x",'.encode() + orjson.dumps(e)[1:]
        )
        c["duplicate_key_last_bad"] = on(
            "wrong_type", lambda e: orjson.dumps(e)[:-1] + f',"{s.time}":"x"}}'.encode()
        )
        for raw, name in (
            (b"[]", "array"),
            (b'"event"', "string"),
            (b"42", "number"),
            (b"null", "null"),
            (b"true", "bool"),
        ):
            c[f"not_object_{name}"] = on("not_an_object", _constant(raw))
        c["truncated_json"] = on("invalid_json", lambda e: orjson.dumps(e)[:-3])
        c["garbage"] = on(
            "invalid_json", lambda e: b"\x00\xff" + self.rng.randbytes(self.rng.randrange(1, 200))
        )
        c["empty_value"] = on("invalid_json", lambda e: b"")
        c["no_value"] = on("empty", lambda e: None)

    def _unless_optional(self, field: str, kind: str) -> str | None:
        return None if field in self.optional else kind

    def oversized(self) -> Hostile:
        """A ~3.5 MiB event (its JSON valid; refused for its size)."""
        event = self.valid_event()
        value = orjson.dumps({**event, "note": "x" * BIG})
        return Hostile("oversized", "oversized", event[self.schema.key].encode(), value)

    def oversized_key(self) -> Hostile:
        """A bad value under a 1 MiB key: its DLQ record still fits."""
        return Hostile("oversized_key", "invalid_json", b"k" * (1 << 20), b"{")

    def one(self, cls: str | None = None) -> Hostile:
        """A hostile message of class ``cls`` (default: one drawn at random)."""
        name = cls or self.rng.choice(sorted(self.classes))
        event = self.valid_event()
        kind, value = self.classes[name](event)
        key = str(event[self.schema.key]).encode()
        event_id = None
        if kind is None:  # the id as the scorer reads it (a class may have changed it)
            try:
                doc = orjson.loads(value or b"")
            except orjson.JSONDecodeError:  # NaN and the like in an extra field
                doc = json.loads(value or b"")
            event_id = str(doc[self.schema.event_id])
        return Hostile(name, kind, key, value, event_id)

    def valid(self) -> Hostile:
        event = self.valid_event()
        key = str(event[self.schema.key]).encode()
        return Hostile("valid", None, key, orjson.dumps(event), str(event[self.schema.event_id]))

    def stream(self, hostile: int, valid: int, oversized: int = 3) -> Iterator[Hostile]:
        """``hostile`` messages (every class at least once if there is room, then
        drawn at random; ``oversized`` of them ~3.5 MiB, one with a 1 MiB key) and
        ``valid`` events, shuffled together."""
        plan: list[str] = ["oversized"] * oversized + ["oversized_key"] * min(1, hostile)
        names = sorted(self.classes)
        plan += names[: max(0, hostile - len(plan))]
        while len(plan) < hostile:
            plan.append(self.rng.choice(names))
        plan = plan[:hostile] + ["valid"] * valid
        self.rng.shuffle(plan)
        for name in plan:
            if name == "valid":
                yield self.valid()
            elif name == "oversized":
                yield self.oversized()
            elif name == "oversized_key":
                yield self.oversized_key()
            else:
                yield self.one(name)
