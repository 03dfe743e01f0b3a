"""The model lifecycle on real servers: prequential equivalence with River, promotion
while events flow, signed snapshots, export/import, a learner killed and restarted."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import redis
import yaml
from river import evaluate, metrics

from riverflow.kafka_runtime import audit_window_s
from riverflow.models.champion import ChampionReplica
from riverflow.models.errors import SignatureError
from riverflow.models.factory import build_model
from riverflow.models.registry import ChampionPointer, MemoryRegistry, RedisRegistry
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, load_spec
from riverflow.stages.audit import WINDOW_S
from riverflow.streams.contracts import Evaluation, ModelEvent, Prediction, Record
from riverflow.streams.kafka_io import ensure_topics, produce_all, producer
from riverflow.tools.generator import FraudStreamConfig, transactions, with_labels
from riverflow.tools.stack import Endpoints
from tests.helpers import within
from tests.integration.conftest import StageFactory, collect
from tests.models.test_registry_retention import bounded_history

KEY = Settings().signing_key.get_secret_value().encode()


def rewrite(spec_file: Path, mutate: Callable[[dict[str, Any]], None]) -> PipelineSpec:
    data = yaml.safe_load(spec_file.read_text())
    mutate(data)
    spec_file.write_text(yaml.safe_dump(data))
    return load_spec(spec_file)


def seeded_linear(data: dict[str, Any]) -> None:
    """The linear candidate with randomly initialised weights: the seed must carry."""
    linear = data["models"]["candidates"][1]["estimator"]
    linear["params"]["initializer"] = {
        "class": "river.optim.initializers.Normal", "params": {"sigma": 0.1, "seed": 42}
    }  # fmt: skip


def cli(ep: Endpoints, spec_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RIVERFLOW_KAFKA_BOOTSTRAP": ep.kafka_bootstrap,
           "RIVERFLOW_REDIS_URL": ep.redis_url, "RIVERFLOW_SPEC": str(spec_file)}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "riverflow.cli", "models", *args],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip


def events_and_labels(n: int, seed: int = 7) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    config = FraudStreamConfig(cards=200, mean_gap_s=20.0, seed=seed)
    events, labels = [], []
    for kind, rec in with_labels(n, config):
        (events if kind == "event" else labels).append(rec)
    return events, labels


def send(ep: Endpoints, topic: str, records: list[dict[str, Any]], key: str) -> None:
    produce_all(producer(ep.kafka_bootstrap),
                ((topic, str(r[key]).encode(), orjson.dumps(r)) for r in records))  # fmt: skip


M = TypeVar("M", bound=Record)


def read(
    ep: Endpoints, topic: str, n: int, kind: type[M], timeout_s: float, settle_s: float
) -> list[M]:
    return [kind.decode(m.value())
            for m in collect(ep.kafka_bootstrap, topic, n, timeout_s, settle_s)]  # fmt: skip


def model_inputs(
    spec: PipelineSpec, events: list[dict[str, Any]], predictions: list[Prediction]
) -> dict[str, dict[str, Any]]:
    """Each event's model input, as the scorer saw it: its inputs and its features."""
    features = {p.event_id: p.features for p in predictions}
    return {e["event_id"]: {**{k: e[k] for k in spec.models.inputs}, **features[e["event_id"]]}
            for e in events}  # fmt: skip


