"""deploy/: what Prometheus scrapes and what Grafana draws match what the stages export."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from riverflow.kafka_runtime import METRICS_PORTS
from riverflow.monitors.exporter import MonitorMetrics, StageMetrics
from tests.conftest import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"


def exported_names() -> set[str]:
    metrics = StageMetrics("monitor")
    MonitorMetrics(metrics.registry)
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        for suffix in ("_total", "_bucket", "_count", "_sum"):
            names.add(family.name + suffix)
    return names


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "riverflow.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for expr in exprs:  # each a whole PromQL expression: brackets and quotes balanced
        assert expr.count("{") == expr.count("}") and expr.count('"') % 2 == 0, expr
    used = {m for e in exprs for m in re.findall(r"\briverflow_[a-z_]+", e)}
    assert len(dashboard["panels"]) >= 6 and used
    assert used <= exported_names(), used - exported_names()


def test_alert_rules_use_exported_metrics() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {m for e in exprs for m in re.findall(r"\briverflow_[a-z_]+", e)}
    assert used and used <= exported_names(), used - exported_names()


def test_prometheus_scrapes_every_stage_compose_runs() -> None:
    compose: dict[str, Any] = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]}  # fmt: skip
    for stage, default_port in METRICS_PORTS.items():
        env = services[stage]["environment"]
        port = int(env.get("RIVERFLOW_METRICS_PORT", default_port))
        assert env["RIVERFLOW_METRICS_HOST"] == "0.0.0.0"
        assert f"{stage}:{port}" in targets
    volumes = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    for path in ("prometheus/prometheus.yml", "prometheus/alerts.yml", "grafana/dashboards"):
        assert f"./deploy/{path}" in volumes and (DEPLOY / path).exists()
