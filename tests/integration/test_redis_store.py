"""The Redis store on a real redis-server: every aggregation equals the brute
force and the embedded store, replays change nothing, every key expires."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from riverflow.assembly import ConnectionFailed, pseudonymizer, redis_store
from riverflow.assembly import redis_client as connect
from riverflow.features.definitions import Aggregation, FeaturePlan
from riverflow.features.errors import FeatureStoreError
from riverflow.features.store import (
    FeatureRequest,
    FeatureSnapshot,
    FeatureStore,
    MemoryFeatureStore,
    RedisFeatureStore,
)
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.streams.contracts import ServedPrediction
from riverflow.tools.generator import FraudStreamConfig, transactions
from tests.feature_streams import (
    EXACT_FEATURES,
    EXACT_PLAN,
    FEATURES,
    LATENESS_S,
    PLAN,
    START_TS,
    event_streams,
    run_batches,
)
from tests.feature_streams import requests as stream_requests
from tests.helpers import (
    assert_aggregations_match,
    brute_force_features,
    check_labels_are_claimed_once,
    check_the_first_served_prediction_is_kept,
)


def requests(n: int) -> list[FeatureRequest]:
    config = FraudStreamConfig(cards=25, mean_gap_s=40.0)
    return [
        FeatureRequest(
            e["event_id"], e["ts"], {"card_id": e["card_id"]}, {"amount": e["amount"]},
            orjson.dumps({"amount": e["amount"], "channel": e["channel"]}),
        )
        for e, _ in transactions(n, config)
    ]  # fmt: skip


@pytest.fixture
def store(redis_client: redis.Redis, fraud_spec: PipelineSpec) -> RedisFeatureStore:
    ns = f"t{uuid.uuid4().hex[:8]}"
    return RedisFeatureStore(redis_client, ns, fraud_spec.feature_plan(), horizon_s=3600)


def test_same_values_bit_for_bit_as_the_embedded_store(
    store: RedisFeatureStore, fraud_spec: PipelineSpec
) -> None:
    memory = MemoryFeatureStore(fraud_spec.feature_plan())
    reqs = requests(4000)  # 25 cards over ~44 hours: windows fill and roll over
    for i in range(0, len(reqs), 400):
        got = store.update_and_read(reqs[i : i + 400])
        want = memory.update_and_read(reqs[i : i + 400])
        assert [(s.event_id, s.inputs, s.aggregates) for s in got] == [
            (s.event_id, s.inputs, s.aggregates) for s in want
        ]
    # no distinct feature: every batch was computed in the process, none refused
    assert store.batches == {"in_process": 10, "server": 0, "refused": 0}


def test_two_scorers_writing_the_same_entities_lose_nothing(
    redis_client: redis.Redis, fraud_spec: PipelineSpec
) -> None:
    """Two stores on one namespace, taking turns on the same cards: each one's
    in-process state goes stale, its commits are refused and the batches run on
    the server, and every value is still the one a single store computes."""
    plan = fraud_spec.feature_plan()
    ns = f"t{uuid.uuid4().hex[:8]}"
    scorers = [RedisFeatureStore(redis_client, ns, plan, horizon_s=3600) for _ in range(2)]
    memory = MemoryFeatureStore(plan)
    reqs = requests(3000)
    turns = [0, 0, 1, 0, 1, 1, 1, 0] * 10  # runs of turns: both paths, and the way back
    for n, i in enumerate(range(0, len(reqs), 50)):
        got = scorers[turns[n]].update_and_read(reqs[i : i + 50])
        want = memory.update_and_read(reqs[i : i + 50])
        # equal but for the rounding of float sums: a window's running sums and
        # the server's sum over its tiles add in different orders
        assert flat(got) == pytest.approx(flat(want), rel=1e-12, abs=1e-9)
    for scorer in scorers:
        assert scorer.batches["refused"] > 0 and scorer.batches["server"] > 0
        assert scorer.batches["in_process"] > 0
    reads = zip(store_reads(scorers[0], reqs), store_reads(memory, reqs), strict=True)
    for read, expected in reads:
        assert read == pytest.approx(expected, rel=1e-12, abs=1e-9)


def flat(snapshots: list[FeatureSnapshot]) -> list[float]:
    return [x for s in snapshots for vector in s.aggregates for x in vector]


def test_a_batch_never_committed_is_forgotten(
    store: RedisFeatureStore, fraud_spec: PipelineSpec
) -> None:
    """A scorer that fails between computing a batch and recording its
    predictions runs it again: nothing of the first attempt is counted."""
    reqs = requests(300)
    store.update_and_read(reqs[:200])
    first = store.update_and_read(reqs[200:], commit=False)
    # the caller failed here (no record_served) and now runs the batch again
    again = store.update_and_read(reqs[200:], commit=False)
    assert store.record_served([(s.event_id, ServedPrediction("m", 1, 0.5)) for s in again])
    assert [s.aggregates for s in again] == [s.aggregates for s in first]
    memory = MemoryFeatureStore(fraud_spec.feature_plan())
    want = memory.update_and_read(reqs[:200]) + memory.update_and_read(reqs[200:])
    got = store.update_and_read(reqs)  # all replays now: what was stored
    assert all(s.replayed for s in got)
    assert [s.aggregates for s in got] == [s.aggregates for s in want]
    assert all(s.served == ServedPrediction("m", 1, 0.5) for s in got[200:])


def store_reads(store: FeatureStore, reqs: list[FeatureRequest]) -> list[dict[str, float]]:
    return [
        store.read(entities) for entities in {str(r.entities): r.entities for r in reqs}.values()
    ]


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=event_streams(), batch=st.integers(1, 25))
def test_every_aggregation_equals_brute_force_and_the_embedded_store(
    redis_client: redis.Redis, events: list[dict[str, Any]], batch: int
) -> None:
    store = RedisFeatureStore(redis_client, f"t{uuid.uuid4().hex[:8]}", PLAN, horizon_s=3600)
    reqs = stream_requests(events)
    got = run_batches(store, reqs, batch)
    want = run_batches(MemoryFeatureStore(PLAN), reqs, batch)
    expected = brute_force_features(events, FEATURES, "card_id", "ts", LATENESS_S)
    hll = {f.name for f in FEATURES if f.agg is Aggregation.DISTINCT}
    assert store.batches["in_process"] == 0  # HyperLogLogs: every batch runs on the server
    for g, w in zip(got, want, strict=True):
        values = PLAN.values(g.aggregates)
        assert_aggregations_match(values, expected[g.event_id], FEATURES)
        # bit for bit the embedded store's values, but for the HyperLogLog estimates
        exact = {k: v for k, v in values.items() if k not in hll}
        assert exact == {k: v for k, v in PLAN.values(w.aggregates).items() if k not in hll}
        assert g.late == w.late


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    events=event_streams(),
    batch=st.integers(1, 25),
    turns=st.lists(st.integers(0, 1)),
    cached=st.sampled_from([1, 3, 15_000]),
)
def test_in_process_values_equal_brute_force_and_the_embedded_store(
    redis_client: redis.Redis, events: list[dict[str, Any]], batch: int, turns: list[int],
    cached: int,
) -> None:  # fmt: skip
    """Without distinct features the batches are computed in the scorer's process;
    a second scorer on the same namespace, taking ``turns``, sends batches to the
    server path. A scorer holding fewer entities than the stream touches
    (``cached``) reads the others back from Redis. Every value is exact and bit
    for bit the embedded store's."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    scorers = [
        RedisFeatureStore(redis_client, ns, EXACT_PLAN, horizon_s=3600, cached_entities=cached)
        for _ in range(2)
    ]
    reqs = stream_requests(events, EXACT_PLAN)
    got = []
    for n, i in enumerate(range(0, len(reqs), batch)):
        got += scorers[turns[n % len(turns)] if turns else 0].update_and_read(reqs[i : i + batch])
    want = run_batches(MemoryFeatureStore(EXACT_PLAN), reqs, batch)
    expected = brute_force_features(events, EXACT_FEATURES, "card_id", "ts", LATENESS_S)
    for g, w in zip(got, want, strict=True):
        values = EXACT_PLAN.values(g.aggregates)
        assert_aggregations_match(values, expected[g.event_id], EXACT_FEATURES)
        assert values == EXACT_PLAN.values(w.aggregates) and g.late == w.late
    assert sum(s.batches["in_process"] for s in scorers) > 0