def test_prequential_metrics_equal_rivers_progressive_val_score(
    stack: Endpoints, spec_file: Path, start_stage: StageFactory
) -> None:
    n = 1500
    spec = rewrite(spec_file, seeded_linear)
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=1)
    events, labels = events_and_labels(n)
    start_stage("scorer", partitions=1)
    start_stage("learner", partitions=1, snapshot_every_labels=n, snapshot_every_s=0,
                snapshot_min_interval_s=0)  # fmt: skip
    send(stack, topics.events, events, "card_id")
    predictions = read(stack, topics.predictions, n, Prediction, 90, 0.5)
    # zero delay: each label right after its event is scored, in the stream's order
    send(stack, topics.labels, labels, "event_id")
    evaluations = read(stack, topics.evaluations, n, Evaluation, 90, 0.5)
    assert [e.event_id for e in evaluations] == [lab["event_id"] for lab in labels]

    xs = model_inputs(spec, events, predictions)
    stream = [(xs[lab["event_id"]], lab["is_fraud"]) for lab in labels]
    registry = RedisRegistry(redis.Redis.from_url(stack.redis_url), spec.name, KEY)
    for candidate in spec.models.candidates:
        meta = registry.meta(candidate.name, 1)  # published after exactly n labels
        assert meta["labels_seen"] == n and meta["offsets"] == {topics.labels: {"0": n}}
        for metric in (metrics.ROCAUC(), metrics.LogLoss()):
            expected = evaluate.progressive_val_score(
                stream, build_model(candidate, clean=spec.clean), metric
            )
            got = meta["metrics"]["roc_auc" if isinstance(metric, metrics.ROCAUC) else "log_loss"]
            assert got == expected.get(), (candidate.name, type(metric).__name__)
        # ... and label by label, the candidate's prediction is River's
        model = build_model(candidate, clean=spec.clean)
        for (x, y), evaluation in zip(stream, evaluations, strict=True):
            assert evaluation.predictions[candidate.name].probability == model.predict_proba_one(
                x
            ).get(True, 0.0)
            model.learn_one(x, y)
    # both really learn, so that equality is not trivial
    for candidate in spec.models.candidates:
        seen = {e.predictions[candidate.name].probability for e in evaluations}
        assert len(seen) > 20, candidate.name


def offline_model(spec: PipelineSpec, name: str, n: int, seed: int) -> Any:
    """A candidate trained on another stream, as if it had been published earlier."""
    candidate = spec.models.candidate(name)
    assert candidate is not None
    model = build_model(candidate, clean=spec.clean)
    for event, fraud in transactions(n, FraudStreamConfig(seed=seed)):
        x = {k: event[k] for k in spec.models.inputs}
        model.learn_one({**x, "tx_count_1h": 1.0, "amount_sum_1h": event["amount"],
                         "amount_mean_24h": event["amount"]}, fraud)  # fmt: skip
    return model


def test_promote_through_the_cli_while_events_flow(
    stack: Endpoints, spec: PipelineSpec, spec_file: Path, start_stage: StageFactory
) -> None:
    rate, seconds = 5000, 20  # at most; the flow stops 2 s after the promotion
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=3)
    registry = RedisRegistry(redis.Redis.from_url(stack.redis_url), spec.name, KEY)
    tree, linear = (c.name for c in spec.models.candidates)
    registry.promote(
        ChampionPointer(tree, registry.publish(tree, offline_model(spec, tree, 2000, 1), {}))
    )
    linear_v = registry.publish(linear, offline_model(spec, linear, 2000, 2), {})
    # the scorer follows the move's announcement: its poll of the pointer (30 s
    # here, 0.1 s by default) is only the safety net
    start_stage("scorer", partitions=3, model_poll_s=30)
    events, _ = events_and_labels(rate * seconds, seed=11)
    stop = threading.Event()
    sent = 0

    def flow() -> None:  # 5,000 events/s, in 50 ms slices, until told to stop
        nonlocal sent
        prod = producer(stack.kafka_bootstrap)
        per_slice = rate // 20
        start = time.monotonic()
        for i in range(0, len(events), per_slice):
            if stop.is_set():
                break
            produce_all(prod, ((topics.events, e["card_id"].encode(), orjson.dumps(e))
                               for e in events[i : i + per_slice]))  # fmt: skip
            sent = i + per_slice
            time.sleep(max(0.0, start + (i + per_slice) / rate - time.monotonic()))

    flowing = threading.Thread(target=flow)
    flowing.start()
    time.sleep(3)
    # The CLI's own start-up takes a while on a loaded machine: the flow goes on
    # until 2 s after the promotion, so events are scored on both sides of it.
    done = cli(stack, spec_file, "promote", linear, "--reason", "test")
    time.sleep(2)
    stop.set()
    flowing.join()
    n = sent
    assert done.returncode == 0, done.stderr
    move = registry.history()[-1]
    assert (move.kind, move.to, move.reason) == (
        "promote",
        ChampionPointer(linear, linear_v),
        "test",
    )

    raw = collect(stack.kafka_bootstrap, topics.predictions, n, 120, 1.0)
    predictions = [Prediction.decode(m.value()) for m in raw]
    counts = Counter(p.event_id for p in predictions)
    assert len(counts) == n and set(counts.values()) == {1}  # none lost, none twice
    new = [p.scored_at - move.at for p in predictions if p.model == linear]
    old = [p.scored_at - move.at for p in predictions if p.model == tree]
    assert new and old and len(new) + len(old) == n
    assert {p.version for p in predictions if p.model == linear} == {linear_v}
    # the replica hears of the move before its next batch: no event is scored with
    # the old version later than the batch it was in
    print(
        f"\nswap: last prediction of the old version {max(old) * 1000:.0f} ms after the "
        f"pointer moved, first of the new one {min(new) * 1000:.0f} ms after"
    )
    assert max(old) < 0.25 and min(new) > 0
    by_partition: dict[int, list[str]] = {}
    for m, p in zip(raw, predictions, strict=True):  # in each partition the swap is a clean cut
        by_partition.setdefault(m.partition(), []).append(p.model)
    for models in by_partition.values():
        cut = models.index(linear) if linear in models else len(models)
        assert set(models[:cut]) <= {tree} and set(models[cut:]) <= {linear}
    events_log = read(stack, topics.model_events, 1, ModelEvent, 30, 0.5)
    assert [(e.kind, e.model, e.version) for e in events_log] == [("promote", linear, linear_v)]


