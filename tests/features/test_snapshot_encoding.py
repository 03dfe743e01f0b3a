"""A snapshot and a served probability are stored as msgpack wrote them before msgspec
did: the Lua scripts, ``with_served`` (which turns the array's header byte from three
elements to four) and the snapshots already in Redis rely on that layout."""

from __future__ import annotations

import msgpack
import orjson
from hypothesis import given
from hypothesis import strategies as st

from riverflow.features.store.base import FeatureSnapshot, encode_snapshot, packed, with_served
from riverflow.streams.contracts import ServedPrediction

numbers = st.one_of(
    st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False), st.just(float("nan"))
)
vectors = st.lists(st.one_of(st.none(), st.lists(numbers, max_size=8)), max_size=6)
contexts = st.dictionaries(st.text(max_size=12), st.one_of(st.text(max_size=300), numbers))


@given(context=contexts, vectors=vectors, late=st.booleans())
def test_a_snapshot_is_encoded_byte_for_byte_as_msgpack_packb_encodes_it(
    context: dict[str, object], vectors: list[list[float] | None], late: bool
) -> None:
    raw = orjson.dumps(context)
    assert encode_snapshot(raw, vectors, late) == msgpack.packb([raw.decode(), vectors, int(late)])


@given(
    model=st.text(max_size=80),
    version=st.integers(0, 2**40),
    p=st.floats(0.0, 1.0),
    vectors=vectors,
)
def test_a_served_probability_is_encoded_as_msgpack_packb_encodes_it_and_decodes_back(
    model: str, version: int, p: float, vectors: list[list[float] | None]
) -> None:
    served = ServedPrediction(model, version, p)
    assert packed(served) == msgpack.packb([model, version, p])
    raw = with_served(encode_snapshot(b'{"a":1}', vectors, False), packed(served))
    assert raw is not None
    snap = FeatureSnapshot.decode("e1", raw)
    assert snap.served == served and snap.inputs == {"a": 1}