def test_an_entity_that_grew_while_ready_is_held_as_it_is_now(redis_client: redis.Redis) -> None:
    """A small entity is held, once the ready set lets it go, as the state its last
    commit stored (``tiles.held_entity``). One that grew past that size while ready is
    held as it is now: its later events count when it is read back."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    store = RedisFeatureStore(redis_client, ns, EXACT_PLAN, horizon_s=3600, cached_entities=40)
    # c0 at m0 an hour apart: their pair's state is 46, 71, 96, then 121 and 146 bytes
    events = [
        {"event_id": f"e{k}", "card_id": "c0", "merchant": "m0", "amount": 3.0 + k,
         "ts": START_TS + 3700.0 * k}
        for k in range(5)
    ]  # fmt: skip
    # then twelve entities no batch touched: the ready set (10) lets c0, m0 and the pair go
    events += [
        {"event_id": f"n{k}", "card_id": f"c{k}", "merchant": f"m{k}", "amount": 1.0,
         "ts": START_TS + 3700.0 * 4 + 10.0}
        for k in range(1, 5)
    ]  # fmt: skip
    events.append({"event_id": "last", "card_id": "c0", "merchant": "m0", "amount": 2.0,
                   "ts": START_TS + 3700.0 * 5})  # fmt: skip
    reqs = stream_requests(events, EXACT_PLAN)
    got = []
    for batch in (reqs[:1], reqs[1:2], reqs[2:3], reqs[3:4], reqs[4:5], reqs[5:9]):
        got += store.update_and_read(batch)
    assert store.entity_key("card_id+merchant", "c0|m0") not in store._cache  # let go
    got += store.update_and_read(reqs[9:])  # ...and read back from what the process holds
    assert store.batches["in_process"] == 7
    want = run_batches(MemoryFeatureStore(EXACT_PLAN), reqs, 1)
    expected = brute_force_features(events, EXACT_FEATURES, "card_id", "ts", LATENESS_S)
    for g, w in zip(got, want, strict=True):
        values = EXACT_PLAN.values(g.aggregates)
        assert values == EXACT_PLAN.values(w.aggregates), g.event_id
        assert_aggregations_match(values, expected[g.event_id], EXACT_FEATURES)
    assert EXACT_PLAN.values(got[-1].aggregates)["pair_n_24h"] == 6


def dump(client: redis.Redis, prefix: str) -> dict[bytes, Any]:
    """Every entity's tiles and HyperLogLogs under ``prefix``, as stored."""
    return {key: client.dump(key) for key in client.scan_iter(f"{prefix}ent:*")}


