"""Turn raw message bytes into a typed dict, or into the reason they were refused.

Whatever the bytes, the validator answers (a record or an ``Invalid``) and never
raises: nesting deeper than the parser's limit, lone UTF-16 surrogates (in keys or
values), numbers and timestamps out of range are refused with a kind naming the
problem, before anything downstream (msgpack, the Lua scripts, orjson.dumps) sees
them. A record it returns holds only valid text and finite numbers within bounds.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NotRequired

import orjson
from pydantic import ConfigDict, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from riverflow.streams.contracts import LabelType
from riverflow.streams.schema import FieldType, LabelSpec, SlateSpec

_PY_TYPES: dict[FieldType, Any] = {
    FieldType.STR: str,
    FieldType.INT: int,
    FieldType.FLOAT: float,
    FieldType.BOOL: bool,
    FieldType.TIMESTAMP: float,
}

MAX_UNDECLARED = 1000
MAX_DEPTH = 1024  # orjson's own limit on nesting; the stdlib fallback is held to it too
YEAR_9999 = 253_402_300_799.0  # 9999-12-31T23:59:59Z, epoch seconds


@dataclass(frozen=True)
class Bounds:
    """What a valid record's numbers may hold (settings ``event_time_min_s``,
    ``event_time_max_s``, ``max_abs_number``)."""

    ts_min: float = 0.0
    ts_max: float = YEAR_9999
    # |x| of an int or float field: beyond it the store's sums of squares overflow
    # and the tiles' int64 fields cannot hold it
    max_abs: float = 1e18


@dataclass(frozen=True)
class Invalid:
    """Why a message was refused: a short kind (for metrics) and a message naming the problem."""

    kind: str
    message: str
    field: str | None = None  # the declared field it is about, when one is


def _reject_constant(name: str) -> float:
    return float(name)  # NaN / Infinity: parsed so that validation names the field


# what a bool field takes besides true and false (a label of 1 is a positive label)
_BOOL_FORMS: dict[Any, bool] = {0: False, 1: True, "0": False, "1": True,
                                "true": True, "false": False}  # fmt: skip


class RecordValidator:
    """Validates JSON objects against declared fields: strict types, finite numbers
    within ``bounds``, every declared field present, a size limit. Undeclared
    fields are dropped. Only conversions that lose nothing are made: an integer is
    taken for a float field, a whole number written as a float (``30.0``) for an
    int field, and ``0``/``1``, ``"0"``/``"1"`` and ``"true"``/``"false"`` (any case)
    for a bool field; anything else of the wrong type is refused naming the field.

    ``optional`` fields may be missing or null: the record holds None for them.
    """

    def __init__(
        self,
        fields: dict[str, FieldType],
        max_bytes: int,
        bounds: Bounds | None = None,
        optional: Collection[str] = (),
        choices: Mapping[str, Sequence[str | int]] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.bounds = bounds or Bounds()
        self.optional = [n for n in fields if n in optional]
        self._declared = frozenset(fields)
        # names of undeclared fields seen (dropped from records): the caller reads
        # and clears it (data quality reports a new field); at most MAX_UNDECLARED
        self.undeclared: set[str] = set()
        # fields that hold one of declared values (a category label): each value is
        # taken as itself or as its text (``2`` for a declared ``"2"``, and the other way)
        self._choices = {
            name: {**{str(v): v for v in values}, **{v: v for v in values if type(v) is int}}
            for name, values in (choices or {}).items()
        }
        types = {
            n: NotRequired[_PY_TYPES[t] | None] if n in optional else _PY_TYPES[t]
            for n, t in fields.items()
        }
        types.update({n: Any for n in self._choices})
        record = TypedDict("record", types)  # type: ignore[misc]
        record.__pydantic_config__ = ConfigDict(  # type: ignore[attr-defined]
            strict=True, allow_inf_nan=False, extra="ignore"
        )
        self._adapter: TypeAdapter[Any] = TypeAdapter(record)
        self._timestamps = [n for n, t in fields.items() if t is FieldType.TIMESTAMP]
        self._floats = [n for n, t in fields.items() if t in (FieldType.FLOAT, FieldType.TIMESTAMP)]
        self._numbers = [n for n, t in fields.items() if t in (FieldType.FLOAT, FieldType.INT)]
        self._ints = [n for n, t in fields.items() if t is FieldType.INT]
        self._bools = [n for n, t in fields.items() if t is FieldType.BOOL]

    def __call__(self, raw: bytes | None) -> dict[str, Any] | Invalid:
        data = self.parse(raw)
        return data if isinstance(data, Invalid) else self.check(data)

    def parse(self, raw: bytes | None) -> Any:
        """The JSON value of a message, or ``Invalid`` naming why it is none."""
        if raw is None:
            return Invalid("empty", "message has no value")
        if len(raw) > self.max_bytes:
            return Invalid("oversized", f"payload is {len(raw)} bytes, limit {self.max_bytes}")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if "depth" in str(exc):
                return Invalid("too_deep", f"nested deeper than {MAX_DEPTH} levels")
            return self._lenient(raw)
        return data

    def check(self, data: Any) -> dict[str, Any] | Invalid:
        """Validate an already-parsed record (``data`` may be changed in place)."""
        if not isinstance(data, dict):
            return Invalid("not_an_object", f"expected a JSON object, got {type(data).__name__}")
        if len(data) > len(self._declared) or self.optional:
            extra = data.keys() - self._declared
            if extra and len(self.undeclared) < MAX_UNDECLARED:
                self.undeclared.update(str(k)[:100] for k in extra)
        for name in self._floats:  # a JSON integer is a number: 100000000000 is an amount
            value = data.get(name)
            if type(value) is int:
                try:
                    data[name] = float(value)
                except OverflowError:
                    return Invalid("out_of_range", f"{name}: beyond the range of a float", name)
        for name in self._ints:  # 30.0 is the whole number 30; 30.5 is refused below
            value = data.get(name)
            if type(value) is float and value.is_integer():
                data[name] = int(value)
        for name in self._bools:
            value = data.get(name)
            if type(value) is not bool and isinstance(value, int | str):
                flag = _BOOL_FORMS.get(value.lower() if isinstance(value, str) else value)
                if flag is None:
                    return Invalid(
                        "wrong_type",
                        f"{name}: {str(value)[:40]!r} is not a boolean "
                        '(true/false, 0/1 or "0"/"1")',
                        name,
                    )
                data[name] = flag
        for name, known in self._choices.items():
            if name not in data:
                continue  # refused as missing below
            value = data[name]
            if type(value) is float and value.is_integer():
                value = int(value)
            choice = None
            if type(value) in (str, int):
                choice = known.get(value, known.get(str(value)))
            if choice is None:
                shown = ", ".join(map(str, list(known.values())[:20]))
                return Invalid(
                    "wrong_value",
                    f"{name}: {str(value)[:40]!r} is not one of the declared classes ({shown})",
                )
            data[name] = choice
        try:
            record = self._adapter.validate_python(data)
        except ValidationError as exc:
            return _explain(exc)
        for name in self.optional:
            record.setdefault(name, None)
        return self._in_bounds(record)

    def _in_bounds(self, record: dict[str, Any]) -> dict[str, Any] | Invalid:
        b = self.bounds
        for name in self._timestamps:
            ts = record[name]
            if ts is None:
                continue
            if ts < b.ts_min:
                why = f"{name}: timestamp {ts!r} is before {b.ts_min}"
                return Invalid("wrong_value", why, name)
            if ts > b.ts_max:
                return Invalid(
                    "out_of_range", f"{name}: timestamp {ts!r} is after {b.ts_max}", name
                )
        for name in self._numbers:
            value = record[name]
            if value is not None and abs(value) > b.max_abs:
                return Invalid("out_of_range", f"{name}: |{value!r}| > {b.max_abs:g}", name)
        return record

    @staticmethod
    def _lenient(raw: bytes) -> Any:
        # orjson refuses NaN/Infinity outright; the stdlib parser reads them so the
        # error can name the field instead of a byte offset. It also reads what
        # orjson refuses for good reason: lone surrogates (refused here) and, were it
        # not for the limit, nesting deep enough to exhaust the stack.
        if _depth_exceeds(raw, MAX_DEPTH):
            return Invalid("too_deep", f"nested deeper than {MAX_DEPTH} levels")
        try:
            data = json.loads(raw, parse_constant=_reject_constant)
        except RecursionError:
            return Invalid("too_deep", "nested too deep to parse")
        except (ValueError, UnicodeDecodeError) as exc:
            return Invalid("invalid_json", f"not valid JSON: {exc}")
        bad = _bad_text(data)
        if bad is not None:
            return Invalid("invalid_text", f"{bad}: not valid Unicode text (a lone surrogate)")
        return data


_LABEL_FIELD_TYPES = {
    LabelType.BOOL: FieldType.BOOL,
    LabelType.INT: FieldType.INT,
    LabelType.FLOAT: FieldType.FLOAT,
}


class SlateValidator:
    """Validates a ranking request: the request's fields as ``RecordValidator`` does,
    and its candidates (``events.slate``): a list of 1 to ``max_items`` objects of the
    slate's fields, each item once. The record holds the candidates under the slate
    field; an error names the candidate (``items[3].category: ...``)."""

    def __init__(self, requests: RecordValidator, slate: SlateSpec) -> None:
        self.requests = requests
        self.slate = slate
        self.items = RecordValidator(slate.fields, requests.max_bytes, requests.bounds)

    @property
    def undeclared(self) -> set[str]:
        return self.requests.undeclared

    def __call__(self, raw: bytes | None) -> dict[str, Any] | Invalid:
        data = self.requests.parse(raw)
        if isinstance(data, Invalid):
            return data
        name = self.slate.field
        if not isinstance(data, dict):
            return self.requests.check(data)  # refused, named as any record is
        candidates = data.pop(name, None)
        record = self.requests.check(data)
        if isinstance(record, Invalid):
            return record
        if not isinstance(candidates, list):
            if candidates is None:
                return Invalid("missing_field", f"{name}: the request has no candidates", name)
            kind = type(candidates).__name__
            return Invalid("wrong_type", f"{name}: expected a list of candidates, got {kind}", name)
        if not candidates or len(candidates) > self.slate.max_items:
            return Invalid(
                "wrong_value",
                f"{name}: {len(candidates)} candidates, expected 1 to {self.slate.max_items}",
                name,
            )
        items, seen, item_id = [], set(), self.slate.item_id
        for i, candidate in enumerate(candidates):
            item = self.items.check(candidate)
            if isinstance(item, Invalid):
                return Invalid(item.kind, f"{name}[{i}].{item.message}", name)
            if item[item_id] in seen:
                why = f"{name}[{i}].{item_id}: {str(item[item_id])[:40]!r} is a candidate twice"
                return Invalid("wrong_value", why, name)
            seen.add(item[item_id])
            items.append(item)
        record[name] = items
        return record


def label_validator(
    label: LabelSpec, max_bytes: int, bounds: Bounds | None = None
) -> RecordValidator:
    """The validator of label messages: the event id they label, and the label as the
    spec's ``label.type`` declares it (a flag, a finite number within bounds, or one of
    the declared classes); a label that is not one is refused naming the field."""
    fields = {label.event_id: FieldType.STR}
    if label.item is not None:  # a slate's label: the request and the item
        fields[label.item] = FieldType.STR
    if label.type is LabelType.CATEGORY:
        return RecordValidator(
            fields, max_bytes, bounds, choices={label.field: label.classes or []}
        )
    fields[label.field] = _LABEL_FIELD_TYPES[label.type]
    return RecordValidator(fields, max_bytes, bounds)


def _depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than ``limit`` (a linear scan, no
    recursion; only messages orjson refused come here)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    depth, in_str, escaped = 0, False, False
    for c in raw:
        if in_str:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif c in (0x5D, 0x7D):
            depth -= 1
    return False


def _valid_text(s: str) -> bool:
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


def _bad_text(data: Any) -> str | None:
    """Where the first string (a key or a value) that is not valid UTF-8 sits, or None
    (iterative: the depth is bounded, the width is not)."""
    stack: list[tuple[str, Any]] = [("(root)", data)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            if not _valid_text(item):
                return where
        elif isinstance(item, dict):
            for k, v in item.items():
                name = k if where == "(root)" else f"{where}.{k}"
                if not _valid_text(k):
                    return f"key in {where}"
                stack.append((name, v))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(item))
    return None


def _explain(exc: ValidationError) -> Invalid:
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "(root)"
    kind = {"missing": "missing_field", "finite_number": "not_finite"}.get(
        first["type"], "wrong_type"
    )
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    field = str(first["loc"][0]) if first["loc"] else None
    return Invalid(kind, f"{where}: {first['msg'][:200]}{more}", field)
