"""Personal data never leaves the scorer in clear: a seeded run of the whole pipeline
on the real broker and Redis, then every output topic, the whole Redis keyspace,
the stages' logs and every page they serve are searched for the raw card and
merchant ids, and none is found."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import orjson
import redis
import yaml

from riverflow.assembly import pseudonymizer
from riverflow.settings import Settings
from riverflow.spec import load_spec
from riverflow.streams.contracts import DeadLetter, Prediction
from riverflow.streams.kafka_io import produce_all, producer
from riverflow.tools.generator import FraudStreamConfig, with_labels
from riverflow.tools.stack import Endpoints

from .conftest import StageFactory, collect

# the generator's card and merchant ids, as whole words (a 32-hex token holds
# "c00042" inside it by chance, but never as a word of its own)
RAW = re.compile(rb"\b(c\d{5}|m\d{4})\b")


def raw_ids(blob: bytes) -> set[bytes]:
    return set(RAW.findall(blob))


def redis_dump(client: redis.Redis, prefix: str) -> bytes:
    """Every key under ``prefix`` and every value it holds, whatever its type."""
    out: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        out.append(key)
        kind = client.type(key)
        if kind == b"string":
            out.append(client.get(key) or b"")
        elif kind == b"hash":
            for k, v in client.hgetall(key).items():
                out += [k, v]
        elif kind == b"list":
            out += client.lrange(key, 0, -1)
        elif kind == b"set":
            out += list(client.smembers(key))
        elif kind == b"zset":
            out += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        else:
            raise AssertionError(f"{key!r}: a {kind!r} this test does not read")
    return b"\n".join(out)


def test_no_raw_personal_value_reaches_a_topic_redis_a_log_or_a_page(
    stack: Endpoints, spec_file: Path, start_stage: StageFactory, tmp_path: Path
) -> None:
    data = yaml.safe_load(spec_file.read_text())
    assert data["events"]["pii"] == {"card_id": "hash", "merchant": "hash"}  # the example's
    data["monitors"] = {"segment": "merchant"}  # merchant ids in metric labels and the page
    spec_file.write_text(yaml.safe_dump(data))
    spec = load_spec(spec_file)
    topics = spec.topics
    n = 3000
    events, labels = [], []
    for kind, rec in with_labels(n, FraudStreamConfig(seed=5, drift_at=(n // 2,))):
        (events if kind == "event" else labels).append(rec)
    seen = {e["card_id"].encode() for e in events} | {e["merchant"].encode() for e in events}
    assert len(seen) > 300 and all(RAW.fullmatch(v) for v in seen)
    bad = [  # refused at intake, each holding a raw card id: to the DLQ scrubbed
        orjson.dumps({**events[0], "amount": "lots", "event_id": "bad-type"}),
        orjson.dumps({k: v for k, v in events[1].items() if k != "ts"} | {"event_id": "bad-ts"}),
        b'{"card_id": "c09999", "merchant": "m9999", "amount": 1.0, "broken',
    ]
    scorer = start_stage("scorer", partitions=3)
    learner = start_stage("learner", partitions=3, snapshot_every_labels=500)
    monitor = start_stage("monitor", partitions=3)
    records = [(topics.events, e["card_id"].encode(), orjson.dumps(e)) for e in events]
    records += [(topics.events, b"c09999", raw) for raw in bad]
    produce_all(producer(stack.kafka_bootstrap), records)
    produce_all(
        producer(stack.kafka_bootstrap),
        [(topics.labels, rec["event_id"].encode(), orjson.dumps(rec)) for rec in labels],
    )
    predictions = collect(stack.kafka_bootstrap, topics.predictions, n, 180, 1.0)
    evaluations = collect(stack.kafka_bootstrap, topics.evaluations, n, 180, 1.0)
    assert len(predictions) == len(evaluations) == n  # it works on tokens: nothing lost
    letters = collect(stack.kafka_bootstrap, topics.dlq, len(bad), 60, 1.0)
    model_events = collect(stack.kafka_bootstrap, topics.model_events, 1, 60, 3.0)
    time.sleep(2)  # the monitor's page has taken in the evaluations
    pages = b""
    for stage in (scorer, learner, monitor):
        for path in ("/metrics", "/healthz"):
            pages += stage.get(path)[1].encode()
    for path in ("/", "/status.json"):
        code, body = monitor.get(path)
        assert code == 200
        pages += body.encode()
    assert b"merchant" in pages  # the segment is shown: by token

    # the tokens are the features' entities: the same card, the same token
    pii = pseudonymizer(spec, Settings())
    by_event = {e["event_id"]: e for e in events}
    for msg in predictions[:200]:
        p = Prediction.decode(msg.value())
        assert p.entity == pii.token(by_event[p.event_id]["card_id"])
        assert msg.key() == p.entity.encode()
        assert p.pii_key == "1"  # the key's id: a rotation shows in the predictions
    kinds = {(d.stage, d.error_kind) for d in (DeadLetter.decode(m.value()) for m in letters)}
    assert {
        ("scorer", "wrong_type"),
        ("scorer", "missing_field"),
        ("scorer", "invalid_json"),
    } <= kinds

    found: dict[str, set[bytes]] = {}
    outputs = {"predictions": predictions, "evaluations": evaluations, "dlq": letters,
               "model-events": model_events}  # fmt: skip
    for name, msgs in outputs.items():
        blob = b"\n".join((m.key() or b"") + b" " + (m.value() or b"") for m in msgs)
        # a dead letter keeps the payload base64: decoded, it must be clean too
        if name == "dlq":
            for m in msgs:
                d = DeadLetter.decode(m.value())
                blob += b"\n" + base64.b64decode(d.payload_b64 or "") + (d.error or "").encode()
                blob += b"\n" + base64.b64decode(d.key_b64 or "")
        found[name] = raw_ids(blob)
    found["redis"] = raw_ids(redis_dump(redis.Redis.from_url(stack.redis_url), f"rf:{spec.name}:"))
    found["logs"] = raw_ids(b"\n".join(p.read_bytes() for p in tmp_path.glob("*.log")))
    found["pages"] = raw_ids(pages)
    # (binary values, msgpack floats, hold runs like b"c33333" by chance: only the ids
    # of this run count)
    assert {where: ids & seen for where, ids in found.items() if ids & seen} == {}
    # and the search does find a raw id where one is: the events topic the user wrote
    raw_events = collect(stack.kafka_bootstrap, topics.events, n, 30, 0.5)
    assert raw_ids(b"\n".join(m.value() for m in raw_events[:50])) & seen


def test_forget_erases_an_entitys_windows_and_recent_snapshots_given_its_raw_id(
    stack: Endpoints, spec_file: Path, start_stage: StageFactory, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    spec = load_spec(spec_file)
    n = 600
    events = [rec for kind, rec in with_labels(n, FraudStreamConfig(seed=6, cards=20))
              if kind == "event"]  # fmt: skip
    start_stage("scorer", partitions=3)
    produce_all(producer(stack.kafka_bootstrap), [
        (spec.topics.events, e["card_id"].encode(), orjson.dumps(e)) for e in events
    ])  # fmt: skip
    assert len(collect(stack.kafka_bootstrap, spec.topics.predictions, n, 120, 1.0)) == n
    client = redis.Redis.from_url(stack.redis_url)
    pii = pseudonymizer(spec, Settings())
    card = events[0]["card_id"]
    mine = [e["event_id"] for e in events if e["card_id"] == card]
    others = [e["event_id"] for e in events if e["card_id"] != card]
    prefix = f"rf:{spec.name}:"
    ts = {e["event_id"]: e["ts"] for e in events}

    def kept(event_id: str) -> bool:  # its snapshot, in its minute's hash
        return bool(client.hexists(f"{prefix}snaps:{int(ts[event_id] // 60)}", event_id))

    assert client.exists(f"{prefix}ent:card_id:{pii.token(card)}")
    assert all(kept(i) for i in mine)
    env = {**os.environ, "RIVERFLOW_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
           "RIVERFLOW_REDIS_URL": stack.redis_url, "RIVERFLOW_SPEC": str(spec_file)}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "riverflow.cli", "forget", card], env=env,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stdout.split())
    assert f"{len(mine)} snapshots of its last {len(mine)} events deleted" in said
    assert not list(client.scan_iter(match=f"{prefix}ent:*{pii.token(card)}*"))
    assert not any(kept(i) for i in mine)
    # nobody else's
    assert all(kept(i) for i in others)
    assert client.exists(f"{prefix}ent:card_id:{pii.token(events[-1]['card_id'])}")
