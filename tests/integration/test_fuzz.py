"""No message can crash or stall a stage, on the real broker and Redis: 10,000
hostile messages through a scorer process; event times that used to hang the
server-side Lua; a Redis that goes away and comes back."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
import yaml

import riverflow.features.store.redis_store as redis_store_module
import riverflow.features.tiles as tiles_module
from riverflow.assembly import build_scorer, redis_backends
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, load_spec
from riverflow.stages.common import guarded
from riverflow.streams.contracts import DeadLetter, Message, Prediction
from riverflow.streams.kafka_io import ensure_topics, produce_all, producer
from riverflow.tools.hostile import HostileEvents
from riverflow.tools.stack import Endpoints, free_port, wait_for_redis
from tests.integration.conftest import StageFactory, collect

HOSTILE = 12_000  # of which ~9,400 refused, the rest valid despite a hostile touch
VALID = 2_000


@pytest.mark.parametrize("personal", [False, True], ids=["no-pii", "pii"])
def test_ten_thousand_hostile_messages_never_stop_the_scorer(
    stack: Endpoints, spec_file: Path, start_stage: StageFactory, personal: bool
) -> None:
    # with the fraud example's personal fields, every refused payload is also
    # scrubbed (parsed, tokenised, written again) or withheld: hostile bytes there too
    data = yaml.safe_load(spec_file.read_text())
    if not personal:
        data["events"]["pii"] = {}
    spec_file.write_text(yaml.safe_dump(data))
    spec = load_spec(spec_file)
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=3)
    sent = list(
        HostileEvents(spec.events, seed=13, optional=spec.optional_fields).stream(
            HOSTILE, VALID, oversized=3
        )
    )
    scorer = start_stage("scorer")
    # value -> the kind it must get (a class maps to one kind, whatever the bytes)
    kind_of = {
        None if h.value is None else hashlib.sha256(h.value).hexdigest(): h.kind
        for h in sent
        if h.kind is not None
    }
    bad = Counter(h.kind for h in sent if h.kind is not None)
    valid = Counter(h.event_id for h in sent if h.kind is None)
    assert sum(h.cls != "valid" for h in sent) == HOSTILE and len(valid) == sum(valid.values())

    produce_all(producer(stack.kafka_bootstrap), ((topics.events, h.key, h.value) for h in sent))  # type: ignore[misc]

    predictions = collect(stack.kafka_bootstrap, topics.predictions, len(valid), 90)
    counts = Counter(Prediction.decode(m.value()).event_id for m in predictions)
    assert counts == valid  # each valid event exactly once
    letters = [
        DeadLetter.decode(m.value())
        for m in collect(stack.kafka_bootstrap, topics.dlq, sum(bad.values()), 60)
    ]
    assert Counter(d.error_kind for d in letters) == bad
    if personal:  # the original bytes are not kept: a JSON object's scrubbed, others none
        for d in letters:
            kept = orjson.loads(base64.b64decode(d.payload_b64)) if d.payload_b64 else None
            for field in ("card_id", "merchant"):
                value = kept.get(field) if isinstance(kept, dict) else None
                assert value is None or re.fullmatch(r"[0-9a-f]{32}", value), (field, value)
    else:  # the original bytes, identified by their hash
        assert all(kind_of[d.payload_sha256] == d.error_kind for d in letters)  # type: ignore[index]
    assert "internal_error" not in bad
    assert scorer.proc.poll() is None, "the scorer exited"
    assert scorer.get("/healthz") == (200, "ok\n")


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, int, Path]]:
    """A redis-server of this test alone (stopped and started again by it)."""
    port = free_port()
    workdir = tmp_path / "redis"
    workdir.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server not installed"
        procs.append(
            subprocess.Popen(
                [
                    exe,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(workdir),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_for_redis(f"redis://127.0.0.1:{port}/0", 20)

    start()
    yield f"redis://127.0.0.1:{port}/0", port, workdir
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:  # busy in a script: SIGTERM waits for it
                p.kill()
                p.wait(10)


@pytest.mark.parametrize("cached", [0, 10_000])
def test_absurd_event_times_get_a_prompt_answer_never_a_hung_script(
    spec: PipelineSpec,
    private_redis: tuple[str, int, Path],
    cached: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = private_redis[0]
    client = redis.Redis.from_url(url, socket_timeout=20)
    settings = Settings(feature_cache_entities=cached)
    store, registry = redis_backends(spec, settings, client)
    scorer = build_scorer(spec, settings, store, registry)
    stage = guarded(scorer, spec.topics)
    gen = HostileEvents(spec.events, seed=5, optional=spec.optional_fields)
    t = spec.events.time
    sent = [gen.valid()]
    for cls in ("ts_1e20", "ts_1e300", "ts_max_float", "ts_negative", "ts_bigint"):
        sent += [gen.one(cls), gen.valid()]
    for f in gen.numbers:
        sent += [gen.one(f"{f}_1e300"), gen.one(f"{f}_giant_int")]
    batch = [Message(spec.topics.events, 0, i, h.key, h.value) for i, h in enumerate(sent)]
    out = stage.process(batch)
    dead = {DeadLetter.decode(o.value).offset: o for o in out if o.topic == spec.topics.dlq}
    assert sorted(dead) == [i for i, h in enumerate(sent) if h.kind is not None]
    assert sum(o.topic == spec.topics.predictions for o in out) == len(sent) - len(dead)

    # the store itself, were an absurd time to reach it: the scripts' window loops take
    # B steps whatever the bucket (k = k + 1 stalled at bucket 2**53: Redis BUSY forever)
    monkeypatch.setattr(redis_store_module, "check_time", lambda ts: ts)
    monkeypatch.setattr(tiles_module, "check_time", lambda ts: ts)
    event = {**orjson.loads(gen.valid().value or b""), t: 1e20}
    started = time.monotonic()
    try:
        snaps = store.update_and_read([scorer._request(event)])
        assert len(snaps) == 1
    except (OverflowError, ValueError):  # in the process: msgpack's int64 cannot hold it
        assert cached
    assert time.monotonic() - started < 15
    assert client.ping()  # not BUSY


def test_a_redis_outage_is_waited_out_not_blamed_on_messages(
    stack: Endpoints,
    spec: PipelineSpec,
    start_stage: StageFactory,
    private_redis: tuple[str, int, Path],
) -> None:
    url, port, workdir = private_redis
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=3)
    gen = HostileEvents(spec.events, seed=21, optional=spec.optional_fields)
    first, second = [gen.valid() for _ in range(50)], [gen.valid() for _ in range(50)]
    scorer = start_stage("scorer", redis_url=url, outage_limit_s=90)
    prod = producer(stack.kafka_bootstrap)
    produce_all(prod, ((topics.events, h.key, h.value or b"") for h in first))
    assert len(collect(stack.kafka_bootstrap, topics.predictions, 50, 60, settle_s=0)) == 50

    with contextlib.suppress(redis.ConnectionError):  # it closes as the server goes
        redis.Redis.from_url(url).shutdown(nosave=True)
    produce_all(prod, ((topics.events, h.key, h.value or b"") for h in second))
    deadline = time.monotonic() + 30
    while scorer.get("/healthz")[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    status, body = scorer.get("/healthz")
    assert status == 503 and body.startswith("degraded: Redis"), body
    time.sleep(3)
    assert scorer.proc.poll() is None

    exe = shutil.which("redis-server")
    assert exe
    restarted = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_redis(url, 20)
        predictions = collect(stack.kafka_bootstrap, topics.predictions, 100, 60)
        counts = Counter(Prediction.decode(m.value()).event_id for m in predictions)
        assert counts == Counter(h.event_id for h in first + second)
        assert collect(stack.kafka_bootstrap, topics.dlq, 0, 2, settle_s=1) == []
        deadline = time.monotonic() + 20
        while scorer.get("/healthz")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert scorer.get("/healthz") == (200, "ok\n")
        assert scorer.proc.poll() is None
        scorer.proc.terminate()  # before its Redis goes again
        assert scorer.proc.wait(30) == 0
    finally:
        restarted.terminate()
        restarted.wait(10)
