"""The pipeline on a real Redis Cluster (3 primaries, 3 replicas, started here without
Docker): scorer, learner and monitor run on it while events flow; the primary that
holds the pipeline's slot is SIGKILLed mid-stream, its replica takes over, and the
killed process is started again and rejoins as a replica. No event is lost, every
feature equals a brute-force recomputation, every label is learned, and the longest
gap in the prediction output (the writes' stall) is printed (docs/benchmarks.md,
"Redis Cluster failover").
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot

from riverflow.assembly import ConnectionFailed, redis_client, signing_key
from riverflow.errors import Unavailable
from riverflow.features.store import MemoryFeatureStore, RedisFeatureStore
from riverflow.features.store.base import Claim, FeatureRequest, FeatureSnapshot
from riverflow.features.store.redis_store import key_prefix
from riverflow.models.registry import RedisRegistry
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.streams.contracts import Evaluation, ServedPrediction
from riverflow.streams.kafka_io import ensure_topics, producer
from riverflow.tools.generator import FraudStreamConfig, with_labels
from riverflow.tools.stack import Endpoints, RedisCluster, ServerProcess, start_redis_cluster
from tests.helpers import assert_features_match, brute_force_features
from tests.integration.conftest import StageFactory, collect
from tests.integration.test_failover import PredictionWatch, wait_up
from tests.integration.test_model_lifecycle import check_a_replica_hears_of_moves
from tests.integration.test_redis_store import requests

RATE = 250  # events/s
N = RATE * 24


class PacedStream:
    """Sends the fraud stream's events and labels at ``RATE`` events per second from a
    thread (a label follows its event by the generator's delay)."""

    def __init__(self, bootstrap: str, spec: PipelineSpec, n: int) -> None:
        config = FraudStreamConfig(cards=400, mean_gap_s=20.0, seed=17)
        self.stream = list(with_labels(n, config))
        self.events = [rec for kind, rec in self.stream if kind == "event"]
        self._prod = producer(bootstrap, **{"linger.ms": 1})
        self._topics = spec.topics
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start, sent = time.monotonic(), 0
        for kind, rec in self.stream:
            if kind == "event":
                delay = start + sent / RATE - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sent += 1
                topic, key = self._topics.events, rec["card_id"]
            else:
                topic, key = self._topics.labels, rec["event_id"]
            self._prod.produce(topic, orjson.dumps(rec), key.encode())
            self._prod.poll(0)
        self._prod.flush(30)

    def join(self) -> None:
        self._thread.join()


def slot_owner(cluster: RedisCluster, key: str) -> ServerProcess:
    """The node (process) that is primary for ``key``'s slot now."""
    client = ClusterClient(host="127.0.0.1", port=cluster.primaries()[0].port)
    try:
        port = client.get_node_from_key(key).port
    finally:
        client.close()
    return next(n for n in cluster.nodes if n.port == port)


def role(node: ServerProcess) -> str:
    reply: Any = redis.Redis(port=node.port, socket_timeout=2).execute_command("ROLE")
    name = reply[0]
    return name.decode() if isinstance(name, bytes) else str(name)


@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_pipeline_survives_a_primary_killed_and_restarted(
    stack: Endpoints,
    spec: PipelineSpec,
    redis_cluster: RedisCluster,
    start_cluster_stage: StageFactory,
    wait_replicas: int,
) -> None:
    """With ``redis_wait_replicas`` 0 replication is asynchronous (a write the primary
    acknowledged and had not sent is lost on failover: none was in these runs); with
    1 every batch's writes are on the replica before its predictions go out."""
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=3)
    watch = PredictionWatch(stack.kafka_bootstrap, topics.predictions)
    scorer = start_cluster_stage("scorer", partitions=3, redis_wait_replicas=wait_replicas)
    # a version every 500 labels (no floor in time: the end counts them)
    learner = start_cluster_stage("learner", partitions=3, label_wait_s=3,
                                  snapshot_every_labels=500, snapshot_min_interval_s=0,
                                  redis_wait_replicas=wait_replicas)  # fmt: skip
    monitor = start_cluster_stage("monitor")
    for stage in (scorer, learner, monitor):
        wait_up(stage)
    stream = PacedStream(stack.kafka_bootstrap, spec, N)
    try:
        watch.wait_for_count(RATE * 4)  # serving steadily
        victim = slot_owner(redis_cluster, key_prefix(spec.name, True))
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        while victim.alive():
            time.sleep(0.01)
        # a replica takes over once the node timeout (2 s) passed and it won the election
        deadline = time.monotonic() + 30
        while slot_owner(redis_cluster, key_prefix(spec.name, True)).port == victim.port:
            assert time.monotonic() < deadline, "no replica took over"
            time.sleep(0.05)
        redis_cluster.wait_ok(30)
        taken_over_s = time.monotonic() - killed_at
        rejoined = redis_cluster.restart(victim)
        deadline = time.monotonic() + 30
        while role(rejoined) != "slave":
            assert time.monotonic() < deadline, "the restarted node never became a replica"
            time.sleep(0.2)
        stream.join()
        ids = {e["event_id"] for e in stream.events}
        watch.wait_for(ids, 90)
        time.sleep(1)  # duplicates, if any, would come now
        arrivals = list(watch.arrivals)
    finally:
        watch.close()

    # every event predicted; a second prediction of an event is a flagged replay
    counts = Counter(p.event_id for _, p in arrivals)
    assert set(counts) == ids
    first: dict[str, Any] = {}
    for _, p in arrivals:
        if p.event_id in first:
            assert p.replayed, f"a second prediction of {p.event_id} not flagged replayed"
        first.setdefault(p.event_id, p)
    # features equal a brute-force recomputation: no write of an entity was lost
    expected = brute_force_features(stream.events, spec.features, spec.events.key,
                                    spec.events.time)  # fmt: skip
    for event_id, p in first.items():
        assert_features_match(p.features, expected[event_id])

    # every label learned, once, joined with the prediction served for its event
    evals = [Evaluation.decode(m.value()) for m in
             collect(stack.kafka_bootstrap, topics.evaluations, N, timeout_s=90)]  # fmt: skip
    learned = Counter(e.event_id for e in evals)
    assert set(learned) == ids and set(learned.values()) == {1}
    for e in evals:
        assert e.served is not None and e.served.probability == first[e.event_id].probability

    # the registry on the cluster: the learner's versions, the pointer the scorer follows
    settings = Settings()
    client = redis_client(settings, redis_cluster.url)
    registry = RedisRegistry(client, spec.name, signing_key(settings))
    champion = registry.champion()
    assert champion is not None and champion.version >= N // 500 - 1
    # every key of the pipeline is in the namespace's slot, on the node serving it
    mine = [k.decode() for k in client.keys("*", target_nodes=ClusterClient.PRIMARIES)
            if spec.name in k.decode()]  # fmt: skip
    kinds = {k.removeprefix(key_prefix(spec.name, True)).split(":")[0] for k in mine}
    assert {"ent", "snaps", "learned", "champion", "model", "learner"} <= kinds
    assert {key_slot(k.encode()) for k in mine} == {key_slot(spec.name.encode())}
    # the stages waited for the replica when told to (and only then)
    stats = redis_cluster.client(slot_owner(redis_cluster, key_prefix(spec.name, True)))
    assert ("cmdstat_wait" in stats.info("commandstats")) == (wait_replicas > 0)
    assert scorer.get("/healthz")[0] == learner.get("/healthz")[0] == 200
    assert monitor.get("/healthz")[0] == 200

    # the stall: the longest gap in the prediction output after the kill
    times = sorted(t for t, _ in arrivals)
    gaps = [b - a for a, b in itertools.pairwise(times) if b > killed_at]
    replayed = sum(c > 1 for c in counts.values())
    print(f"wait_replicas={wait_replicas}: replica took over {taken_over_s:.1f} s after "
          f"the kill; longest gap in "
          f"predictions {max(gaps):.2f} s; {len(ids)} events, none lost, "
          f"{replayed} replayed")  # fmt: skip


