"""deploy/k8s: every manifest is valid Kubernetes, offline, and runs the stages as the
code expects them (settings, metrics ports, the scorer's consumer group).

Schemas: the ``kubernetes-validate`` package (a dev extra) ships the Kubernetes
OpenAPI schemas as JSON; nothing is fetched and no cluster is needed. KEDA's
ScaledObject and the Prometheus Operator's ServiceMonitor are CRDs it does not know:
their fields are checked here against what riverflow uses, not against their schemas.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from riverflow.kafka_runtime import METRICS_PORTS, host_settings
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, load_spec
from tests.conftest import REPO_ROOT
from tests.deploy.settings_env import SECRET_ENV, settings_from_env, unknown_names
from tests.deploy.test_dockerfile import dockerfile

K8S = REPO_ROOT / "deploy" / "k8s"
# the oldest Kubernetes still in wide use, and the newest the package ships
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
# not in the kustomization on purpose: a Secret with real values is never committed
SECRET_EXAMPLE = K8S / "secret.example.yaml"
WORKLOADS = ("Deployment", "StatefulSet")


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomization(folder: Path = K8S) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return data


def rendered() -> list[dict[str, Any]]:
    """What ``kubectl apply -k deploy/k8s`` applies, as far as it matters here: every
    document of every listed resource (kustomize's labels and image tag left out)."""
    return [d for name in kustomization()["resources"] for d in documents(K8S / name)]


def of_kind(kind: str, docs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return [d for d in (rendered() if docs is None else docs) if d["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return doc


@dataclass
class Stage:
    """One stage's workload as the manifests run it."""

    workload: dict[str, Any]

    @property
    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.workload["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> dict[str, Any]:
        [container] = self.pod["containers"]
        return container

    @property
    def name(self) -> str:
        args = self.container["args"]
        assert args[:1] == ["run"] and args[1] in METRICS_PORTS, args
        return str(args[1])

    def env(self) -> dict[str, Any]:
        """Every variable the container gets: the ConfigMaps' then its own (a value, or
        where it comes from)."""
        env: dict[str, Any] = {}
        for source in self.container.get("envFrom", []):
            env.update(named("ConfigMap", source["configMapRef"]["name"])["data"])
        for var in self.container.get("env", []):
            env[var["name"]] = var.get("value", var.get("valueFrom"))
        return env

    def settings(self) -> Settings:
        plain = {k: v for k, v in self.env().items() if isinstance(v, str)}
        return settings_from_env(plain)

    def metrics_port(self) -> int:
        setting = self.settings().metrics_port
        return METRICS_PORTS[self.name] if setting is None else setting


def stages() -> dict[str, Stage]:
    found = [Stage(d) for d in rendered() if d["kind"] in WORKLOADS]
    by_name = {s.name: s for s in found}
    assert len(by_name) == len(found) and set(by_name) == set(METRICS_PORTS)
    return by_name


def the_spec(tmp_path: Path) -> PipelineSpec:
    """The spec the stages load: RIVERFLOW_SPEC in the ConfigMap mounted there."""
    scorer = stages()["scorer"]
    where = scorer.settings().spec
    [mount] = [m for m in scorer.container["volumeMounts"] if where.parent == Path(m["mountPath"])]
    [volume] = [v for v in scorer.pod["volumes"] if v["name"] == mount["name"]]
    text = named("ConfigMap", volume["configMap"]["name"])["data"][where.name]
    (tmp_path / where.name).write_text(text)
    return load_spec(tmp_path / where.name)


def test_the_kustomization_lists_files_that_exist_and_leaves_none_out() -> None:
    listed = kustomization()["resources"]
    assert listed and all((K8S / name).is_file() for name in listed)
    components = [p.parent for p in K8S.glob("*/kustomization.yaml")]
    assert {c.name for c in components} == {"keda", "servicemonitor"}
    for folder in components:  # optional: a Component each, added from an overlay
        data = kustomization(folder)
        assert data["kind"] == "Component" and data["apiVersion"].startswith("kustomize.config")
        assert all((folder / name).is_file() for name in data["resources"])
        listed += [f"{folder.name}/{name}" for name in data["resources"]]
        for patch in data.get("patches", []):  # a patch names a resource of the base
            target = patch["target"]
            assert named(target["kind"], target["name"])
    every = {str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml")}
    kustomizations = {str(p.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")}
    assert every - kustomizations == {*listed, SECRET_EXAMPLE.name}
    # namespace-agnostic: `kubectl apply -k ... -n NAME` chooses it
    assert "namespace" not in kustomization()
    assert not [d for d in rendered() if "namespace" in d["metadata"]]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    docs = [*rendered(), *documents(SECRET_EXAMPLE)]
    assert {d["kind"] for d in docs} >= {"ConfigMap", "Secret", "Service", "StatefulSet",
                                         "Deployment", "PersistentVolumeClaim"}  # fmt: skip
    for doc in docs:
        # strict: a misspelt or misplaced field fails too
        kubernetes_validate.validate(doc, version, strict=True)


def test_an_invalid_manifest_is_refused() -> None:
    """The validation above can fail: a field in the wrong place is caught."""
    doc = stages()["scorer"].workload
    doc["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[-1], strict=True)


def test_env_names_are_settings_and_secrets_come_from_the_secret() -> None:
    secret_keys = set(documents(SECRET_EXAMPLE)[0]["stringData"])
    assert secret_keys == SECRET_ENV
    for config in of_kind("ConfigMap"):
        if config["metadata"]["name"] == "riverflow-settings":
            assert not unknown_names(set(config["data"])), unknown_names(set(config["data"]))
            assert not set(config["data"]) & secret_keys, "a secret in a ConfigMap"
    for stage in stages().values():
        env = stage.env()
        assert not unknown_names(set(env)), (stage.name, unknown_names(set(env)))
        refs = {k: v["secretKeyRef"] for k, v in env.items() if isinstance(v, dict)}
        assert set(refs) == secret_keys, stage.name  # every secret, from the Secret only
        for name, ref in refs.items():
            assert ref["name"] == documents(SECRET_EXAMPLE)[0]["metadata"]["name"]
            assert ref["key"] == name
            # optional only where the setting may be unset (Redis without a password);
            # the signing key's default is the development key: required here
            setting = Settings.model_fields[name.removeprefix("RIVERFLOW_").lower()]
            unset = setting.default is None or setting.default_factory is not None
            assert ref.get("optional", False) == unset, name
        settings = stage.settings()  # the plain values are valid settings
        assert settings.kafka_bootstrap and settings.redis_url
        assert settings.metrics_host == "0.0.0.0"  # the kubelet and Prometheus reach it


def test_probes_and_scrapes_use_each_stages_metrics_port() -> None:
    outage_s = Settings().outage_limit_s
    for stage in stages().values():
        port = stage.metrics_port()
        [declared] = [p for p in stage.container["ports"] if p["name"] == "metrics"]
        assert declared["containerPort"] == port, stage.name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = stage.container[probe]["httpGet"]
            assert get["path"] == "/healthz" and get["port"] in ("metrics", port), stage.name
        # a stage waiting out a server (503) exits by itself after outage_limit_s:
        # the liveness probe must not restart it sooner, and startup allows that wait
        for probe in ("startupProbe", "livenessProbe"):
            p = stage.container[probe]
            assert p["periodSeconds"] * p["failureThreshold"] > outage_s, (stage.name, probe)
        annotations = stage.workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == port
        assert annotations["prometheus.io/path"] == "/metrics"
        labels = stage.workload["spec"]["template"]["metadata"]["labels"]
        [service] = [s for s in of_kind("Service")
                     if s["spec"]["selector"].items() <= labels.items()]  # fmt: skip
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]


def test_servicemonitor_selects_every_stages_service() -> None:
    [monitor] = documents(K8S / "servicemonitor" / "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in of_kind("Service")
                if selector.items() <= s["metadata"]["labels"].items()]  # fmt: skip
    assert len(selected) == len(METRICS_PORTS)
    [endpoint] = monitor["spec"]["endpoints"]
    for service in selected:
        assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]


def test_the_scorer_is_a_stateful_set_of_at_most_one_scorer_per_partition() -> None:
    scorer = stages()["scorer"]
    assert scorer.workload["kind"] == "StatefulSet"
    # its pods keep their names across restarts, so the group.instance.id derived from
    # the hostname stays the same: nothing may override it with a per-pod value
    assert "RIVERFLOW_INSTANCE_ID" not in scorer.env()
    assert scorer.settings().metrics_port != 0  # with the port off the member is dynamic
    headless = named("Service", scorer.workload["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert scorer.workload["spec"]["replicas"] <= scorer.settings().partitions
    # a drain takes one scorer at a time
    [budget] = of_kind("PodDisruptionBudget")
    labels = scorer.workload["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


def test_learner_and_monitor_run_alone_and_the_learners_index_is_on_a_claim() -> None:
    for name in ("learner", "monitor"):
        workload = stages()[name].workload
        assert workload["kind"] == "Deployment"
        assert workload["spec"]["replicas"] == 1
        assert workload["spec"]["strategy"]["type"] == "Recreate"  # never two at once
    learner = stages()["learner"]
    scored_dir = learner.settings().scored_dir
    assert scored_dir is not None and scored_dir.is_absolute()
    [mount] = [m for m in learner.container["volumeMounts"]
               if Path(m["mountPath"]) in scored_dir.parents]  # fmt: skip
    [volume] = [v for v in learner.pod["volumes"] if v["name"] == mount["name"]]
    claim = named("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # the image makes that directory its user's (a fresh volume takes its owner)
    image = dockerfile().final
    assert image.owner_of(Path(mount["mountPath"])) == image.user


def test_pods_run_as_the_images_user_on_a_read_only_root() -> None:
    image = dockerfile().final
    uid = image.uid(image.user)
    for stage in stages().values():
        pod = stage.pod["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid
        assert pod["fsGroup"] == pod["runAsGroup"]  # volumes writable by that user
        container = stage.container["securityContext"]
        assert container["readOnlyRootFilesystem"] is True
        assert container["allowPrivilegeEscalation"] is False
        assert container["capabilities"]["drop"] == ["ALL"]
        # what a stage writes is on a volume: its cache (and the learner's index)
        writable = {Path(m["mountPath"]) for m in stage.container["volumeMounts"]
                    if not m.get("readOnly")}  # fmt: skip
        settings = stage.settings()
        assert any(w == settings.cache_dir or w in settings.cache_dir.parents for w in writable)


def test_every_stage_has_requests_within_its_limits() -> None:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "m": 1e-3, "": 1}

    def quantity(value: str) -> float:
        number = value.rstrip("KMGim")
        return float(number) * units[value[len(number) :]]

    for stage in stages().values():
        resources = stage.container["resources"]
        for what in ("cpu", "memory"):
            request = quantity(resources["requests"][what])
            assert 0 < request <= quantity(resources["limits"][what]), (stage.name, what)


def test_the_image_is_the_one_this_version_builds() -> None:
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    [image] = kustomization()["images"]
    assert image["newTag"] == version
    assert {s.container["image"] for s in stages().values()} == {image["name"]}


def test_keda_scales_the_scorers_on_their_own_consumer_group(tmp_path: Path) -> None:
    spec = the_spec(tmp_path)
    scorer = stages()["scorer"]
    settings = scorer.settings()
    assert settings.kafka_bootstrap and settings.redis_url

    @dataclass
    class Servers:
        kafka_bootstrap: str
        redis_url: str

    servers = Servers(settings.kafka_bootstrap, settings.redis_url)
    group = host_settings("scorer", spec, settings, servers, settings.model_poll_s).group
    [scaled] = documents(K8S / "keda" / "scaledobject.yaml")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["kind"] == "ScaledObject"
    target = scaled["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("StatefulSet", scorer.workload["metadata"]["name"])
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    assert scaled["spec"]["maxReplicaCount"] <= settings.partitions
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == group
    assert meta["topic"] == spec.topics.events
    assert meta["bootstrapServers"] == settings.kafka_bootstrap
    assert int(meta["lagThreshold"]) > 0
    # the component hands the replica count to KEDA
    [patch] = kustomization(K8S / "keda")["patches"]
    assert yaml.safe_load(patch["patch"]) == [{"op": "remove", "path": "/spec/replicas"}]
