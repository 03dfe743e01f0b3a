"""The pipeline on a secured broker: TLS with a certificate from a throwaway CA, a
SCRAM-SHA-512 login per client and the KRaft StandardAuthorizer (nothing allowed
without an ACL). A wrong password or an untrusted certificate stops a stage at
start with one line naming the cause."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from riverflow.settings import Settings
from riverflow.spec import load_spec
from riverflow.streams.contracts import Prediction
from riverflow.tools.generator import FraudStreamConfig, with_labels
from riverflow.tools.stack import Endpoints, SecureKafka, make_secure_kafka, start_kafka
from tests.conftest import LOGS

from .conftest import collect, stage_processes

STAGE_USER, STAGE_PASSWORD = "riverflow", "stage-secret"


@dataclass
class SecuredBroker:
    address: str
    secure: SecureKafka


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredBroker]:
    where = tmp_path_factory.mktemp("secured-kafka")
    secure = make_secure_kafka(where / "tls", {"admin": "admin-secret",
                                               STAGE_USER: STAGE_PASSWORD})  # fmt: skip
    server = start_kafka(Settings(), where / "kafka", secure=secure)
    LOGS.append(server.log)
    try:
        # the stages' user may use the pipelines' topics, groups and transactions
        # (names starting "it-" and "riverflow-"), and nothing else
        admin = AdminClient({"bootstrap.servers": server.address, **secure.client()})
        allowed = [(ResourceType.TOPIC, "it-"), (ResourceType.GROUP, "riverflow-"),
                   (ResourceType.TRANSACTIONAL_ID, "riverflow-")]  # fmt: skip
        who, pattern = f"User:{STAGE_USER}", ResourcePatternType.PREFIXED
        acls = [
            AclBinding(kind, prefix, pattern, who, "*", AclOperation.ALL, AclPermissionType.ALLOW)
            for kind, prefix in allowed
        ]
        for future in admin.create_acls(acls).values():
            future.result()
        yield SecuredBroker(server.address, secure)
    finally:
        server.stop(10)
        LOGS.remove(server.log)


def stage_env(secure: SecureKafka, password: str = STAGE_PASSWORD, **more: str) -> dict[str, str]:
    return {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": STAGE_USER,
            "kafka_sasl_password": password, "kafka_ssl_ca_file": str(secure.ca_file),
            **more}  # fmt: skip


def test_the_pipeline_runs_on_a_broker_with_tls_logins_and_acls(
    secured: SecuredBroker, stack: Endpoints, spec_file: Path, tmp_path: Path
) -> None:
    spec = load_spec(spec_file)
    topics, n = spec.topics, 2000
    servers = Endpoints(secured.address, stack.redis_url)
    with stage_processes(servers, spec_file, tmp_path) as start:
        for stage in ("scorer", "learner", "monitor"):
            start(stage, partitions=3, **stage_env(secured.secure))
        prod = Producer({"bootstrap.servers": secured.address, **secured.secure.client()})
        for kind, rec in with_labels(n, FraudStreamConfig(seed=8)):
            topic, key = (
                (topics.events, rec["card_id"]) if kind == "event"
                else (topics.labels, rec["event_id"])
            )  # fmt: skip
            prod.produce(topic, orjson.dumps(rec), key.encode())
            prod.poll(0)
        assert prod.flush(30) == 0
        admin = secured.secure.client()
        predictions = collect(secured.address, topics.predictions, n, 180, 1.0, config=admin)
        evaluations = collect(secured.address, topics.evaluations, n, 180, 1.0, config=admin)
    assert len({Prediction.decode(m.value()).event_id for m in predictions}) == n
    assert len(evaluations) == n


@pytest.mark.parametrize("broken", ["password", "ca"])
def test_a_refused_login_or_an_untrusted_certificate_stops_a_stage_in_one_line(
    secured: SecuredBroker, stack: Endpoints, spec_file: Path, tmp_path: Path, broken: str
) -> None:
    if broken == "password":
        env = stage_env(secured.secure, password="not-the-password")
        cause = "SASL authentication error: Authentication failed"
    else:
        other = make_secure_kafka(tmp_path / "other-ca", {"x": "y"})
        env = stage_env(secured.secure, kafka_ssl_ca_file=str(other.ca_file))
        cause = "certificate verify failed"
    servers = Endpoints(secured.address, stack.redis_url)
    with stage_processes(servers, spec_file, tmp_path) as start:
        scorer = start("scorer", **env)
        try:
            code = scorer.proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail("the scorer kept retrying a refused connection")
    said = " ".join(next(tmp_path.glob("scorer-*.log")).read_text().split())
    assert code != 0
    assert f"error: Kafka at {secured.address} refused this client:" in said
    assert cause in said and "Traceback" not in said
    assert "not-the-password" not in said  # never the secret
