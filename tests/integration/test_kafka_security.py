"""The pipeline on a secured broker: TLS with a certificate from a throwaway CA, a
SCRAM-SHA-512 login per client and the KRaft StandardAuthorizer (nothing allowed
without an ACL). A wrong password or an untrusted certificate stops a stage at
start with one line naming the cause."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from riverflow.kafka_runtime import ensure_pipeline_topics
from riverflow.security import STAGES, stage_acls
from riverflow.settings import Settings
from riverflow.spec import load_spec
from riverflow.streams.contracts import Prediction
from riverflow.streams.kafka_io import use_security
from riverflow.tools.generator import FraudStreamConfig, with_labels
from riverflow.tools.stack import Endpoints, SecureKafka, make_secure_kafka, start_kafka
from tests.conftest import LOGS

from .conftest import collect, stage_processes

USERS = {"admin": "admin-secret", "scorer": "scorer-secret", "learner": "learner-secret",
         "monitor": "monitor-secret"}  # fmt: skip


@dataclass
class SecuredBroker:
    address: str
    secure: SecureKafka


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredBroker]:
    where = tmp_path_factory.mktemp("secured-kafka")
    secure = make_secure_kafka(where / "tls", USERS)
    server = start_kafka(Settings(), where / "kafka", secure=secure)
    LOGS.append(server.log)
    try:
        yield SecuredBroker(server.address, secure)
    finally:
        server.stop(10)
        LOGS.remove(server.log)


def stage_env(secure: SecureKafka, user: str, password: str | None = None,
              **more: str) -> dict[str, str]:  # fmt: skip
    return {"kafka_security_protocol": "SASL_SSL", "kafka_sasl_username": user,
            "kafka_sasl_password": password or USERS[user],
            "kafka_ssl_ca_file": str(secure.ca_file), **more}  # fmt: skip


def test_each_stage_runs_under_its_own_principal_with_only_what_it_needs(
    secured: SecuredBroker, stack: Endpoints, spec_file: Path, tmp_path: Path
) -> None:
    spec = load_spec(spec_file)
    topics, n = spec.topics, 2000
    # the operator makes the topics, as admin
    ensure_pipeline_topics(secured.address, spec, Settings(), client=secured.secure.client())
    # each stage's principal gets what `riverflow acls` lists for it, applied as admin
    env = {
        **os.environ,
        "RIVERFLOW_SPEC": str(spec_file),
        "RIVERFLOW_REDIS_URL": stack.redis_url,
        "RIVERFLOW_KAFKA_BOOTSTRAP": secured.address,
        **{f"RIVERFLOW_{k.upper()}": v for k, v in stage_env(secured.secure, "admin").items()},
    }
    done = subprocess.run(
        [sys.executable, "-m", "riverflow.cli", "acls", "all", "--apply"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    expected = sum(len(stage_acls(spec, stage, f"User:{stage}")) for stage in STAGES)
    assert f"created {expected} ACLs for scorer, learner, monitor" in done.stdout
    servers = Endpoints(secured.address, stack.redis_url)
    with stage_processes(servers, spec_file, tmp_path) as start:
        for stage in STAGES:
            start(stage, partitions=3, **stage_env(secured.secure, stage))
        # the operator feeds it with `riverflow produce`, logged in as admin
        fed = subprocess.run([sys.executable, "-m", "riverflow.cli", "produce", "--events",
                              str(n), "--seed", "8"], env=env, capture_output=True, text=True,
                             timeout=120, check=False)  # fmt: skip
        assert fed.returncode == 0, fed.stderr
        config = secured.secure.client()
        predictions = collect(secured.address, topics.predictions, n, 180, 1.0, config=config)
        evaluations = collect(secured.address, topics.evaluations, n, 180, 1.0, config=config)
        model_events = collect(secured.address, topics.model_events, 1, 60, 1.0, config=config)
    assert len({Prediction.decode(m.value()).event_id for m in predictions}) == n
    assert len(evaluations) == n and model_events  # the learner published, the monitor read
    shown = subprocess.run([sys.executable, "-m", "riverflow.cli", "tail", topics.predictions,
                            "-n", "3"], env=env, capture_output=True, text=True, timeout=60,
                           check=False)  # fmt: skip
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 3, shown.stderr

    # and nothing more: the scorer's principal cannot write a model change or a label,
    # nor read what the learner reads
    as_scorer = Producer({"bootstrap.servers": secured.address,
                          **secured.secure.client("scorer")})  # fmt: skip
    refused: dict[str, str] = {}
    for topic in (topics.model_events, topics.evaluations, topics.labels):
        as_scorer.produce(topic, b"{}", on_delivery=lambda err, m: refused.update(
            {m.topic(): str(err)}))  # fmt: skip
    as_scorer.flush(30)
    assert set(refused) == {topics.model_events, topics.evaluations, topics.labels}
    assert all("TOPIC_AUTHORIZATION_FAILED" in why for why in refused.values()), refused
    with pytest.raises(AssertionError):  # the monitor's principal reads no labels
        collect(secured.address, topics.labels, 1, 5, 0.5, config=secured.secure.client("monitor"))


@pytest.mark.parametrize("broken", ["password", "ca"])
def test_a_refused_login_or_an_untrusted_certificate_stops_a_stage_in_one_line(
    secured: SecuredBroker, stack: Endpoints, spec_file: Path, tmp_path: Path, broken: str
) -> None:
    if broken == "password":
        env = stage_env(secured.secure, "scorer", password="not-the-password")
        cause = "SASL authentication error: Authentication failed"
    else:
        other = make_secure_kafka(tmp_path / "other-ca", {"x": "y"})
        env = stage_env(secured.secure, "scorer", kafka_ssl_ca_file=str(other.ca_file))
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


def test_the_faust_host_logs_in_with_the_same_settings(
    secured: SecuredBroker, stack: Endpoints, spec_file: Path, tmp_path: Path
) -> None:
    spec = load_spec(spec_file)
    ensure_pipeline_topics(secured.address, spec, Settings(), client=secured.secure.client())
    admin = AdminClient({"bootstrap.servers": secured.address, **secured.secure.client()})
    for future in admin.create_acls(stage_acls(spec, "scorer", "User:scorer")).values():
        future.result()
    servers = Endpoints(secured.address, stack.redis_url)
    events = [rec for kind, rec in with_labels(300, FraudStreamConfig(seed=3)) if kind == "event"]
    with stage_processes(servers, spec_file, tmp_path) as start:
        start("scorer", host="faust", **stage_env(secured.secure, "scorer"))
        prod = Producer({"bootstrap.servers": secured.address, **secured.secure.client()})
        for rec in events:
            prod.produce(spec.topics.events, orjson.dumps(rec), rec["card_id"].encode())
        assert prod.flush(30) == 0
        got = collect(secured.address, spec.topics.predictions, len(events), 120, 1.0,
                      config=secured.secure.client())  # fmt: skip
    assert len({Prediction.decode(m.value()).event_id for m in got}) == len(events)


def read_env(path: Path) -> dict[str, str]:
    import shlex

    return {k: v for k, _, v in (shlex.split(line)[1].partition("=")
                                 for line in path.read_text().splitlines() if line)}  # fmt: skip


def test_stack_up_secure_makes_an_identity_per_stage_with_only_what_it_needs(
    tmp_path: Path,
) -> None:
    import redis

    settings = Settings()
    cache = tmp_path / "cache"
    cache.mkdir()
    jars = f"kafka-{settings.kafka_version}"  # the broker's jars, fetched once
    (cache / jars).symlink_to(settings.cache_dir / jars)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RIVERFLOW_")}
    env["RIVERFLOW_CACHE_DIR"] = str(cache)

    def cli(*args: str, **more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "riverflow.cli", *args],
                              env={**env, **more}, capture_output=True, text=True, timeout=180,
                              check=False)  # fmt: skip

    up = cli("stack", "up", "--secure")
    try:
        assert up.returncode == 0, up.stderr
        envdir = cache / "stack" / "env"
        assert "ACLs and a Redis user per stage" in " ".join(up.stdout.split())
        files = {p.stem: p for p in envdir.glob("*.env")}
        assert set(files) == {"admin", "scorer", "learner", "monitor"}
        assert all(p.stat().st_mode & 0o077 == 0 for p in files.values())  # owner only
        admin, scorer = read_env(files["admin"]), read_env(files["scorer"])
        assert admin["RIVERFLOW_KAFKA_SASL_PASSWORD"] not in up.stdout + up.stderr
        fed = cli("produce", "--events", "200", **admin)  # the operator, as admin
        assert fed.returncode == 0, fed.stderr
        kafka = {"bootstrap.servers": scorer["RIVERFLOW_KAFKA_BOOTSTRAP"],
                 "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                 "sasl.username": "scorer",
                 "sasl.password": scorer["RIVERFLOW_KAFKA_SASL_PASSWORD"],
                 "ssl.ca.location": scorer["RIVERFLOW_KAFKA_SSL_CA_FILE"]}  # fmt: skip
        outcome: dict[str, str] = {}
        as_scorer = Producer(kafka)
        for topic in ("fraud.predictions", "fraud.model-events"):
            as_scorer.produce(topic, b"{}", on_delivery=lambda err, m: outcome.update(
                {m.topic(): str(err)}))  # fmt: skip
        as_scorer.flush(30)
        assert outcome["fraud.predictions"] == "None"  # its own output
        assert "TOPIC_AUTHORIZATION_FAILED" in outcome["fraud.model-events"]
        url = scorer["RIVERFLOW_REDIS_URL"]
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(url).ping()  # nobody without a password
        as_scorer_redis = redis.Redis.from_url(
            url, username="scorer", password=scorer["RIVERFLOW_REDIS_PASSWORD"]
        )
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_scorer_redis.set("rf:fraud:champion", b"{}")
        as_scorer_redis.hset("rf:fraud:snaps:1", "x", b"1")  # its own keys
    finally:
        down = cli("stack", "down")
        assert down.returncode == 0, down.stderr


@pytest.mark.parametrize("how", ["plain", "mtls"])
def test_a_plain_login_and_a_client_certificate_work_from_the_settings(
    secured: SecuredBroker, how: str
) -> None:
    from riverflow.assembly import kafka_security
    from riverflow.streams.kafka_io import KafkaAccessError, check_access

    secure = secured.secure
    cert, key = secure.client_certs["scorer"]
    host = secured.address.rsplit(":", 1)[0]
    if how == "plain":  # as managed clusters' API keys log in
        bootstrap = secured.address
        good = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="PLAIN",
                        kafka_sasl_username="scorer", kafka_sasl_password=USERS["scorer"],
                        kafka_ssl_ca_file=secure.ca_file)  # fmt: skip
        bad = good.model_copy(update={"kafka_sasl_password": SecretStr("wrong")})
        refused = "Authentication failed"
    else:  # a listener that requires a client certificate signed by its CA
        bootstrap = f"{host}:{secure.ssl_port}"
        good = Settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=secure.ca_file,
                        kafka_ssl_cert_file=cert, kafka_ssl_key_file=key)  # fmt: skip
        bad = Settings(kafka_security_protocol="SSL", kafka_ssl_ca_file=secure.ca_file)
        refused = "bad certificate"  # the broker's TLS alert: no client certificate
    try:
        use_security(kafka_security(good))
        check_access(bootstrap)  # the cluster answers
        use_security(kafka_security(bad))
        with pytest.raises(KafkaAccessError, match=refused):
            check_access(bootstrap, timeout_s=5)
    finally:
        use_security({})
