"""The label join's cost per scored event: bytes on the learner's disk, CPU to index
a prediction and to look one up (``riverflow features join-bench``).

The spec's scorer (memory store, untimed) makes the predictions of ``events``
generated events; they are indexed into a fresh ``DiskScoredIndex`` in batches
of ``batch`` as the learner's ``TopicFollower`` hands them over, then looked up
in batches of ``batch`` in a shuffled order (a label batch's ids), then
forgotten. Bytes are the index's files after a flush and a full compaction:
what a record costs once RocksDB has settled (lz4/snappy blocks, as built).
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from riverflow.assembly import build_scorer, memory_backends
from riverflow.features.scored import DiskScoredIndex
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.streams.contracts import Message
from riverflow.tools.bench import stream


@dataclass(frozen=True)
class JoinBench:
    events: int
    prediction_bytes: float  # mean size of a prediction message (what the topic carries)
    disk_bytes_per_event: float  # the index on disk, settled
    index_us: float  # CPU per event to index a prediction
    lookup_us: float  # CPU per event to look one up
    forget_us: float  # CPU per event to forget one


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_join_bench(spec: PipelineSpec, events: int, batch: int = 1000) -> JoinBench:
    settings = Settings(batch_size=batch)
    store, registry = memory_backends(spec, settings)
    scorer = build_scorer(spec, settings, store, registry, model_poll_s=0)
    generated, _ = stream(events, seed=7)
    topic = spec.topics.predictions
    batches: list[list[Message]] = []
    offset = 0
    for i in range(0, len(generated), batch):
        chunk = [
            Message(spec.topics.events, 0, i + j, None, orjson.dumps(e))
            for j, e in enumerate(generated[i : i + batch])
        ]
        out = [o for o in scorer.process(chunk) if o.topic == topic]
        batches.append([Message(topic, 0, offset + k, o.key, o.value) for k, o in enumerate(out)])
        offset += len(out)
    n = offset
    size = sum(len(m.value or b"") for b in batches for m in b) / n
    ids = [orjson.loads(m.value or b"")["event_id"] for b in batches for m in b]
    random.Random(7).shuffle(ids)
    with tempfile.TemporaryDirectory(prefix="riverflow-join-") as tmp:
        index = DiskScoredIndex(Path(tmp), 7 * 24 * 3600)
        t0 = time.process_time()
        for b in batches:
            index.add(b)
        index_s = time.process_time() - t0
        t0 = time.process_time()
        found = 0
        for i in range(0, n, batch):
            found += len(index.lookup(ids[i : i + batch]))
        lookup_s = time.process_time() - t0
        if found != n:
            raise AssertionError(f"looked up {found:,} of {n:,} indexed events")
        index.db.flush()
        index.db.compact_range(None, None)
        disk = _disk_bytes(Path(tmp))
        t0 = time.process_time()
        for i in range(0, n, batch):
            index.forget(ids[i : i + batch])
        forget_s = time.process_time() - t0
        index.close()
    return JoinBench(
        events=n,
        prediction_bytes=size,
        disk_bytes_per_event=disk / n,
        index_us=index_s / n * 1e6,
        lookup_us=lookup_s / n * 1e6,
        forget_us=forget_s / n * 1e6,
    )