def test_tampered_snapshot_is_refused_and_the_scorer_keeps_serving(
    stack: Endpoints, spec: PipelineSpec, spec_file: Path, start_stage: StageFactory,
    redis_client: redis.Redis,
) -> None:  # fmt: skip
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=1)
    registry = RedisRegistry(redis_client, spec.name, KEY)
    tree = spec.models.champion_spec.name
    good = registry.publish(tree, offline_model(spec, tree, 500, 1), {})
    registry.promote(ChampionPointer(tree, good))
    bad = registry.publish(tree, offline_model(spec, tree, 500, 2), {})
    blob_key = f"rf:{spec.name}:model:{tree}:v:{bad}"
    blob = bytearray(bytes(redis_client.get(blob_key) or b""))  # type: ignore[arg-type]
    blob[-5] ^= 0x01  # one bit of the pickle
    redis_client.set(blob_key, bytes(blob))

    with pytest.raises(SignatureError, match="does not verify"):
        registry.load(tree, bad)
    done = cli(stack, spec_file, "promote", tree, str(bad))
    assert done.returncode == 2 and "signature does not verify" in done.stderr
    assert registry.champion() == ChampionPointer(tree, good)

    # pointed at it behind the CLI's back: the scorer refuses it and keeps serving `good`
    start_stage("scorer", partitions=1)
    events, _ = events_and_labels(400)
    send(stack, topics.events, events[:200], "card_id")
    collect(stack.kafka_bootstrap, topics.predictions, 200, 60, 0.2)
    assert registry.move(ChampionPointer(tree, bad), "promote", ChampionPointer(tree, good))
    time.sleep(0.5)
    send(stack, topics.events, events[200:], "card_id")
    predictions = read(stack, topics.predictions, 400, Prediction, 60, 0.5)
    assert len(predictions) == 400 and {p.version for p in predictions} == {good}


