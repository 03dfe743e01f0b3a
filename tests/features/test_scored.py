"""The learner's index of scored events: what a label joins, read back from the
predictions topic, on disk (RocksDB) or in memory."""

from __future__ import annotations

from pathlib import Path

import msgpack
import orjson
import pytest

from riverflow.errors import outage
from riverflow.features.scored import (
    MEMTABLE_MB,
    DiskScoredIndex,
    MemoryScoredEvents,
    ScoredEvent,
    ScoredIndexError,
)
from riverflow.streams.contracts import Message, Prediction, ServedPrediction

TOPIC = "ns.predictions"


def prediction(event_id: str, probability: float, offset: int, partition: int = 0) -> Message:
    p = Prediction(event_id, "c1", probability, "tree", 3, {"n_10m": 2.0}, 1.0, 2.0,
                   inputs={"amount": 12.5, "country": "FR"})  # fmt: skip
    return Message(TOPIC, partition, offset, b"c1", p.encode())


def hostile(offset: int) -> list[Message]:
    forged = {"event_id": "e9", "inputs": 5, "features": {"n": "x"}, "model": "m",
              "version": 1, "probability": 0.5}  # fmt: skip
    values = [b"\xff\x00", b"{}", b"[1, 2]", orjson.dumps({"event_id": 7, "inputs": {}}), None,
              orjson.dumps(forged)]  # fmt: skip
    return [Message(TOPIC, 0, offset + i, None, v) for i, v in enumerate(values)]


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_the_first_prediction_of_an_event_is_what_its_label_joins(
    kind: str, tmp_path: Path
) -> None:
    index = DiskScoredIndex(tmp_path, 3600) if kind == "disk" else MemoryScoredEvents()
    index.add([prediction("e1", 0.25, 0), *hostile(1), prediction("e2", 0.5, 7)])
    index.add([prediction("e1", 0.75, 8)])  # re-scored later: not the answer served first
    found = index.lookup(["e1", "e2", "e9", "nope"])
    assert found == {
        "e1": ScoredEvent("e1", {"amount": 12.5, "country": "FR"}, {"n_10m": 2.0},
                          ServedPrediction("tree", 3, 0.25), event_time=1.0),
        "e2": ScoredEvent("e2", {"amount": 12.5, "country": "FR"}, {"n_10m": 2.0},
                          ServedPrediction("tree", 3, 0.5), event_time=1.0),
    }  # fmt: skip
    assert index.unreadable == 6  # hostile or forged records cost nothing else
    index.forget(["e1"])
    assert list(index.lookup(["e1", "e2"])) == ["e2"]


def test_the_disk_index_goes_on_from_where_it_was_for_its_own_source(tmp_path: Path) -> None:
    index = DiskScoredIndex(tmp_path, 3600)
    assert index.positions("cluster-a/ns.predictions") == {}
    index.add([prediction("e1", 0.25, 41, partition=0), prediction("e2", 0.5, 9, partition=2)])
    index.close()
    reopened = DiskScoredIndex(tmp_path, 3600)  # a restarted (or killed) learner
    assert reopened.positions("cluster-a/ns.predictions") == {0: 42, 2: 10}
    assert set(reopened.lookup(["e1", "e2"])) == {"e1", "e2"}
    # read from another cluster (a new broker): its offsets mean nothing here
    assert reopened.positions("cluster-b/ns.predictions") == {}
    reopened.close()


def test_a_second_learner_on_the_same_index_is_a_clear_error(tmp_path: Path) -> None:
    first = DiskScoredIndex(tmp_path, 3600)
    with pytest.raises(Exception, match="another learner of this pipeline"):
        DiskScoredIndex(tmp_path, 3600)
    first.close()


def test_the_memory_index_keeps_the_newest_up_to_its_bound() -> None:
    index = MemoryScoredEvents(max_events=3)
    index.add([prediction(f"e{i}", 0.5, i) for i in range(5)])
    assert sorted(index.lookup([f"e{i}" for i in range(5)])) == ["e2", "e3", "e4"]


def test_an_index_that_cannot_write_is_an_outage_not_a_bad_label(tmp_path: Path) -> None:
    index = DiskScoredIndex(tmp_path, 3600)
    index.close()  # as a full disk or an I/O error would: the writes fail
    with pytest.raises(ScoredIndexError, match="scored-events index") as raised:
        index.add([prediction("e1", 0.25, 0)])
    # the guard waits it out (and stops after the outage limit): labels stay unblamed
    assert outage(raised.value) is not None


def test_a_record_indexed_before_event_times_were_kept_still_reads() -> None:
    """An index on disk outlives an upgrade: its records lack the event time."""
    old = {
        "fraud": [{"amount": 1.0}, {"n": 2.0}, "tree", 3, 0.25],
        "number": [{"amount": 1.0}, {}, "reg", 1, None, 4.5, None],
        "slate": [{"u": "u1"}, {}, "fm", 2, 0.1, None, None, {"request": "r1", "position": 0}],
    }
    for name, record in old.items():
        scored = ScoredEvent.unpack(name, msgpack.packb(record))
        assert scored.event_time is None and scored.inputs == record[0]
    assert ScoredEvent.unpack("r", msgpack.packb(old["slate"])).slot == {
        "request": "r1",
        "position": 0,
    }
    assert ScoredEvent.unpack("n", msgpack.packb(old["number"])).served.value == 4.5


def test_the_disk_index_says_what_it_holds_in_memory(tmp_path: Path) -> None:
    """Its memtables grow with what is written, up to their bound: the learner reports
    it (``scored_index_bytes``), and the soak judges the learner's RSS less it."""
    index = DiskScoredIndex(tmp_path, 3600)
    empty = index.memory_bytes() or 0
    index.add([prediction(f"e{i}", 0.5, i) for i in range(20_000)])
    written = index.memory_bytes() or 0
    # each record is ~70 B compacted and more in a memtable: at least that many bytes
    assert written - empty > 20_000 * 70, (empty, written)
    assert written < 2 * MEMTABLE_MB * 2**20 + 256 * 2**20  # the memtables' and cache's bound
    index.close()
    assert index.memory_bytes() is None  # closed: not known, not an error
    assert MemoryScoredEvents().memory_bytes() is None