@pytest.mark.parametrize("plan", [PLAN, EXACT_PLAN], ids=["on-server", "in-process"])
def test_replaying_a_batch_leaves_every_aggregate_unchanged(
    redis_client: redis.Redis, plan: FeaturePlan
) -> None:
    ns = f"t{uuid.uuid4().hex[:8]}"
    store = RedisFeatureStore(redis_client, ns, plan, horizon_s=3600)
    events: list[dict[str, Any]] = [
        {"event_id": f"e{i}", "card_id": f"c{i % 7}", "merchant": f"m{i % 5}",
         "amount": (i % 13) * 1.5, "ts": 1_767_225_600.0 + 37.0 * i - (i % 4) * 100}
        for i in range(600)
    ]  # fmt: skip
    reqs = stream_requests(events, plan)
    first = run_batches(store, reqs, 50)
    before = dump(redis_client, store.prefix)
    assert any(b":hll:" in k for k in before) == (plan is PLAN)
    restarted = RedisFeatureStore(redis_client, ns, plan, horizon_s=3600)
    # a restarted scorer replays in other batches than the first run's (each batch's
    # events span many minutes, so many snapshot hashes)
    for replayer, size in ((store, 50), (restarted, 17)):
        again = run_batches(replayer, reqs, size)
        assert all(s.replayed for s in again) and not any(s.replayed for s in first)
        assert [s.aggregates for s in again] == [s.aggregates for s in first]
        assert dump(redis_client, store.prefix) == before
    # and the next new events count on top of exactly what was there
    more = [
        {**e, "event_id": f"x{e['event_id']}", "ts": float(e["ts"]) + 40_000} for e in events[:100]
    ]
    memory = MemoryFeatureStore(plan)
    run_batches(memory, reqs, 50)
    assert [s.aggregates for s in run_batches(restarted, stream_requests(more, plan), 50)] == [
        s.aggregates for s in run_batches(memory, stream_requests(more, plan), 50)
    ]


