"""Exactly once on the real broker: a scorer in ``exactly_once`` mode SIGKILLed three
times during a paced stream, restarted each time; a ``read_committed`` reader then
sees exactly one prediction per event id, none missing."""

from __future__ import annotations

import time
from collections import Counter

from riverflow.spec import PipelineSpec
from riverflow.streams.kafka_io import ensure_topics
from riverflow.tools.stack import Endpoints
from tests.integration.conftest import StageFactory
from tests.integration.test_failover import RATE, PacedEvents, PredictionWatch, kill, wait_up


def test_a_read_committed_reader_sees_one_prediction_per_event_through_three_kills(
    stack: Endpoints, spec: PipelineSpec, start_stage: StageFactory
) -> None:
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=3)
    watch = PredictionWatch(stack.kafka_bootstrap, topics.predictions)  # read_committed
    settings = {"partitions": 3, "instance_id": "scorer-a",
                "processing_guarantee": "exactly_once"}  # fmt: skip
    scorer = start_stage("scorer", **settings)
    events = PacedEvents(stack.kafka_bootstrap, topics.events, RATE * 35)
    try:
        for kills in range(3):
            wait_up(scorer)
            # it serves: predictions beyond those before this start arrive
            watch.wait_for_count(len(watch.arrivals) + RATE, timeout_s=60)
            time.sleep(0.5 + kills * 0.7)  # kill at different points of its batches
            kill(scorer)
            scorer = start_stage("scorer", **settings)
        events.join()
        watch.wait_for(events.ids, 90)
        time.sleep(2)  # a duplicate, if any, would come now
        counts = Counter(p.event_id for _, p in watch.arrivals)
    finally:
        watch.close()
    assert set(counts) == events.ids
    duplicated = {e: c for e, c in counts.items() if c > 1}
    assert not duplicated, f"{len(duplicated)} events predicted more than once"
    replayed = sum(p.replayed for _, p in watch.arrivals)
    print(f"{len(counts):,} events, one prediction each; {replayed} flagged replayed")
