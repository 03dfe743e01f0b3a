"""Every kind of bad input is refused with a reason naming the problem."""

from __future__ import annotations

import pytest

from riverflow.spec import PipelineSpec
from riverflow.streams.validation import Invalid, RecordValidator
from riverflow.tools.generator import BAD_KINDS, FraudStreamConfig, corrupt, transactions


@pytest.fixture
def validate(fraud_spec: PipelineSpec) -> RecordValidator:
    return RecordValidator(fraud_spec.events.fields, max_bytes=65_536)


def good_event() -> dict[str, object]:
    return next(transactions(1, FraudStreamConfig()))[0]


def test_a_good_event_passes_typed(validate: RecordValidator) -> None:
    event = good_event()
    import orjson

    record = validate(orjson.dumps({**event, "extra": "ignored"}))
    assert record == {**event, "amount": float(event["amount"])}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "mentions"),
    [
        ("invalid_json", "not valid JSON"),
        ("wrong_type", "amount"),
        ("missing_field", "card_id"),
        ("oversized", "limit 65536"),
        ("not_finite", "amount"),
    ],
)
def test_bad_inputs_get_their_kind_and_a_reason(
    validate: RecordValidator, kind: str, mentions: str
) -> None:
    result = validate(corrupt(good_event(), kind))
    assert isinstance(result, Invalid)
    assert result.kind == kind
    assert mentions in result.message


def test_every_generated_corruption_kind_is_covered() -> None:
    assert set(BAD_KINDS) == {"invalid_json", "wrong_type", "missing_field", "oversized",
                              "not_finite"}  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (None, "empty"),
        (b"[1, 2]", "not_an_object"),
        (b"\xff\xfe", "invalid_json"),
    ],
)
def test_other_malformed_payloads(validate: RecordValidator, raw: bytes | None, kind: str) -> None:
    result = validate(raw)
    assert isinstance(result, Invalid) and result.kind == kind


def test_infinity_is_refused_naming_the_field(validate: RecordValidator) -> None:
    nan = corrupt(good_event(), "not_finite")
    result = validate(nan.replace(b"NaN", b"-Infinity"))
    assert isinstance(result, Invalid)
    assert (result.kind, result.message.split(":")[0]) == ("not_finite", "amount")


def test_bool_is_not_a_number_and_negative_time_is_refused(validate: RecordValidator) -> None:
    import orjson

    event = good_event()
    assert isinstance(validate(orjson.dumps({**event, "amount": True})), Invalid)
    refused = validate(orjson.dumps({**event, "ts": -1}))
    assert isinstance(refused, Invalid) and "ts" in refused.message


def test_labels_as_numbers_and_whole_floats_are_taken_what_would_lose_something_is_not() -> None:
    import orjson

    from riverflow.streams.schema import FieldType

    validate = RecordValidator(
        {"event_id": FieldType.STR, "is_fraud": FieldType.BOOL, "count": FieldType.INT},
        max_bytes=1024,
    )
    for given, taken in [(1, True), (0, False), ("1", True), ("0", False), ("TRUE", True),
                         ("false", False), (True, True)]:  # fmt: skip
        record = validate(orjson.dumps({"event_id": "e", "is_fraud": given, "count": 30.0}))
        assert record == {"event_id": "e", "is_fraud": taken, "count": 30}
        assert type(record["is_fraud"]) is bool and type(record["count"]) is int
    for bad in (2, -1, "yes", "", 1.0, None, [1]):
        refused = validate(orjson.dumps({"event_id": "e", "is_fraud": bad, "count": 3}))
        assert isinstance(refused, Invalid) and refused.kind == "wrong_type", bad
        assert refused.message.startswith("is_fraud:")
    refused = validate(orjson.dumps({"event_id": "e", "is_fraud": 1, "count": 30.5}))
    assert isinstance(refused, Invalid) and refused.message.startswith("count:")
    refused = validate(b'{"event_id": "e", "is_fraud": 1, "count": NaN}')
    assert isinstance(refused, Invalid) and refused.message.startswith("count:")
