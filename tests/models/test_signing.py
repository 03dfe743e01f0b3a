"""Only snapshots signed with our key are unpickled."""

from __future__ import annotations

import base64
import pickle

import orjson
import pytest

from riverflow.models.errors import ModelError, SignatureError
from riverflow.models.registry import ChampionPointer, MemoryRegistry
from riverflow.models.signing import sign, sign_bytes, verify_and_load, verify_bytes


class Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, ("raise SystemExit('unpickled untrusted bytes')",))


def test_round_trip() -> None:
    assert verify_and_load(sign({"w": [1.0, 2.0]}, b"k"), b"k") == {"w": [1.0, 2.0]}


def test_tampered_other_key_and_unsigned_are_refused() -> None:
    blob = bytearray(sign({"w": 1}, b"k"))
    blob[-2] ^= 0xFF
    with pytest.raises(SignatureError, match="does not verify"):
        verify_and_load(bytes(blob), b"k")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_and_load(sign({"w": 1}, b"other"), b"k")
    with pytest.raises(SignatureError, match="not signed"):
        verify_and_load(pickle.dumps(Boom()), b"k")


def test_signed_documents_and_signed_pickles_are_not_interchangeable() -> None:
    document = sign_bytes(b'{"a": 1}', b"k")
    assert verify_bytes(document, b"k", "doc") == b'{"a": 1}'
    with pytest.raises(SignatureError, match="model snapshot is not signed"):
        verify_and_load(document, b"k")  # never handed to pickle
    relabelled = sign(1, b"k")[:4] + document[4:]
    with pytest.raises(SignatureError, match="does not verify"):
        verify_and_load(relabelled, b"k")
    with pytest.raises(SignatureError, match="doc is not signed"):
        verify_bytes(sign({"w": 1}, b"k"), b"k", "doc")


def test_registry_versions_and_champion_pointer() -> None:
    registry = MemoryRegistry(b"k")
    assert registry.champion() is None
    assert registry.publish("m", {"state": 1}, {"labels_seen": 10}) == 1
    assert registry.publish("m", {"state": 2}, {}) == 2
    assert registry.champion() is None  # publishing does not move the pointer
    first = registry.load("m", 1)
    assert first.model == {"state": 1} and first.meta["labels_seen"] == 10
    assert first.meta["river"] and first.meta["created"] > 0
    assert registry.move(ChampionPointer("m", 1), "advance", None) is not None
    # compare-and-set: a move expecting another pointer is not applied
    assert registry.move(ChampionPointer("m", 2), "advance", ChampionPointer("m", 7)) is None
    registry.promote(ChampionPointer("m", 2))
    assert registry.champion() == ChampionPointer("m", 2)
    assert [(m.kind, m.to.version) for m in registry.history()] == [("advance", 1), ("promote", 2)]
    with pytest.raises(ModelError, match="no version 9"):
        registry.promote(ChampionPointer("m", 9))


def test_rollback_goes_back_one_move_at_a_time() -> None:
    registry = MemoryRegistry(b"k")
    for state in range(3):
        registry.promote(ChampionPointer("m", registry.publish("m", {"state": state}, {})))
    target = registry.rollback_target()
    assert target == ChampionPointer("m", 2)
    registry.promote(target, kind="rollback")
    assert registry.rollback_target() == ChampionPointer("m", 1)  # not back to 3
    registry.promote(ChampionPointer("m", 1), kind="rollback")
    assert registry.rollback_target() is None


def test_export_import_round_trip_and_tampered_export_refused() -> None:
    source, target = MemoryRegistry(b"k"), MemoryRegistry(b"k")
    version = source.publish("m", {"state": 1}, {"labels_seen": 5, "parent": 7})
    assert version == 8  # numbered above its parent
    exported = source.export("m", version)
    imported = target.import_(exported)
    assert imported.model == {"state": 1} and imported.meta["labels_seen"] == 5
    assert imported.meta["imported_from"]["version"] == 8 and "parent" not in imported.meta
    with pytest.raises(SignatureError):
        MemoryRegistry(b"other").import_(exported)
    record = orjson.loads(exported)
    blob = bytearray(base64.b64decode(record["blob_b64"]))
    blob[-3] ^= 0x01
    record["blob_b64"] = base64.b64encode(bytes(blob)).decode()
    with pytest.raises(SignatureError, match="does not verify"):
        target.import_(orjson.dumps(record))
    assert target.versions("m") == [1]  # nothing stored from the refused file
    with pytest.raises(ModelError, match="not a riverflow model export"):
        target.import_(b"{}")
