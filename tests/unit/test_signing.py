"""Only snapshots signed with our key are unpickled."""

from __future__ import annotations

import pickle

import pytest

from models.errors import SignatureError
from models.registry import MemoryRegistry
from models.signing import sign, verify_and_load


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


def test_registry_versions_and_champion_pointer() -> None:
    registry = MemoryRegistry(b"k")
    assert registry.champion("m") is None
    assert registry.publish("m", {"state": 1}, {"labels_seen": 10}) == 1
    assert registry.publish("m", {"state": 2}, {}) == 2
    assert registry.champion("m") == 2
    first = registry.load("m", 1)
    assert first.model == {"state": 1} and first.meta["labels_seen"] == 10
