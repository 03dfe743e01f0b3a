"""The peers of ``riverflow bench`` on the real broker and Redis: each predicts every
event of its backlog exactly once, so their rows cannot measure an empty run."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
import redis
import yaml

from riverflow.spec import load_spec, parse_spec
from riverflow.streams.kafka_io import read_topic
from riverflow.streams.topics import Topics
from riverflow.tools.bench import measure_peer, stream
from riverflow.tools.stack import Endpoints

EVENTS = 1_500  # several polls of the bench's reader, so the drain can be timed
BENCH_SPEC = Path(__file__).parents[2] / "examples" / "fraud-bench.yaml"


@pytest.mark.parametrize("peer", ["bare", "textbook"])
def test_a_peer_predicts_every_event_of_its_backlog_once(
    peer: str, stack: Endpoints, tmp_path: Path
) -> None:
    spec = load_spec(BENCH_SPEC)
    events, _ = stream(EVENTS, seed=5)
    name = f"it-{peer}-{uuid.uuid4().hex[:8]}"

    figures = measure_peer(peer, spec, stack, events, tmp_path, stack.pids, name=name)

    predictions = [
        orjson.loads(m.value()) for m in read_topic(stack.kafka_bootstrap, Topics(name).predictions)
    ]
    assert Counter(p["event_id"] for p in predictions) == {e["event_id"]: 1 for e in events}
    assert all(0.0 <= p["score"] <= 1.0 for p in predictions)
    assert len({p["score"] for p in predictions}) > 1  # a trained tree, not a lone leaf
    assert figures["events"] == EVENTS and figures["drain_events_per_s"] > 0
    # the textbook agent's per-card state is gone with the run
    assert not list(redis.Redis.from_url(stack.redis_url).scan_iter(match=f"{name}:*"))


def test_a_peer_that_dies_fails_the_bench_at_once_with_its_log(
    stack: Endpoints, tmp_path: Path
) -> None:
    data = yaml.safe_load(BENCH_SPEC.read_text())
    data["models"]["inputs"] = ["category", "country", "channel"]  # nothing to sum
    data["models"]["candidates"] = data["models"]["candidates"][:1]
    events, _ = stream(100, seed=5)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="sums a numeric"):
        measure_peer("textbook", parse_spec(data), stack, events, tmp_path, stack.pids)
    assert time.monotonic() - started < 60  # not the 120 s wait for a first prediction