def test_every_key_written_has_a_ttl(redis_client: redis.Redis) -> None:
    store = RedisFeatureStore(redis_client, f"t{uuid.uuid4().hex[:8]}", PLAN, horizon_s=3600)
    events = [
        {"event_id": f"e{i}", "card_id": f"c{i % 7}", "merchant": f"m{i % 5}",
         "amount": float(i), "ts": 1_767_225_600.0 + 60.0 * i}
        for i in range(300)
    ]  # fmt: skip
    reqs = stream_requests(events)
    store.update_and_read(reqs)
    ids = [r.event_id for r in reqs[:100]]
    store.claim_labels(ids, ids, [True] * len(ids), lambda token: False)
    keys = list(redis_client.scan_iter(f"{store.prefix}*"))
    kinds = {k.decode().split(":")[2] for k in keys}
    assert kinds == {"ent", "snaps", "learned"}
    assert any(b":hll:" in k for k in keys)
    no_ttl = [k for k in keys if redis_client.pttl(k) < 0]
    assert no_ttl == []


def test_the_read_path_agrees_with_the_embedded_store(redis_client: redis.Redis) -> None:
    store = RedisFeatureStore(redis_client, f"t{uuid.uuid4().hex[:8]}", PLAN, horizon_s=3600)
    memory = MemoryFeatureStore(PLAN)
    events = [
        {"event_id": f"e{i}", "card_id": f"c{i % 3}", "merchant": f"m{i % 4}",
         "amount": i * 0.5, "ts": 1_767_225_600.0 + 90.0 * i}
        for i in range(200)
    ]  # fmt: skip
    store.update_and_read(stream_requests(events))
    memory.update_and_read(stream_requests(events))
    who = {"card_id": "c1", "merchant": "m2", "card_id+merchant": "c1|m2"}
    for at in (None, events[-1]["ts"] - 1000.0, events[-1]["ts"] + 7200.0):
        got = store.read(who, at)
        assert got == memory.read(who, at)
        assert got["n_10m"] >= 0 and "pair_n_24h" in got
    assert store.read({"card_id": "nobody"}) == {}


def test_labels_are_claimed_once(store: RedisFeatureStore) -> None:
    check_labels_are_claimed_once(store)