def test_export_import_round_trip_gives_identical_predictions(
    stack: Endpoints, spec: PipelineSpec, spec_file: Path, tmp_path: Path,
    redis_client: redis.Redis,
) -> None:  # fmt: skip
    source = RedisRegistry(redis_client, spec.name, KEY)
    linear = spec.models.candidates[1].name
    version = source.publish(linear, offline_model(spec, linear, 1000, 3), {"labels_seen": 1000})
    exported = tmp_path / "linear.json"
    done = cli(stack, spec_file, "export", linear, "-o", str(exported))
    assert done.returncode == 0, done.stderr

    other, other_file = f"{spec.name}-b", tmp_path / "other.yaml"
    other_file.write_text(spec_file.read_text().replace(f"name: {spec.name}", f"name: {other}"))
    done = cli(stack, other_file, "import", str(exported))
    assert done.returncode == 0, done.stderr
    target = RedisRegistry(redis_client, other, KEY)
    assert target.versions(linear) == [1]
    assert target.meta(linear, 1)["labels_seen"] == 1000
    done = cli(stack, other_file, "promote", linear)
    assert done.returncode == 0, done.stderr
    assert target.champion() == ChampionPointer(linear, 1)

    mine, theirs = source.load(linear, version).model, target.load(linear, 1).model
    held_out = [e for e, _ in transactions(500, FraudStreamConfig(seed=4))]
    for e in held_out:
        x = {**{k: e[k] for k in spec.models.inputs}, "tx_count_1h": 2.0,
             "amount_sum_1h": 2 * e["amount"], "amount_mean_24h": e["amount"]}  # fmt: skip
        assert mine.predict_proba_one(x) == theirs.predict_proba_one(x)

    record = orjson.loads(exported.read_bytes())
    blob = bytearray(base64.b64decode(record["blob_b64"]))
    blob[-5] ^= 0x01
    record["blob_b64"] = base64.b64encode(bytes(blob)).decode()
    exported.write_bytes(orjson.dumps(record))
    done = cli(stack, other_file, "import", str(exported))
    assert done.returncode == 2 and "signature does not verify" in done.stderr
    assert target.versions(linear) == [1]  # nothing stored from a tampered file


def test_a_killed_learner_resumes_from_its_snapshot(
    stack: Endpoints, spec_file: Path, start_stage: StageFactory, redis_client: redis.Redis
) -> None:
    n = 3000
    spec = rewrite(spec_file, seeded_linear)
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=1)
    events, labels = events_and_labels(n, seed=5)
    start_stage("scorer", partitions=1)
    send(stack, topics.events, events, "card_id")
    predictions = read(stack, topics.predictions, n, Prediction, 90, 0.2)
    # the first learner snapshots at 700 and 1400 labels (no floor in time: they come
    # within a second) and is killed after learning 2000: labels 1401..2000 were
    # learned (and marked) but are in no snapshot
    settings = {"partitions": 1, "snapshot_every_labels": 700, "label_wait_s": 2,
                "batch_size": 50, "snapshot_min_interval_s": 0}  # fmt: skip
    first = start_stage("learner", **settings, snapshot_every_s=0)
    send(stack, topics.labels, labels[:2000], "event_id")
    collect(stack.kafka_bootstrap, topics.evaluations, 2000, 90, 0.0)
    registry = RedisRegistry(redis_client, spec.name, KEY)
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    killed_at = registry.checkpoint()
    assert killed_at is not None and killed_at.labels_seen == 1400

    start_stage("learner", **settings, snapshot_every_s=0.5)
    send(stack, topics.labels, labels[2000:], "event_id")
    deadline = time.monotonic() + 90
    while (saved := registry.checkpoint()).labels_seen < n:
        assert time.monotonic() < deadline, f"stuck at {saved.labels_seen} labels"
        time.sleep(0.1)
    assert saved.labels_seen == n and saved.positions == {0: n}  # every label, once
    evaluations = read(stack, topics.evaluations, n, Evaluation, 30, 0.5)
    # labels 1401..2000 were evaluated twice (by the killed run, then again): at least once
    assert {e.event_id for e in evaluations} == {lab["event_id"] for lab in labels}

    # the final models are the ones trained once, in order, on the same labels
    xs = model_inputs(spec, events, predictions)
    held_out = [xs[e["event_id"]] for e in events[::7]]
    for candidate in spec.models.candidates:
        once = build_model(candidate, clean=spec.clean)
        for lab in labels:
            once.learn_one(xs[lab["event_id"]], lab["is_fraud"])
        resumed = registry.load(candidate.name, saved.versions[candidate.name]).model
        assert [resumed.predict_proba_one(x) for x in held_out] == [
            once.predict_proba_one(x) for x in held_out
        ], candidate.name


