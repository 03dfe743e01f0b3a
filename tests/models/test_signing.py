"""Only snapshots signed with our key are unpickled."""

from __future__ import annotations

import base64
import hmac
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


def test_the_signing_key_rotates_what_the_old_key_signed_verifies_while_it_is_kept() -> None:
    from riverflow.models.checkpoint import LearnerCheckpoint
    from riverflow.models.signing import MAGIC, Keyring, signed_with

    old = Keyring("2025", b"old key")
    new = Keyring("2026", b"new key", older={"2025": b"old key"})
    registry = MemoryRegistry(old)
    v1 = registry.publish("m", {"w": 1}, {})
    exported = registry.export("m", v1)
    saved = LearnerCheckpoint({"m": v1}, {"m": {}}, 10, {0: 10}, [])
    registry.save_checkpoint(saved)
    assert registry.meta("m", v1)["key_id"] == "2025"
    # the process restarts signing with the new key, the old one kept for verifying
    registry.key = new
    assert registry.load("m", v1).model == {"w": 1} and registry.checkpoint() == saved
    v2 = registry.publish("m", {"w": 2}, {"parent": v1})
    assert registry.meta("m", v2)["key_id"] == "2026"
    assert signed_with(registry.blobs[("m", v2)][0]) == "2026"
    assert MemoryRegistry(new).import_(exported).model == {"w": 1}  # an old export too
    # once the old key is dropped, what it signed is refused, naming the key id
    registry.key = Keyring("2026", b"new key")
    with pytest.raises(SignatureError, match="key id '2025', which this keyring does not hold"):
        registry.load("m", v1)
    with pytest.raises(SignatureError, match="key id '2025'"):
        MemoryRegistry(Keyring("2026", b"new key")).import_(exported)
    assert registry.load("m", v2).model == {"w": 2}
    # the key id is covered by the signature: relabelled, it no longer verifies
    blob = registry.blobs[("m", v2)][0].replace(b"2026", b"2025", 1)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_and_load(blob, new)
    # a blob signed before key ids verifies with any key of the ring
    legacy = MAGIC + hmac.new(b"old key", pickle.dumps({"w": 0}), "sha256").digest()
    assert verify_and_load(legacy + pickle.dumps({"w": 0}), new) == {"w": 0}


def test_the_keyring_comes_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from riverflow.assembly import signing_key
    from riverflow.settings import Settings

    monkeypatch.setenv("RIVERFLOW_SIGNING_KEY", "new key")
    monkeypatch.setenv("RIVERFLOW_SIGNING_KEY_ID", "2026")
    monkeypatch.setenv("RIVERFLOW_VERIFICATION_KEYS", '{"2025": "old key"}')
    ring = signing_key(Settings())
    assert (ring.key_id, ring.key, dict(ring.older)) == ("2026", b"new key", {"2025": b"old key"})
    assert "old key" not in repr(Settings())  # secrets stay out of reprs and logs
