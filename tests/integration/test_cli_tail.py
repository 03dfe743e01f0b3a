"""`riverflow tail --follow` on the real broker, as an operator runs it into a pipe:
what the topic holds, then what comes while it follows, from every partition, a
record that is not JSON shown as bytes, not fatal."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid

import orjson

from riverflow.streams.kafka_io import ensure_topics, produce_all, producer
from riverflow.tools.stack import Endpoints
from tests.helpers import within

HOSTILE = b"\xff\x00 not json"


def test_riverflow_tail_follow_prints_each_record_as_it_comes_into_a_pipe(
    stack: Endpoints,
) -> None:
    topic = f"tail-{uuid.uuid4().hex[:8]}"
    ensure_topics(stack.kafka_bootstrap, [topic], partitions=3)
    prod = producer(stack.kafka_bootstrap)
    produce_all(prod, [(topic, b"k%d" % i, orjson.dumps({"n": i})) for i in range(6)])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a plain pipe
    env |= {"RIVERFLOW_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
            "RIVERFLOW_REDIS_URL": stack.redis_url}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "riverflow.cli", "tail", topic, "--follow", "-n", "12"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        # what the topic held, printed while tail goes on following
        assert within(60, lambda: len(lines) >= 6), (lines, proc.poll())
        assert proc.poll() is None
        later = [(topic, b"k%d" % i, orjson.dumps({"n": i})) for i in range(6, 11)]
        produce_all(prod, [*later, (topic, b"k-bad", HOSTILE)])
        assert proc.wait(60) == 0, proc.stderr and proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(10)
    assert len(lines) == 12
    shown: dict[int, list[int]] = {}
    values = []
    for line in lines:
        where, text = line.rstrip("\n").split(" ", 1)
        partition, offset = (int(x) for x in where.split(":"))
        shown.setdefault(partition, []).append(offset)
        values.append(text)
    assert all(offsets == sorted(offsets) for offsets in shown.values())
    assert sorted(orjson.loads(v)["n"] for v in values if v != repr(HOSTILE)) == list(range(11))
    assert values.count(repr(HOSTILE)) == 1
