"""Several scorers in one consumer group, on the real broker and Redis.

Two scorer processes serve an events topic of 6 partitions while events flow at
200/s; a third joins mid-stream, then one leaves cleanly (SIGTERM) and one is
SIGKILLed, so the last serves every partition alone. A ``read_committed`` reader
then finds every event predicted (exactly once under ``exactly_once``; at least
once otherwise, every extra one a consistent replay), each card's features equal
to a brute-force recount of the events, and the merchant's (a non-key entity that
every scorer writes) those of one order of that merchant's events: counted once
each, no event lost or counted twice across the scorers. Each membership change
pauses the predictions of any partition less than 10 s (the functional bound of
issue 17, not a benchmark).

Run with ``-s`` to see the pauses.
"""

from __future__ import annotations

import itertools
import math
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from riverflow.spec import load_spec
from riverflow.streams.contracts import Prediction
from riverflow.streams.kafka_io import ensure_topics, producer, read_topic
from riverflow.streams.topics import Topics
from riverflow.tools.bench_scaling import scorer_drain
from riverflow.tools.generator import FraudStreamConfig, transactions
from riverflow.tools.stack import Endpoints
from tests.helpers import assert_features_match, brute_force_features
from tests.integration.chaos import (
    PredictionAudit,
    Seen,
    TopicTail,
    by_event,
    stop_cleanly,
    where_lost,
)
from tests.integration.conftest import StageFactory, StageProcess
from tests.integration.test_failover import wait_up

RATE = 200  # events/s
PARTITIONS = 6
PAUSE_S = 10.0  # the bound on a membership change's pause
STEADY_S = 4.0  # steady stream between changes
# the merchant's aggregates, joined onto each card event: every scorer writes them
MERCHANT_FEATURES = [
    {"name": "merchant_n_1h", "agg": "count", "window": "1h", "entity": "merchant"},
    {"name": "merchant_sum_1h", "agg": "sum", "field": "amount", "window": "1h",
     "entity": "merchant"},
]  # fmt: skip
# 0.01 s of event time per event: the whole stream (< 200 s of event time) lies in one
# 5-minute tile of the merchant's 1 h window and within the 10 min lateness, so each
# merchant event's window holds every event of that merchant counted before it
STREAM = FraudStreamConfig(seed=17, cards=500, mean_gap_s=0.01)


