"""What the registry keeps: the newest versions of each candidate, every version
that served as champion and those the learner continues from; a version number
is never handed out twice; an export's metadata is signed with its model."""

from __future__ import annotations

import base64

import orjson
import pytest

from riverflow.models.checkpoint import LearnerCheckpoint
from riverflow.models.errors import SignatureError
from riverflow.models.registry import (
    OLD_EXPORT_FORMAT,
    ChampionPointer,
    MemoryRegistry,
    ModelRegistry,
)


def checkpoint(versions: dict[str, int]) -> LearnerCheckpoint:
    metrics = {name: {} for name in versions}
    return LearnerCheckpoint(versions, metrics, 0, {}, [])


def test_old_versions_are_pruned_but_champions_and_the_checkpoints_stay() -> None:
    registry = MemoryRegistry(b"k", keep_versions=3)
    for v in range(1, 5):
        assert registry.publish("m", {"v": v}, {"parent": v - 1}) == v
    registry.promote(ChampionPointer("m", 2))
    registry.save_checkpoint(checkpoint({"m": 3}))
    for v in range(5, 13):
        registry.publish("m", {"v": v}, {"parent": v - 1})
    registry.publish("other", {"v": 1}, {})
    # newest 3, the champion (2) and the checkpoint's (3); 1 and 4..9 are gone
    assert registry.versions("m") == [2, 3, 10, 11, 12]
    assert registry.versions("other") == [1]
    registry.promote(ChampionPointer("m", 12))
    for v in range(13, 17):
        registry.publish("m", {"v": v}, {"parent": v - 1})
    # 2 was champion once: it stays (a rollback can go back to it)
    assert registry.versions("m") == [2, 3, 12, 14, 15, 16]
    assert registry.load("m", 2).model == {"v": 2}


def test_versions_the_champion_only_advanced_through_are_not_kept_forever() -> None:
    # the learner publishes the champion it trains and advances the pointer every
    # snapshot: kept all, they grew Redis ~60 MB/min in the soak
    registry = MemoryRegistry(b"k", keep_versions=3)
    registry.publish("m", {"v": 1}, {"parent": 0})
    assert registry.move(ChampionPointer("m", 1), "advance", None) is not None
    for v in range(2, 31):
        registry.publish("m", {"v": v}, {"parent": v - 1})
        expect = ChampionPointer("m", v - 1)
        assert registry.move(ChampionPointer("m", v), "advance", expect) is not None
    registry.promote(ChampionPointer("m", 29), "rollback")
    for v in range(31, 41):
        registry.publish("m", {"v": v}, {"parent": v - 1})
    # the first champion, the rollback's target (29) and the version it replaced
    # (30), and the newest 3; the 27 snapshots advanced through in between are gone
    assert registry.versions("m") == [1, 29, 30, 38, 39, 40]
    # rolling back again passes over the pruned 28..2 to the first champion
    assert registry.rollback_target() == ChampionPointer("m", 1)


def test_a_version_number_is_never_handed_out_twice() -> None:
    registry = MemoryRegistry(b"k", keep_versions=1)
    for v in range(1, 4):
        registry.publish("m", {"v": v}, {"parent": v - 1})
    assert registry.versions("m") == [3]
    assert registry.publish("m", {"v": 4}, {"parent": 3}) == 4
    registry.blobs.clear()  # the registry lost everything (no persistence) ...
    registry.seq.clear()
    # ... but a learner continuing from v4 publishes v5, never a second v1
    assert registry.publish("m", {"v": 5}, {"parent": 4}) == 5


def test_an_export_with_edited_metadata_is_refused() -> None:
    source, target = MemoryRegistry(b"k"), MemoryRegistry(b"k")
    source.publish("m", {"state": 1}, {"labels_seen": 5, "metrics": {"roc_auc": 0.61}})
    record = orjson.loads(source.export("m", 1))
    for field, value in (("labels_seen", 5_000_000), ("metrics", {"roc_auc": 0.99})):
        edited = {**record, "meta": {**record["meta"], field: value}}
        with pytest.raises(SignatureError, match="blob and metadata"):
            target.import_(orjson.dumps(edited))
    assert target.versions("m") == []
    assert target.import_(orjson.dumps(record)).meta["labels_seen"] == 5


def test_an_old_export_is_read_with_its_metadata_marked_unverified() -> None:
    source, target = MemoryRegistry(b"k"), MemoryRegistry(b"k")
    source.publish("m", {"state": 1}, {"labels_seen": 5})
    record = orjson.loads(source.export("m", 1))
    old = {k: v for k, v in record.items() if k != "signature_b64"}
    old.update(format=OLD_EXPORT_FORMAT, meta={**record["meta"], "labels_seen": 9})
    imported = target.import_(orjson.dumps(old))
    assert imported.model == {"state": 1} and "labels_seen" not in imported.meta
    assert imported.meta["imported_from"]["meta_verified"] is False
    blob = bytearray(base64.b64decode(old["blob_b64"]))
    blob[-3] ^= 0x01
    old["blob_b64"] = base64.b64encode(bytes(blob)).decode()
    with pytest.raises(SignatureError):  # its model must still verify
        target.import_(orjson.dumps(old))


def bounded_history(registry: ModelRegistry) -> None:
    """Forty snapshots advanced through, a promotion, forty more: the history keeps
    the newest five moves, and a rollback still finds the version before the last."""
    registry.publish("m", {"v": 1}, {"parent": 0})
    registry.move(ChampionPointer("m", 1), "advance", None)
    for v in range(2, 82):
        registry.publish("m", {"v": v}, {"parent": v - 1})
        if v == 41:
            registry.promote(ChampionPointer("m", 41), reason="a better challenger")
        else:
            assert registry.move(ChampionPointer("m", v), "advance", ChampionPointer("m", v - 1))
    moves = registry.history()
    assert [m.to.version for m in moves] == [77, 78, 79, 80, 81]
    assert registry.recent_moves(2) == moves[-2:]
    assert registry.rollback_target() == ChampionPointer("m", 80)


def test_the_pointer_history_keeps_the_newest_moves() -> None:
    bounded_history(MemoryRegistry(b"k", history_keep=5))
    with pytest.raises(ValueError, match="history_keep=0"):
        MemoryRegistry(b"k", history_keep=0)
