"""What the learner's index follower holds fetched ahead, and how fast it catches up.

    RIVERFLOW_KAFKA_BOOTSTRAP=... python docs/bench/follower_prefetch.py [--rounds 3]

On a running broker (``riverflow stack up`` prints its address): writes 20,000 records
of 6 KB (a slate prediction's size; 120 MB) to a topic of 3 partitions, then, in a
fresh process per setting and round (the settings alternated):

- ``rss``: a ``TopicFollower`` assigned at the topic's start and not called for 15 s
  (a learner busy elsewhere), its process' RSS growth;
- ``catch-up``: a ``TopicFollower`` from the topic's start until ``caught_up``.

Settings: librdkafka's defaults (64 MB ahead, fetched again 1 s after the cap is met),
an 8 MB cap with that 1 s (the trailing reader's before), and
``kafka_io.SIDE_READER_PREFETCH`` (8 MB, 10 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

SETTINGS: dict[str, dict[str, Any]] = {
    "default (64 MB, 1 s)": {},
    "8 MB, 1 s": {"queued.max.messages.kbytes": 8192, "fetch.queue.backoff.ms": 1000},
    "SIDE_READER_PREFETCH (8 MB, 10 ms)": {"side": True},
}


class _Index:
    n = 0

    def positions(self, source: str) -> dict[int, int]:
        return {}

    def add(self, messages: Any) -> None:
        self.n += len(messages)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _probe(boot: str, topic: str, what: str, setting: dict[str, Any]) -> dict[str, Any]:
    from riverflow.streams import kafka_io

    config = dict(setting)
    if config.pop("side", False):
        config = {}  # the follower's own
    else:
        # replace the follower's own with the setting (librdkafka's default: absent)
        kafka_io.SIDE_READER_PREFETCH.clear()
    index = _Index()
    before = _rss_mb()
    follower = kafka_io.TopicFollower(boot, topic, index, since_s=1e9, max_per_call=10**9,
                                      config=config)  # fmt: skip
    if what == "rss":
        time.sleep(15)
        return {"rss_growth_mb": round(_rss_mb() - before, 1)}
    t = time.perf_counter()
    while not follower.caught_up():
        pass
    return {"records": index.n, "catch_up_s": round(time.perf_counter() - t, 3)}


def _make_topic(boot: str) -> str:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"prefetch-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": boot})
    admin.create_topics([NewTopic(topic, 3, 1)])[topic].result()
    producer = Producer({"bootstrap.servers": boot, "linger.ms": 20})
    value = os.urandom(3000).hex().encode()
    for i in range(20_000):
        producer.produce(topic, value, str(i).encode())
        if i % 1000 == 0:
            producer.poll(0)
    producer.flush()
    return topic


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--probe", nargs=3, help=argparse.SUPPRESS)  # topic, what, setting
    args = parser.parse_args()
    boot = os.environ["RIVERFLOW_KAFKA_BOOTSTRAP"]
    if args.probe:
        topic, what, name = args.probe
        print(json.dumps(_probe(boot, topic, what, SETTINGS[name])))
        return
    topic = _make_topic(boot)
    for r in range(args.rounds):
        for what in ("rss", "catch-up"):
            for name in SETTINGS:
                out = subprocess.run([sys.executable, __file__, "--probe", topic, what, name],
                                     check=True, capture_output=True, text=True).stdout  # fmt: skip
                print(f"round {r + 1}  {what:8}  {name:36}  {out.strip()}", flush=True)


if __name__ == "__main__":
    main()
