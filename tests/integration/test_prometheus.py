"""A real Prometheus (Debian's package) scrapes both stages and answers PromQL."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import yaml

from riverflow.spec import PipelineSpec
from riverflow.streams.kafka_io import ensure_topics, produce_all, producer
from riverflow.tools.generator import FraudStreamConfig, with_labels
from riverflow.tools.stack import Endpoints, free_port
from tests.conftest import LOGS, REPO_ROOT
from tests.integration.conftest import StageFactory, collect


def query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_prometheus_scrapes_every_stage_and_promql_returns_the_champion(
    stack: Endpoints, spec: PipelineSpec, start_stage: StageFactory, tmp_path: Path
) -> None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    assert prometheus and promtool, "scripts/test installs Debian's prometheus package"
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=1)
    scorer = start_stage("scorer", partitions=1, model_poll_s=0.05)
    learner = start_stage("learner", partitions=1, snapshot_every_labels=200)
    monitor = start_stage("monitor", partitions=1)
    records = [
        (topics.events if kind == "event" else topics.labels, None, orjson.dumps(rec))
        for kind, rec in with_labels(2000, FraudStreamConfig(label_delay=20))
    ]
    produce_all(producer(stack.kafka_bootstrap), records)
    collect(stack.kafka_bootstrap, topics.evaluations, 2000)

    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(REPO_ROOT / "deploy" / "prometheus" / "alerts.yml")],
        "scrape_configs": [
            {"job_name": f"riverflow-{name}",
             "static_configs": [{"targets": [f"127.0.0.1:{stage.metrics_port}"]}]}
            for name, stage in (("scorer", scorer), ("learner", learner), ("monitor", monitor))
        ],
    }  # fmt: skip
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    check = subprocess.run([promtool, "check", "config", str(config_file)],
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log = tmp_path / "prometheus.log"
    LOGS.append(log)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [prometheus, f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        champion: list[dict[str, Any]] = []
        learned: list[dict[str, Any]] = []
        quality: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                up = query(port, 'up{job=~"riverflow-.*"} == 1')
                champion = query(
                    port, 'riverflow_stage_status{stage="scorer",name="model_version"}'
                )
                # the champion's windowed accuracy, as the monitor measures it
                promql = 'riverflow_model_quality{metric="accuracy"} * on (model) group_left '
                quality = query(port, promql + "riverflow_champion_info")
                learned = query(
                    port, 'riverflow_stage_status{stage="learner",name="model_version"}'
                )
            except OSError:
                up = []
            served = float(champion[0]["value"][1]) if champion else 0.0
            # (a version the learner publishes after its last labels, up to a second on,
            # may be scraped from the scorer that follows it before from the learner)
            caught_up = bool(learned) and float(learned[0]["value"][1]) >= served
            if len(up) == 3 and served >= 1 and quality and caught_up:
                break
            time.sleep(0.5)
        assert len(up) == 3, "every stage scraped"
        assert len(quality) == 1 and 0.5 < float(quality[0]["value"][1]) <= 1.0
        assert champion and float(champion[0]["value"][1]) >= 1  # the learner's snapshots
        assert float(learned[0]["value"][1]) >= float(champion[0]["value"][1])
        consumed = query(port, 'riverflow_consumed_messages_total{stage="scorer"}')
        assert float(consumed[0]["value"][1]) == 2000
        # the learner's own memory beside its RSS: its index of scored events (RocksDB),
        # and each candidate's last version's size
        index = query(port, 'riverflow_stage_status{stage="learner",name="scored_index_bytes"}')
        assert index and float(index[0]["value"][1]) > 2000 * 70
        sizes = query(port, 'riverflow_stage_status{stage="learner",name=~".+:version_bytes"}')
        assert sizes and all(float(s["value"][1]) > 0 for s in sizes)
    finally:
        proc.terminate()
        proc.wait(30)
        LOGS.remove(log)