def test_a_cluster_url_or_setting_makes_a_cluster_client_with_the_same_settings(
    tmp_path: Path,
) -> None:
    cluster = start_redis_cluster(tmp_path / "cluster", replicas=0, password="s3cret")
    try:
        node = cluster.nodes[0].port
        with_password = Settings(redis_password="s3cret")
        for settings, url in [
            (with_password, f"redis+cluster://127.0.0.1:{node}/0"),
            (with_password.model_copy(update={"redis_cluster": True}),
             f"redis://127.0.0.1:{node}/0"),
        ]:  # fmt: skip
            client = redis_client(settings, url)
            assert isinstance(client, ClusterClient)
            assert len(client.get_primaries()) == 3  # found from the one node named
            client.set("rf:{t}:x", "1")  # on whichever node serves the slot
            client.close()
        # the password goes to every node as to one Redis: without it, refused in
        # one line naming where
        with pytest.raises(ConnectionFailed, match=f"127.0.0.1:{node}"):
            redis_client(Settings(), f"redis+cluster://127.0.0.1:{node}/0")
    finally:
        cluster.stop()
    with pytest.raises(ConnectionFailed, match="unreachable"):
        redis_client(Settings(), "redis+cluster://127.0.0.1:1/0")


def test_with_wait_replicas_a_write_returns_once_the_replica_holds_it(
    redis_cluster: RedisCluster, fraud_spec: PipelineSpec
) -> None:
    """``redis_wait_replicas``: a batch's writes return only once the slot's replica
    has them; a replica that does not answer (SIGSTOP) makes the batch fail as an
    outage, and the retry finds its events seen. Without it, writes do not wait."""
    client = redis_client(Settings(), redis_cluster.url)
    ns = f"t{uuid.uuid4().hex[:8]}"
    plan = fraud_spec.feature_plan()
    waits = RedisFeatureStore(client, ns, plan, 3600, wait_replicas=1, wait_timeout_s=0.5)
    reqs = requests(300)
    served = ServedPrediction("m", 1, 0.5)

    def run(store: RedisFeatureStore, batch: list[FeatureRequest]) -> list[FeatureSnapshot]:
        """As the scorer runs a batch (``Scorer``): computed, then committed with its
        predictions; refused (an event seen before), run again on the server."""
        out = store.update_and_read(batch, commit=False)
        if not store.record_served([(s.event_id, served) for s in out]):
            out = store.update_and_read(batch)
            store.record_served([(s.event_id, served) for s in out])
        return out

    run(waits, reqs[:100])
    primary = slot_owner(redis_cluster, key_prefix(ns, True))
    [[_, port, _]] = redis_cluster.client(primary).execute_command("ROLE")[2]
    replica = next(n for n in redis_cluster.nodes if n.port == int(port))
    os.kill(replica.pid, signal.SIGSTOP)
    try:
        with pytest.raises(Unavailable, match="0 of 1 replicas"):
            run(waits, reqs[100:200])
        # without waiting, a write returns while the replica does not have it
        other = RedisFeatureStore(client, f"{ns}b", plan, 3600)
        assert len(run(other, reqs[:100])) == 100
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    again = run(waits, reqs[100:200])  # the retry: written before the WAIT failed
    assert all(s.replayed for s in again)
    memory = MemoryFeatureStore(plan)
    want = memory.update_and_read(reqs[:100]) + memory.update_and_read(reqs[100:200])
    assert [s.aggregates for s in again] == [s.aggregates for s in want[100:]]
    # the learner's claims wait too
    assert waits.claim_labels(["e1"], ["run:1"], [True], lambda _: False) == [Claim.CLAIMED]


def test_a_scorers_replica_hears_of_a_champion_move_on_a_cluster(
    redis_cluster: RedisCluster, spec: PipelineSpec
) -> None:
    client = redis_client(Settings(), redis_cluster.url)
    try:
        check_a_replica_hears_of_moves(client, spec)
    finally:
        client.close()