def test_list_show_and_rollback_through_the_cli(
    stack: Endpoints, spec: PipelineSpec, spec_file: Path, redis_client: redis.Redis
) -> None:
    registry = RedisRegistry(redis_client, spec.name, KEY)
    tree = spec.models.champion_spec.name
    previous = None
    for labels in (100, 200, 300):  # as the learner does: publish, then advance
        # (a fresh model's ROC AUC is -0.0 in River: the first's, listed as 0.0000)
        # and the last one's own labels: those of a challenger started at label 250
        metrics = {"roc_auc": -0.0} if labels == 100 else {"labels": 50.0} if labels == 300 else {}
        meta = {"labels_seen": labels, "parent": 0, "metrics": metrics}
        version = registry.publish(tree, {"w": labels}, meta)
        to = ChampionPointer(tree, version)
        assert registry.move(to, "advance", previous) is not None
        previous = to

    listed = cli(stack, spec_file, "list")
    assert listed.returncode == 0, listed.stderr
    assert "champion: fraud-hoeffding v3" in listed.stdout
    assert "* fraud-hoeffding v3  labels 300 (50 its own)  roc_auc -" in listed.stdout
    # each version's signed size, as Redis holds it
    for v in (1, 2, 3):
        size = redis_client.strlen(f"{registry.prefix}model:{tree}:v:{v}")
        assert registry.meta(tree, v)["bytes"] == size > 0
        auc = "0.0000" if v == 1 else "-"
        assert size < 2**20  # a small one, in KB
        own = " (50 its own)" if v == 3 else ""
        assert (
            f"fraud-hoeffding v{v}  labels {v}00{own}  roc_auc {auc}  size {size / 2**10:.1f} KB"
            in (listed.stdout)
        )
    shown = cli(stack, spec_file, "show", tree, "2")
    assert shown.returncode == 0 and orjson.loads(shown.stdout)["labels_seen"] == 200

    for expected in (2, 1):
        done = cli(stack, spec_file, "rollback", "--reason", "degraded")
        assert done.returncode == 0, done.stderr
        assert registry.champion() == ChampionPointer(tree, expected)
    done = cli(stack, spec_file, "rollback")
    assert done.returncode == 2 and "nothing to roll back to" in done.stderr
    log = read(stack, spec.topics.model_events, 2, ModelEvent, 30, 0.5)
    assert [(e.kind, e.version, e.previous, e.reason) for e in log] == [
        ("rollback", 2, {"model": tree, "version": 3}, "degraded"),
        ("rollback", 1, {"model": tree, "version": 2}, "degraded"),
    ]


def test_a_move_whose_model_event_was_never_written_reaches_the_audit_log(
    stack: Endpoints, spec: PipelineSpec, redis_client: redis.Redis, start_stage: StageFactory
) -> None:
    """A learner killed between the registry and Kafka leaves a version and an advance
    in the registry that ``model-events`` never gets. The monitor writes them there, once,
    after the grace (1 s here); what was logged is not written again."""
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=1, replication=1)
    registry = RedisRegistry(redis_client, spec.name, KEY)
    tree = spec.models.champion_spec.name
    made: list[Any] = []
    for labels in (100, 200):  # as the learner does: publish, then advance
        parent = made[-1].to.version if made else 0
        version = registry.publish(tree, build_model(spec.models.champion_spec),
                                   {"labels_seen": labels, "parent": parent})  # fmt: skip
        previous = made[-1].to if made else None
        made.append(registry.move(ChampionPointer(tree, version), "advance", previous))
    logged, lost = made
    # the first version's events were written; the learner was killed before the second's
    published = ModelEvent(kind="published", model=tree, version=logged.to.version,
                           parent=0, labels_seen=100)  # fmt: skip
    produce_all(producer(stack.kafka_bootstrap),
                [(topics.model_events, tree.encode(), e.encode())
                 for e in (published, logged.as_event())])  # fmt: skip

    monitor = start_stage("monitor", audit_grace_s=1)
    # (3 s more: a move written twice would show; the monitor looks every second)
    log = read(stack, topics.model_events, 4, ModelEvent, 60, 3.0)
    v1, v2 = logged.to.version, lost.to.version
    assert [(e.kind, e.version, e.at, e.parent, e.labels_seen) for e in log] == [
        ("published", v1, None, 0, 100),
        ("advance", v1, logged.at, None, None),
        ("published", v2, None, v1, 200),
        ("advance", v2, lost.at, None, None),
    ]
    assert log[3].previous == {"model": tree, "version": v1}
    assert [bool(e.evidence and e.evidence["recovered"]) for e in log] == [0, 0, 1, 1]
    recovered = monitor.metric("riverflow_stage_status", stage="monitor", name="audit_recovered")
    assert recovered == 2.0  # on /metrics for the operator