class EventStream:
    """Fraud events at ``RATE``/s from a thread until ``finish()``; remembers each
    event and its partition (from its delivery report)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.partition: dict[str, int] = {}
        self.errors: list[str] = []
        self._topic = topic
        self._producer = producer(bootstrap, **{"linger.ms": 1})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))
        else:
            self.partition[orjson.loads(msg.value())["event_id"]] = msg.partition()

    def _run(self) -> None:
        stream = transactions(10**9, STREAM)
        started, sent = time.monotonic(), 0
        while not self._stop.is_set():
            due = int((time.monotonic() - started) * RATE)
            for _ in range(due - sent):
                event, _ = next(stream)
                self.events.append(event)
                self._producer.produce(
                    self._topic, orjson.dumps(event), event["card_id"].encode(),
                    on_delivery=self._delivered,
                )  # fmt: skip
            sent = max(sent, due)
            self._producer.poll(0)
            time.sleep(0.005)
        if self._producer.flush(60):
            self.errors.append("events undelivered after 60 s")

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(90)
        assert not self._thread.is_alive() and not self.errors, self.errors[:3]


def consuming(*stages: StageProcess, timeout_s: float = 60.0) -> None:
    """Wait until each stage consumes (its count grows over a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        before = [s.consumed() for s in stages]
        time.sleep(1)
        after = [s.consumed() for s in stages]
        if all(a > b >= 0 for a, b in zip(after, before, strict=True)):
            return
        assert all(s.proc.poll() is None for s in stages), "a scorer exited"
        assert time.monotonic() < deadline, f"not every scorer consumes: {after}"


def pauses(
    outputs: list[Seen[Prediction]], partition: dict[str, int], changes: list[float], end: float
) -> list[tuple[float, int, int]]:
    """Per membership change (wall time): the longest gap between two consecutive
    predictions (Kafka CreateTime) of one input partition among the gaps that end
    after it and no later than the next change (or ``end``), that gap's partition,
    and how many partitions paused over 1 s."""
    times: dict[int, list[float]] = defaultdict(list)
    for s in outputs:
        times[partition[s.record.event_id]].append(s.at)
    out = []
    for i, start in enumerate(changes):
        stop = changes[i + 1] if i + 1 < len(changes) else end
        worst, paused = (0.0, -1), set()
        for p, ts in times.items():
            ts.sort()
            for a, b in itertools.pairwise(ts):
                if start < b <= stop:
                    worst = max(worst, (b - a, p))
                    if b - a > 1.0:
                        paused.add(p)
        out.append((*worst, len(paused)))
    return out


def merchant_failures(
    events: list[dict[str, Any]], first: dict[str, Prediction], bucket_s: float
) -> list[str]:
    """Each merchant's events, ordered by the count each was served (the order the
    scorers counted them in): the counts are 1..n, and each sum is the sum of the
    amounts of the events counted up to it. Anything lost, counted twice or read
    from another merchant's state breaks that."""
    by_merchant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_merchant[e["merchant"]].append(e)
    out = []
    for merchant, evs in by_merchant.items():
        assert len({int(e["ts"] // bucket_s) for e in evs}) == 1, "the stream spans two tiles"
        ranked = sorted(evs, key=lambda e: first[e["event_id"]].features["merchant_n_1h"])
        counts = [first[e["event_id"]].features["merchant_n_1h"] for e in ranked]
        if counts != [float(i) for i in range(1, len(evs) + 1)]:
            out.append(f"merchant {merchant}: counts {counts[:10]}... of {len(evs)} events")
            continue
        total = 0.0
        for e in ranked:
            total += e["amount"]
            got = first[e["event_id"]].features["merchant_sum_1h"]
            if not math.isclose(got, total, rel_tol=1e-9, abs_tol=1e-6):
                out.append(f"merchant {merchant}: sum {got} at {e['event_id']}, counted {total}")
                break
    return out


@pytest.mark.parametrize("guarantee", ["exactly_once", "at_least_once"])
def test_three_scorers_join_leave_and_die_and_every_event_is_predicted(
    stack: Endpoints, spec_file: Path, start_stage: StageFactory, guarantee: str
) -> None:
    data = yaml.safe_load(spec_file.read_text())
    data["features"] += MERCHANT_FEATURES
    spec_file.write_text(yaml.safe_dump(data))
    spec = load_spec(spec_file)
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=PARTITIONS)
    predictions = TopicTail(stack.kafka_bootstrap, topics.predictions, Prediction.decode)

    def scorer(name: str) -> StageProcess:
        return start_stage("scorer", partitions=PARTITIONS, instance_id=name,
                           processing_guarantee=guarantee)  # fmt: skip

    a, b = scorer("scorer-a"), scorer("scorer-b")
    stream = EventStream(stack.kafka_bootstrap, topics.events)
    changes: list[tuple[str, float]] = []
    try:
        consuming(a, b)
        time.sleep(STEADY_S)
        c = scorer("scorer-c")
        changes.append(("scorer-c joins", wait_up(c)))
        consuming(a, b, c)  # the group balanced over three
        time.sleep(STEADY_S)
        changes.append(("scorer-b leaves (SIGTERM)", time.time()))
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(30) == 0, "scorer-b did not stop cleanly"
        time.sleep(STEADY_S + 4)
        changes.append(("scorer-a is SIGKILLed", time.time()))
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        time.sleep(STEADY_S + 6)
    finally:
        stream.finish()
    events = stream.events
    ids = {e["event_id"] for e in events}
    predictions.wait(lambda seen: len({s.record.event_id for s in seen}) >= len(ids), 60)
    end = time.time()
    failures = stop_cleanly(c)
    seen = predictions.close(2.0)
    audit = PredictionAudit(dict.fromkeys(ids, 0.0), by_event(seen))

    gaps = pauses(seen, stream.partition, [t for _, t in changes], end)
    replayed = sum(s.record.replayed for s in seen)
    lines = [f"{guarantee}: {len(ids)} events at {RATE}/s over {PARTITIONS} partitions; "
             f"{len(seen)} predictions, {replayed} flagged replayed"]  # fmt: skip
    lines += [f"{what}: longest pause {gap:.1f} s (partition {p}); {n} partitions paused > 1 s"
              for (what, _), (gap, p, n) in zip(changes, gaps, strict=True)]  # fmt: skip
    report = "\n".join(lines)
    print(f"\n{report}")

    if audit.lost:
        failures.append(f"{len(audit.lost)} events never predicted, e.g. {audit.lost[:3]}")
        failures.append(where_lost(stack.kafka_bootstrap, topics, audit.lost,
                                   c.log.parent))  # fmt: skip
    if guarantee == "exactly_once" and audit.extras:
        failures.append(f"a read_committed reader sees {len(audit.extras)} extra predictions")
    failures += audit.bad_replays[:3]
    failures += [f"{what}: predictions of partition {p} paused {gap:.1f} s"
                 for (what, _), (gap, p, _n) in zip(changes, gaps, strict=True)
                 if gap >= PAUSE_S]  # fmt: skip
    failures += predictions.errors
    assert not failures, "\n".join(failures) + "\n\n" + report

    # features: the card's equal a recount of the events in order (a card's events are
    # in one partition, read in order by whichever scorer holds it) ...
    first = {e: seen[0].record for e, seen in audit.predictions.items()}
    card_features = [f for f in spec.features if f.entity is None]
    expected = brute_force_features(events, card_features, spec.events.key, spec.events.time)
    for event_id, values in expected.items():
        got = first[event_id].features
        assert_features_match({k: got[k] for k in values}, values)
    # ... and the merchant's, shared by the scorers, those of one order of its events
    merchant = next(f for f in spec.features if f.name == "merchant_n_1h")
    bad = merchant_failures(events, first, 3600 / merchant.buckets)
    assert not bad, "\n".join(bad[:5])


def test_the_scaling_bench_times_a_drain_that_every_scorer_shares(
    stack: Endpoints, tmp_path: Path
) -> None:
    # ``bench_scaling scorers``' figure means N scorers only if each held partitions
    # and worked through the timed drain (no join inside it)
    spec = load_spec(Path(__file__).parents[2] / "examples" / "fraud-bench.yaml")
    figures = scorer_drain(spec, stack, 2, 6_000, PARTITIONS, tmp_path, seed=5)
    assert figures["drain_events_per_s"] > 0
    # both scorers worked through it: an idle one spends a few ms polling in a drain
    # where each working one spends ~150 ms (25 us an event)
    cpu = figures["scorer_cpu_s_per_million"]
    assert len(cpu) == 2 and min(cpu) >= 0.25 * max(cpu), cpu
    name = next(f.stem for f in tmp_path.glob("scale2-*.yaml"))
    scored = [Prediction.decode(m.value()).event_id
              for m in read_topic(stack.kafka_bootstrap, Topics(name).predictions)]  # fmt: skip
    assert len(scored) == len(set(scored)) == 6_000
