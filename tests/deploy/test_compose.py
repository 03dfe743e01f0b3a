"""docker-compose.yml agrees with the settings and the local stack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from riverflow.settings import Settings
from riverflow.spec import load_spec
from tests.conftest import REPO_ROOT


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    return data


def test_services_and_images() -> None:
    services = compose()["services"]
    assert set(services) >= {"kafka", "redis", "scorer", "learner"}
    kafka_version = Settings().kafka_version
    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version}"
    assert "--appendonly" in services["redis"]["command"]
    assert services["scorer"]["command"] == ["riverflow", "run", "scorer"]
    assert services["learner"]["command"] == ["riverflow", "run", "learner"]
    assert (REPO_ROOT / "Dockerfile").exists()


def test_the_learners_index_is_on_a_volume_the_image_lets_it_write() -> None:
    data = compose()
    learner = data["services"]["learner"]
    where = Path(learner["environment"]["RIVERFLOW_SCORED_DIR"])
    [mount] = [v for v in learner["volumes"] if v.split(":")[0] in data["volumes"]]
    volume_dir = Path(mount.split(":")[1])
    assert volume_dir in where.parents  # restarts find the index again
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    assert f"chown nobody {volume_dir}" in dockerfile and "USER nobody" in dockerfile


def test_stage_environment_is_valid_settings_pointing_at_the_services() -> None:
    services = compose()["services"]
    kafka_env = services["kafka"]["environment"]
    internal = kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")[0]  # PLAINTEXT://kafka:19092
    for stage in ("scorer", "learner"):
        env = {k: str(v) for k, v in services[stage]["environment"].items()}
        assert all(k.startswith("RIVERFLOW_") for k in env)
        fields = {f"RIVERFLOW_{name.upper()}" for name in Settings.model_fields}
        assert set(env) <= fields, set(env) - fields
        settings = Settings.model_validate({k.removeprefix("RIVERFLOW_").lower(): v
                                            for k, v in env.items()})  # fmt: skip
        assert internal.endswith(settings.kafka_bootstrap or "")
        assert settings.redis_url == "redis://redis:6379/0"
        assert "redis" in services[stage]["depends_on"] and "kafka" in services[stage]["depends_on"]
        # the spec names an example shipped in the package: the image has no checkout
        assert not settings.spec.is_absolute()
        assert load_spec(settings.spec).name == "fraud"
    ports = {p.split(":")[0] for p in services["kafka"]["ports"]}
    assert "9092" in ports and "localhost:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