def test_the_first_served_prediction_is_kept(
    store: RedisFeatureStore, redis_client: redis.Redis
) -> None:
    reqs = requests(3)
    check_the_first_served_prediction_is_kept(store, reqs)
    # recorded in the snapshot: it keeps the replay window's TTL (not the label horizon)
    ttl_ms = redis_client.pttl(store.snapshot_hash(reqs[0].ts))
    assert 0.9 * float(store.replay_ms) < ttl_ms <= float(store.replay_ms)
    assert float(store.replay_ms) < float(store.horizon_ms)


def test_unreachable_redis_is_a_clear_error(fraud_spec: PipelineSpec) -> None:
    from riverflow.tools.stack import free_port

    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    settings = Settings(redis_socket_timeout_s=0.5)
    with pytest.raises(ConnectionFailed) as info:
        connect(settings, url)
    assert "Redis unreachable at 127.0.0.1" in str(info.value)
    assert "hunter2" not in str(info.value)
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    store = RedisFeatureStore(client, "x", fraud_spec.feature_plan(), 60)
    with pytest.raises(FeatureStoreError, match="Redis unreachable"):
        store.update_and_read(requests(1))


def test_username_and_password_from_settings(redis_client: redis.Redis, stack: Any) -> None:
    user, secret = f"u{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    redis_client.acl_setuser(user, enabled=True, passwords=[f"+{secret}"], commands=["+ping"])
    try:
        settings = Settings(redis_username=user, redis_password=SecretStr(secret))
        assert connect(settings, stack.redis_url).ping()
        wrong = Settings(redis_username=user, redis_password=SecretStr("nope"), redis_retries=0)
        with pytest.raises(ConnectionFailed) as info:
            connect(wrong, stack.redis_url)
        assert "nope" not in str(info.value) and secret not in str(info.value)
    finally:
        redis_client.acl_deluser(user)


