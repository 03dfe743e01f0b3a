"""A real Kafka broker and a real redis-server for the session, and stage processes.

Every server here is real: the session starts Kafka (KRaft, Maven jars) and
redis-server on free loopback ports, or uses RIVERFLOW_KAFKA_BOOTSTRAP /
RIVERFLOW_REDIS_URL when they point at running servers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from riverflow.settings import DEFAULT_SPEC, Settings
from riverflow.spec import PipelineSpec, load_spec
from riverflow.tools.stack import (
    Endpoints,
    RedisCluster,
    free_port,
    local_stack,
    start_redis_cluster,
)
from tests.conftest import LOGS
from tests.integration.chaos import PrivateStack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    with local_stack(Settings(), tmp_path_factory.mktemp("stack")) as ep:
        LOGS.extend(ep.logs)
        yield ep


@pytest.fixture
def redis_client(stack: Endpoints) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url)


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    """The fraud spec under a unique name: its own topics and Redis keys."""
    data = yaml.safe_load(DEFAULT_SPEC.read_text())
    data["name"] = f"it-{uuid.uuid4().hex[:10]}"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def spec(spec_file: Path) -> PipelineSpec:
    return load_spec(spec_file)


class MissingSample(AssertionError):
    """A stage's /metrics answered without the sample asked for."""


@dataclass
class StageProcess:
    """A stage we started, and where its /metrics and /healthz are, and its log."""

    proc: subprocess.Popen[bytes]
    metrics_port: int
    log: Path

    def stacks(self, wait_s: float = 1.0) -> str:
        """Every thread's stack, as the stage writes it to its log on SIGUSR1 (for a
        failure's report: where a stage that stopped making progress waits)."""
        if self.proc.poll() is not None:
            return f"(the stage exited: {self.proc.returncode})"
        start = self.log.stat().st_size
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(wait_s)
        with self.log.open("rb") as f:
            f.seek(start)
            lines = f.read().decode(errors="replace").splitlines()
        return "\n".join(line for line in lines if not line.startswith("%"))  # not librdkafka

    def get(self, path: str) -> tuple[int, str]:
        """HTTP GET on the stage's metrics server: (status, body)."""
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metric(self, sample_name: str, /, **labels: str) -> float:
        """The value of one sample, e.g. ``metric("riverflow_dead_letters_total", kind="x")``."""
        status, body = self.get("/metrics")
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                wanted = all(sample.labels.get(k) == v for k, v in labels.items())
                if sample.name == sample_name and wanted:
                    return float(sample.value)
        raise MissingSample(f"no sample {sample_name} {labels} (HTTP {status}: {body[:200]!r})")

    def consumed(self) -> float:
        """Messages the stage consumed so far (-1 while its metrics server is not up, or
        answers without the count: once, in CI with three workers, the port of a scorer
        still starting answered /metrics without it; what answered is not known)."""
        try:
            return self.metric("riverflow_consumed_messages_total")
        except (OSError, MissingSample):
            return -1.0


StageFactory = Callable[..., StageProcess]


@contextmanager
def stage_processes(
    servers: Endpoints | PrivateStack, spec_file: Path, logdir: Path
) -> Iterator[StageFactory]:
    """A factory of ``riverflow run <stage>`` processes on ``servers``; at the end, each
    one still running gets SIGTERM (SIGKILL if it does not stop within 30 s)."""
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    def start(stage: str, **settings: Any) -> StageProcess:
        port = free_port()
        env = {
            **os.environ,
            "RIVERFLOW_KAFKA_BOOTSTRAP": servers.kafka_bootstrap,
            "RIVERFLOW_REDIS_URL": servers.redis_url,
            "RIVERFLOW_SPEC": str(spec_file),
            "RIVERFLOW_METRICS_PORT": str(port),
            # the learner's index of scored events: the test's own (a restarted learner
            # of the test finds it again)
            "RIVERFLOW_SCORED_DIR": str(logdir / "scored"),
            **{f"RIVERFLOW_{k.upper()}": str(v) for k, v in settings.items()},
        }
        log = logdir / f"{stage}-{len(procs)}.log"
        LOGS.append(log)
        logs.append(log)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "riverflow.cli", "run", stage],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        procs.append(proc)
        return StageProcess(proc, port, log)

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in logs:
            LOGS.remove(log)


