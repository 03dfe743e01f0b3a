"""Turn raw message bytes into a typed dict, or into the reason they were refused."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ConfigDict, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from riverflow.streams.schema import FieldType

_PY_TYPES: dict[FieldType, Any] = {
    FieldType.STR: str,
    FieldType.INT: int,
    FieldType.FLOAT: float,
    FieldType.BOOL: bool,
    FieldType.TIMESTAMP: float,
}


@dataclass(frozen=True)
class Invalid:
    """Why a message was refused: a short kind (for metrics) and a message naming the problem."""

    kind: str
    message: str


def _reject_constant(name: str) -> float:
    return float(name)  # NaN / Infinity: parsed so that validation names the field


class RecordValidator:
    """Validates JSON objects against declared fields: strict types, finite numbers,
    every declared field present, a size limit. Undeclared fields are dropped."""

    def __init__(self, fields: dict[str, FieldType], max_bytes: int) -> None:
        self.max_bytes = max_bytes
        record = TypedDict("record", {n: _PY_TYPES[t] for n, t in fields.items()})  # type: ignore[misc]
        record.__pydantic_config__ = ConfigDict(  # type: ignore[attr-defined]
            strict=True, allow_inf_nan=False, extra="ignore"
        )
        self._adapter: TypeAdapter[Any] = TypeAdapter(record)
        self._timestamps = [n for n, t in fields.items() if t is FieldType.TIMESTAMP]

    def __call__(self, raw: bytes | None) -> dict[str, Any] | Invalid:
        if raw is None:
            return Invalid("empty", "message has no value")
        if len(raw) > self.max_bytes:
            return Invalid("oversized", f"payload is {len(raw)} bytes, limit {self.max_bytes}")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = self._lenient(raw)
            if isinstance(data, Invalid):
                return data
        if not isinstance(data, dict):
            return Invalid("not_an_object", f"expected a JSON object, got {type(data).__name__}")
        try:
            record = self._adapter.validate_python(data)
        except ValidationError as exc:
            return _explain(exc)
        for name in self._timestamps:
            if record[name] < 0:
                return Invalid("wrong_value", f"{name}: timestamp must be >= 0 (epoch seconds)")
        return record

    @staticmethod
    def _lenient(raw: bytes) -> Any:
        # orjson refuses NaN/Infinity outright; the stdlib parser reads them so the
        # error can name the field instead of a byte offset.
        try:
            return json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            return Invalid("invalid_json", f"not valid JSON: {exc}")


def _explain(exc: ValidationError) -> Invalid:
    errors = exc.errors(include_url=False)
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "(root)"
    kind = {"missing": "missing_field", "finite_number": "not_finite"}.get(
        first["type"], "wrong_type"
    )
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return Invalid(kind, f"{where}: {first['msg']}{more}")