def test_features_get_prints_the_current_values(
    stack: Any, spec_file: Path, spec: PipelineSpec, redis_client: redis.Redis
) -> None:
    settings = Settings(redis_url=stack.redis_url)
    store = redis_store(spec, settings, redis_client)
    # as the scorer stores them: under the card's token (the example marks card_id)
    pii = pseudonymizer(spec, settings)
    raw = {r.event_id: r.entities["card_id"] for r in requests(500)}
    reqs = [replace(r, entities={"card_id": pii.token(r.entities["card_id"])})
            for r in requests(500)]  # fmt: skip
    store.update_and_read(reqs)
    card = raw[reqs[-1].event_id]
    env = {**os.environ, "RIVERFLOW_REDIS_URL": stack.redis_url, "RIVERFLOW_SPEC": str(spec_file)}
    done = subprocess.run(  # the user asks with the card id they know
        [sys.executable, "-m", "riverflow.cli", "features", "get", card],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown == store.read({"card_id": pii.token(card)})
    assert shown["tx_count_1h"] >= 1 and set(shown) == set(spec.feature_plan().names)


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A redis-server speaking only TLS, with a certificate from a throwaway CA."""
    from riverflow.tools.stack import free_port, wait_for_redis

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=riverflow-test-ca",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (tmp_path / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "san.cnf",
    )
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", "server.crt", "--tls-key-file", "server.key",
         "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no", "--save", "",
         "--dir", str(tmp_path)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ca = tmp_path / "ca.crt"
        url = f"redis://127.0.0.1:{port}/0"
        wait_for_redis(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}", 20)
        yield url, ca
    finally:
        server.terminate()
        server.wait(10)


def test_tls_from_settings(tls_redis: tuple[str, Path], fraud_spec: PipelineSpec) -> None:
    url, ca = tls_redis
    client = connect(Settings(redis_tls=True, redis_tls_ca_file=ca), url)
    store = RedisFeatureStore(client, "tls", fraud_spec.feature_plan(), 60)
    assert len(store.update_and_read(requests(5))) == 5
    with pytest.raises(ConnectionFailed):  # the server's certificate is not trusted
        connect(Settings(redis_tls=True, redis_retries=0), url)
    with pytest.raises(ConnectionFailed):  # it speaks only TLS
        connect(Settings(redis_retries=0, redis_socket_timeout_s=2), url)


def test_the_benchmark_runs_on_real_redis(
    redis_client: redis.Redis, fraud_spec: PipelineSpec
) -> None:
    from riverflow.tools.bench_features import run_bench

    result = run_bench(redis_client, fraud_spec, events=600, batch_size=100)
    assert result.batches == 5 and result.features == 6
    assert result.events_per_s > 0 and 0 < result.p50_ms <= result.p99_ms


def test_a_restarted_scorer_replays_a_batch_from_what_it_served(
    redis_client: redis.Redis, fraud_spec: PipelineSpec, settings: Settings
) -> None:
    """The scorer's one-round-trip path on real Redis: a scorer that restarts and
    is handed its last batch again has its commit refused (every event has a
    snapshot), runs the batch again on what Redis holds and emits, for every
    event, the prediction it served the first time; new events after it count
    on top of the first run's aggregates."""
    from riverflow.assembly import build_scorer, memory_backends
    from riverflow.streams.contracts import Message

    ns = f"t{uuid.uuid4().hex[:8]}"
    events = [e for e, _ in transactions(300, FraudStreamConfig(cards=20, mean_gap_s=30.0))]
    messages = [
        Message(fraud_spec.topics.events, 0, i, e["card_id"].encode(), orjson.dumps(e))
        for i, e in enumerate(events)
    ]

    def scorer() -> tuple[Any, RedisFeatureStore]:
        store = RedisFeatureStore(redis_client, ns, fraud_spec.feature_plan(), 3600)
        _, registry = memory_backends(fraud_spec, settings)
        return build_scorer(fraud_spec, settings, store, registry), store

    def predictions(outputs: list[Any]) -> list[dict[str, Any]]:
        out = [orjson.loads(o.value) for o in outputs]
        return [{k: v for k, v in p.items() if k != "scored_at"} for p in out]

    first, first_store = scorer()
    served = predictions(first.process(messages[:200]))
    assert first_store.batches == {"in_process": 1, "server": 0, "refused": 0}
    again, again_store = scorer()
    replayed = predictions(again.process(messages[:200]))
    assert again_store.batches == {"in_process": 0, "server": 1, "refused": 1}
    assert all(p.pop("replayed") for p in replayed)
    assert not any(p.pop("replayed") for p in served)
    assert replayed == served
    rest = predictions(again.process(messages[200:]))
    memory, registry = memory_backends(fraud_spec, settings)
    alone = build_scorer(fraud_spec, settings, memory, registry)
    expected = predictions(alone.process(messages[:200]))
    expected = [{k: v for k, v in p.items() if k != "replayed"} for p in expected]
    expected_rest = predictions(alone.process(messages[200:]))
    assert served == expected
    # the replay ran on the server, which adds a window's tiles up where the
    # process keeps running sums: sums may differ in the last bits
    for got, want in zip(rest, expected_rest, strict=True):
        assert got.pop("features") == pytest.approx(want.pop("features"), rel=1e-12)
        assert got == want


def test_a_spec_that_would_misread_the_stored_entity_state_is_refused(
    redis_client: redis.Redis, spec: PipelineSpec, spec_file: Path, stack: Any,
    start_stage: Any, tmp_path: Path,
) -> None:  # fmt: skip
    from riverflow.features.store.redis_store import FeatureLayoutError
    from riverflow.spec import parse_spec

    data = spec.model_dump(mode="json", by_alias=True)

    def with_features(*extra: dict[str, Any]) -> PipelineSpec:
        return parse_spec({**data, "features": [*data["features"], *extra]})

    settings = Settings(redis_url=stack.redis_url)
    first = redis_store(spec, settings, redis_client)
    first.check_layout()
    first.update_and_read(requests(200))
    # a new window after the existing ones: its tiles come after, nothing moves
    appended = with_features({"name": "tx_count_5m", "agg": "count", "window": "5m"})
    redis_store(appended, settings, redis_client).check_layout()
    redis_store(spec, settings, redis_client).check_layout()  # a scorer not yet upgraded
    # a statistic the 1h group did not keep: every later value of its tiles moves
    reshaped = with_features({"name": "amount_max_1h", "agg": "max", "field": "amount",
                              "window": "1h"})  # fmt: skip
    with pytest.raises(FeatureLayoutError, match=r"tile group 1: stored \['card_id:3600s:12'"):
        redis_store(reshaped, settings, redis_client).check_layout()
    # the scorer stops at start, saying why and what to do, without a traceback
    spec_file.write_text(yaml.safe_dump(reshaped.model_dump(mode="json", by_alias=True)))
    scorer = start_stage("scorer")
    assert scorer.proc.wait(120) != 0
    said = " ".join(next(tmp_path.glob("scorer-*.log")).read_text().split())
    assert "lay out entity state differently" in said and "riverflow features reset" in said
    assert "Traceback" not in said
    env = {**os.environ, "RIVERFLOW_REDIS_URL": stack.redis_url, "RIVERFLOW_SPEC": str(spec_file)}
    cli = [sys.executable, "-m", "riverflow.cli", "features", "reset"]
    refused = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert refused.returncode != 0 and "--yes" in refused.stderr
    done = subprocess.run([*cli, "--yes"], capture_output=True, text=True, env=env, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not list(redis_client.scan_iter(match=f"rf:{spec.name}:ent:*"))
    redis_store(reshaped, settings, redis_client).check_layout()  # a fresh start: taken


def test_the_scorer_warns_when_redis_frees_expired_snapshot_hashes_on_its_main_thread(
    store: RedisFeatureStore, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # the stack runs Redis as the docs ask: expired keys freed in the background
    assert redis_client.config_get("lazyfree-lazy-expire") == {"lazyfree-lazy-expire": "yes"}
    assert store.check_server() and "lazyfree" not in caplog.text
    redis_client.config_set("lazyfree-lazy-expire", "no")  # Redis' own default
    try:
        assert not store.check_server()
        assert "lazyfree-lazy-expire yes" in caplog.text
    finally:
        redis_client.config_set("lazyfree-lazy-expire", "yes")


def test_the_scorer_warns_when_redis_rewrites_its_append_only_file_every_64_mb(
    store: RedisFeatureStore, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    assert redis_client.config_get("appendonly") == {"appendonly": "yes"}
    assert store.check_server() and "auto-aof-rewrite" not in caplog.text
    before = redis_client.config_get("auto-aof-rewrite-min-size")["auto-aof-rewrite-min-size"]
    redis_client.config_set("auto-aof-rewrite-min-size", "64mb")  # Redis' own default
    try:
        assert not store.check_server()
        assert "auto-aof-rewrite-min-size 64 MB" in caplog.text
        assert "auto-aof-rewrite-min-size 1gb" in caplog.text
    finally:
        redis_client.config_set("auto-aof-rewrite-min-size", before)


def test_a_redis_user_refused_config_is_told_which_settings_to_check(
    redis_client: redis.Redis, stack: Any, fraud_spec: PipelineSpec,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    user, password = f"noconfig-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    redis_client.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all",
                                 "-config")  # fmt: skip
    try:
        limited = redis.Redis.from_url(stack.redis_url, username=user, password=password)
        store = RedisFeatureStore(
            limited, f"t{uuid.uuid4().hex[:8]}", fraud_spec.feature_plan(), horizon_s=3600
        )
        with caplog.at_level("INFO"):
            assert store.check_server()
        assert "Redis' settings cannot be read" in caplog.text
        assert "lazyfree-lazy-expire yes" in caplog.text and "1gb" in caplog.text
        assert password not in caplog.text
    finally:
        redis_client.acl_deluser(user)