@pytest.fixture
def start_stage(stack: Endpoints, spec_file: Path, tmp_path: Path) -> Iterator[StageFactory]:
    """Start ``riverflow run <stage>`` as its own process, as a user would."""
    with stage_processes(stack, spec_file, tmp_path) as start:
        yield start


@pytest.fixture(scope="module")
def private_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateStack]:
    """A Kafka broker and a redis-server of the module's own, which its tests may stop
    and restart (``restart_kafka``, ``restart_redis``) without disturbing ``stack``.
    Each test starts with both running."""
    servers = PrivateStack(Settings(), tmp_path_factory.mktemp("private-stack"))
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def start_private_stage(
    private_stack: PrivateStack, spec_file: Path, tmp_path: Path
) -> Iterator[StageFactory]:
    """``start_stage`` on the private stack."""
    private_stack.start()  # a server a previous test left stopped
    LOGS.extend(private_stack.logs)
    with stage_processes(private_stack, spec_file, tmp_path) as start:
        yield start
    for log in private_stack.logs:
        LOGS.remove(log)


def collect(
    bootstrap: str,
    topic: str,
    expected: int,
    timeout_s: float = 120.0,
    settle_s: float = 2.0,
    config: dict[str, Any] | None = None,
) -> list[Any]:
    """Read ``topic`` from the start until ``expected`` messages arrived (or the timeout),
    then ``settle_s`` longer so that extra (duplicate) messages would be seen too.
    ``config``: more client settings (a secured broker's login)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "tests", "enable.auto.commit": False,
         "fetch.message.max.bytes": 4 * 1024 * 1024, **(config or {})}
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"topic {topic} never appeared")
        time.sleep(0.2)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    out: list[Any] = []
    settle_until: float | None = None
    try:
        while time.monotonic() < (settle_until or deadline):
            for msg in consumer.consume(1000, timeout=0.2):
                assert not msg.error(), msg.error()
                out.append(msg)
            if settle_until is None and len(out) >= expected:
                settle_until = time.monotonic() + settle_s
    finally:
        consumer.close()
    return out


@pytest.fixture(scope="session")
def shared_redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """One Redis Cluster for the session (``redis_cluster`` hands it to each test)."""
    cluster = start_redis_cluster(tmp_path_factory.mktemp("cluster"), node_timeout_ms=2000)
    try:
        yield cluster
    finally:
        cluster.stop()


def whole(cluster: RedisCluster, primaries: int = 3) -> bool:
    """Each of ``primaries`` primaries has its replicas attached (``ROLE``), as started."""
    heads = cluster.primaries()
    per = len(cluster.nodes) // primaries - 1
    return len(heads) == primaries and all(
        len(cluster.client(node).execute_command("ROLE")[2]) == per for node in heads
    )


@pytest.fixture
def redis_cluster(shared_redis_cluster: RedisCluster) -> Iterator[RedisCluster]:
    """A Redis Cluster: 3 primaries, 3 replicas, each a ``redis-server
    --cluster-enabled yes`` on loopback, failed over after 2 s. Shared by the session
    (a start is 6 servers and a slot assignment): each test gets it whole again (a
    node a test left stopped or SIGSTOPped is resumed or started again), every node's
    command statistics reset, and uses keys of its own (its spec's name)."""
    cluster = shared_redis_cluster
    for node in list(cluster.nodes):
        if node.alive():
            os.kill(node.pid, signal.SIGCONT)  # a no-op unless a test left it stopped
        else:
            cluster.restart(node)
    cluster.wait_ok(30)
    deadline = time.monotonic() + 30
    while not whole(cluster):
        assert time.monotonic() < deadline, "the shared Redis Cluster did not recover"
        time.sleep(0.1)
    for node in cluster.nodes:
        cluster.client(node).config_resetstat()
    logs = [node.log for node in cluster.nodes]
    LOGS.extend(logs)
    try:
        yield cluster
    finally:
        for log in logs:
            LOGS.remove(log)


@pytest.fixture
def start_cluster_stage(
    stack: Endpoints, redis_cluster: RedisCluster, spec_file: Path, tmp_path: Path
) -> Iterator[StageFactory]:
    """``start_stage`` on the session's Kafka and ``redis_cluster``."""
    servers = Endpoints(stack.kafka_bootstrap, redis_cluster.url)
    with stage_processes(servers, spec_file, tmp_path) as start:
        yield start