def test_a_starting_monitor_looks_back_no_further_than_model_events_keeps(
    stack: Endpoints, spec: PipelineSpec
) -> None:
    """A move older than what the log keeps would be found missing and written again at
    every start: the look back is a day, or an hour less than the log keeps."""
    kept, whole = f"{spec.topics.model_events}-3h", spec.topics.model_events
    hours = {kept: {"retention.ms": str(3 * 3_600_000)}, whole: {"retention.ms": "-1"}}
    ensure_topics(stack.kafka_bootstrap, [kept, whole], 1, configs=hours)
    assert audit_window_s(stack.kafka_bootstrap, kept) == 2 * 3_600
    assert audit_window_s(stack.kafka_bootstrap, whole) == WINDOW_S


def test_the_pointer_history_in_redis_keeps_the_newest_moves(
    redis_client: redis.Redis, spec: PipelineSpec
) -> None:
    registry = RedisRegistry(redis_client, spec.name, KEY, history_keep=5)
    bounded_history(registry)
    assert redis_client.llen(f"rf:{spec.name}:champion:history") == 5


def test_a_replica_hears_of_a_move_at_once_and_polls_while_the_channel_is_lost(
    redis_client: redis.Redis, spec: PipelineSpec
) -> None:
    check_a_replica_hears_of_moves(redis_client, spec)


def check_a_replica_hears_of_moves(client: Any, spec: PipelineSpec) -> None:
    """A replica whose poll never comes due follows moves made by another process
    through the announcements alone, also after its channel's connection is killed."""
    registry = RedisRegistry(client, spec.name, KEY)
    tree = spec.models.candidates[0].name
    v1, v2, v3 = (registry.publish(tree, offline_model(spec, tree, 200, s), {}) for s in (1, 2, 3))
    registry.promote(ChampionPointer(tree, v1))
    now = [0.0]  # the replica's clock: its poll of the pointer never comes due by itself
    replica = ChampionReplica(
        RedisRegistry(client, spec.name, KEY),
        lambda: pytest.fail("a version is pointed at"), poll_s=60, clock=lambda: now[0],
    )  # fmt: skip
    assert replica.version == v1 and not replica.refresh()

    def heard(within_s: float = 5.0) -> bool:
        return within(within_s, replica.refresh, every_s=0.001)

    registry.promote(ChampionPointer(tree, v2), reason="another process moved it")
    assert heard() and replica.version == v2
    # the channel's connection dies: the replica notices, reads the pointer, listens again
    assert replica.watch is not None and replica.watch.listening
    if isinstance(client, redis.RedisCluster):  # the channel is on one of the nodes
        killed = sum(client.client_kill_filter(_type="pubsub", target_nodes="all").values())
    else:
        killed = client.client_kill_filter(_type="pubsub")
    assert killed == 1
    registry.promote(ChampionPointer(tree, v3))
    assert heard() and replica.version == v3
    assert replica.watch.listening
    registry.promote(ChampionPointer(tree, v1), kind="rollback")
    assert heard() and replica.version == v1


def test_the_bytes_the_stored_versions_take_follow_publishes_and_pruning(
    redis_client: redis.Redis, spec: PipelineSpec
) -> None:
    """``stored_bytes``: what the soak takes out of Redis' memory as bounded by the
    models' size, not the stream's length. The same figure on both registries."""
    stores = [RedisRegistry(redis_client, spec.name, KEY, keep_versions=2),
              MemoryRegistry(KEY, keep_versions=2)]  # fmt: skip
    for registry in stores:
        assert registry.stored_bytes() == 0
        for n in (1_000, 50_000, 200_000):  # a growing model
            registry.publish("m", bytearray(n), {"parent": None})
        registry.publish("n", bytearray(10), {"parent": None})
    blobs = [len(stores[1].blobs[("m", v)][0]) for v in (2, 3)] + [
        len(stores[1].blobs[("n", 1)][0])
    ]
    assert stores[0].stored_bytes() == stores[1].stored_bytes() == sum(blobs)
    assert 250_000 < sum(blobs) < 251_000  # the two newest of "m" and "n"'s one, signed
