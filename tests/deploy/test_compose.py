"""docker-compose.yml agrees with the settings and the local stack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from riverflow.kafka_runtime import METRICS_PORTS
from riverflow.settings import Settings
from riverflow.spec import load_spec
from tests.conftest import REPO_ROOT
from tests.deploy.settings_env import settings_from_env, unknown_names
from tests.deploy.test_dockerfile import dockerfile


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    return data


def test_services_and_images() -> None:
    services = compose()["services"]
    assert set(services) >= {"kafka", "redis", "scorer", "learner"}
    kafka_version = Settings().kafka_version
    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version}"
    assert "--appendonly" in services["redis"]["command"]
    for stage in METRICS_PORTS:  # the image's entry point is `riverflow`
        assert services[stage]["build"] == "."
        assert services[stage]["command"] == ["run", stage]


def test_the_learners_index_is_on_a_volume_the_image_lets_it_write() -> None:
    data = compose()
    learner = data["services"]["learner"]
    where = Path(learner["environment"]["RIVERFLOW_SCORED_DIR"])
    [mount] = [v for v in learner["volumes"] if v.split(":")[0] in data["volumes"]]
    volume_dir = Path(mount.split(":")[1])
    assert volume_dir in where.parents  # restarts find the index again
    image = dockerfile().final
    assert image.owner_of(volume_dir) == image.user != "root"


def test_stage_environment_is_valid_settings_pointing_at_the_services() -> None:
    services = compose()["services"]
    kafka_env = services["kafka"]["environment"]
    internal = kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")[0]  # PLAINTEXT://kafka:19092
    for stage in ("scorer", "learner"):
        env = {k: str(v) for k, v in services[stage]["environment"].items()}
        assert all(k.startswith("RIVERFLOW_") for k in env)
        assert not unknown_names(set(env)), unknown_names(set(env))
        settings = settings_from_env(env)
        assert internal.endswith(settings.kafka_bootstrap or "")
        assert settings.redis_url == "redis://redis:6379/0"
        assert "redis" in services[stage]["depends_on"] and "kafka" in services[stage]["depends_on"]
        # the spec names an example shipped in the package: the image has no checkout
        assert not settings.spec.is_absolute()
        assert load_spec(settings.spec).name == "fraud"
    for stage, port in METRICS_PORTS.items():
        # the image's HEALTHCHECK asks /healthz on RIVERFLOW_METRICS_PORT (default: the scorer's)
        assert int(services[stage]["environment"]["RIVERFLOW_METRICS_PORT"]) == port
    ports = {p.split(":")[0] for p in services["kafka"]["ports"]}
    assert "9092" in ports and "localhost:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
