"""The monitor stage on the real broker and Redis: a flipped-label burst corrupts the
champion; once clean labels come back, the version from before the burst does better on
them and is rolled back to within 1,000 labelled events and 5 seconds, and the monitor
shows it (metrics, status page)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
import redis
import yaml

from riverflow.models.registry import PointerMove, RedisRegistry
from riverflow.monitors.drift import ErrorDriftMonitor
from riverflow.monitors.view import MonitorView
from riverflow.settings import DEFAULT_SPEC, Settings
from riverflow.spec import PipelineSpec
from riverflow.stages.monitor import MEMORY_EVERY_S
from riverflow.streams.contracts import ModelEvent
from riverflow.streams.kafka_io import ensure_topics, produce_all, producer
from riverflow.tools.generator import FraudStreamConfig, with_labels
from riverflow.tools.stack import Endpoints
from tests.integration.conftest import StageFactory, StageProcess, collect
from tests.integration.test_status_page import rendered

KEY = Settings().signing_key.get_secret_value().encode()
N, FLIP = 5_000, (3_000, 3_600)


def wait_for(what: str, check: object, timeout_s: float, every_s: float = 0.02) -> float:
    """Poll ``check()`` until truthy; returns when it became so (unix seconds)."""
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return time.time()
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def labels_seen(monitor: StageProcess) -> float:
    try:
        return monitor.metric("riverflow_stage_status", stage="monitor", name="labels")
    except (AssertionError, OSError):  # not up yet, or nothing counted yet
        return 0.0


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    """The fraud spec under a unique name, without promotions: the candidate that
    follows the flipped labels best would be promoted during the burst (the labels are
    all the monitor knows), and this test is about the rollback."""
    data = yaml.safe_load(DEFAULT_SPEC.read_text())
    data["name"] = f"it-{uuid.uuid4().hex[:10]}"
    data.setdefault("monitors", {})["promote"] = {"enabled": False}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class FlippedStream:
    """The stages on the broker, and the fraud stream with a flipped-label burst to
    send in three parts: clean labels, the burst, clean labels again."""

    def __init__(self, stack: Endpoints, spec: PipelineSpec, start_stage: StageFactory) -> None:
        self.topics = t = spec.topics
        ensure_topics(stack.kafka_bootstrap, t.all(), partitions=1, replication=1)
        start_stage("scorer", model_poll_s=0.05)
        # a version every 500 labels, as they come (no floor between versions: the
        # monitor's detector settles by label counts, and the stream takes seconds)
        start_stage("learner", snapshot_every_labels=500, label_wait_s=5,
                    snapshot_min_interval_s=0)  # fmt: skip
        self.monitor = start_stage("monitor", model_poll_s=0.05)
        self.stream = list(with_labels(N, FraudStreamConfig(drift_at=(), flipped_labels=FLIP)))
        self.parts = [0, self._label_at(FLIP[0]), self._label_at(FLIP[1]), len(self.stream)]
        self.producer = producer(stack.kafka_bootstrap)
        self.labels_sent = 0

    def _label_at(self, n: int) -> int:
        event_id = f"e7-{n:08d}"
        return next(
            i for i, (k, r) in enumerate(self.stream)
            if k == "label" and r["event_id"] == event_id
        )  # fmt: skip

    def send(self, part: int) -> int:
        """Send part 0, 1 or 2; the labels sent so far."""
        t, records = self.topics, self.stream[self.parts[part] : self.parts[part + 1]]
        produce_all(self.producer, ((t.events if k == "event" else t.labels,
                    str(r["card_id"] if k == "event" else r["event_id"]).encode(),
                    orjson.dumps(r)) for k, r in records))  # fmt: skip
        self.labels_sent += sum(k == "label" for k, _ in records)
        return self.labels_sent

    def through_the_burst(self, registry: RedisRegistry) -> int:
        """Clean labels, then the burst, each seen by the monitor: no rollback yet."""
        for part in (0, 1):
            sent = self.send(part)
            wait_for(f"the monitor to see part {part}",
                     lambda n=sent: labels_seen(self.monitor) >= n, 120)  # fmt: skip
            assert not [m for m in registry.history() if m.kind == "rollback"]
        return sent

    def clean_until_rollback(self, registry: RedisRegistry) -> tuple[PointerMove, float]:
        """Clean labels again, until a rollback: the move, and its seconds after them."""
        clean_sent = time.time()
        self.send(2)

        def rolled_back() -> PointerMove | None:
            return next((m for m in registry.history() if m.kind == "rollback"), None)

        wait_for("a rollback", rolled_back, 60)
        move = rolled_back()
        assert move is not None
        return move, move.at - clean_sent


def test_a_flipped_label_burst_is_rolled_back_within_5_seconds_of_clean_labels(
    stack: Endpoints,
    spec: PipelineSpec,
    start_stage: StageFactory,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    t = spec.topics
    run = FlippedStream(stack, spec, start_stage)
    monitor = run.monitor
    registry = RedisRegistry(redis_client, spec.name, KEY)
    burst = run.through_the_burst(registry)
    move, after = run.clean_until_rollback(registry)
    assert after < 5.0, f"rollback {after:.2f}s after clean labels"
    events = [ModelEvent.decode(m.value()) for m in
              collect(stack.kafka_bootstrap, t.model_events, 1, settle_s=3.0)]  # fmt: skip
    decision = next(e for e in events if e.kind == "rollback" and e.by == "monitor")
    assert decision.evidence is not None
    ev = decision.evidence
    assert 0 < ev["labels"] - burst <= 1_000
    assert ev["recent_accuracy"] < ev["good_level"] - 0.1
    assert ev["target_window_accuracy"] > ev["champion_window_accuracy"]
    assert ev["sign_test_p"] < ev["alpha"]
    assert any(e.kind == "rebased" and e.model == move.to.model for e in events)

    # what the monitor shows: metrics, the status document, the page
    assert monitor.metric("riverflow_monitor_decisions_total", kind="rollback") >= 1
    champion = registry.champion()
    assert champion is not None
    wait_for("the champion's quality gauge",
             lambda: _quality(monitor, champion.model) is not None, 10)  # fmt: skip
    status, body = monitor.get("/status.json")
    view = MonitorView.model_validate_json(body)
    assert status == 200 and "rollback" in {m.kind for m in view.markers}
    assert view.champion is not None and view.champion["model"] == champion.model
    status, page = monitor.get("/")
    assert status == 200 and "<script" in page
    # ... and the page of the real monitor in headless Chromium: charts drawn, champion shown
    dom = rendered(f"http://127.0.0.1:{monitor.metrics_port}/")
    assert dom.one("h2", id="champion").text.startswith(f"Champion: {champion.model} v")
    lines = dom.find("polyline", **{"class": "series"})
    assert {line.attrs["data-model"] for line in lines} >= set(view.series)
    assert all(len(line.attrs["points"].split()) > 10 for line in lines)
    kinds = [m.attrs["data-kind"] for m in dom.find("g", **{"class": "marker"})]
    assert "rollback" in kinds
    # the report: the same document from the running monitor, as HTML and PNG
    html, png = tmp_path / "report.html", tmp_path / "report.png"
    url = f"http://127.0.0.1:{monitor.metrics_port}"
    done = subprocess.run(
        [sys.executable, "-m", "riverflow.cli", "report", "--url", url,
         "--html", str(html), "--png", str(png)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert champion.model in html.read_text() and "rollback" in html.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_monitor_sigkilled_after_the_burst_and_restarted_still_rolls_back(
    stack: Endpoints, spec: PipelineSpec, start_stage: StageFactory, redis_client: redis.Redis
) -> None:
    """What a rollback needs that the labels to come cannot teach a restarted monitor
    (the champion's level when good, the versions served then) is saved in Redis. A
    monitor that lost it learned its level from the fall, knew no version to go back
    to and rolled nothing back: no rollback within 60 s of the clean labels."""
    run = FlippedStream(stack, spec, start_stage)
    registry = RedisRegistry(redis_client, spec.name, KEY)
    run.through_the_burst(registry)
    saved = registry.monitor_memory
    wait_for("the monitor's memory", lambda: (saved() or {}).get("good"), 10)
    time.sleep(MEMORY_EVERY_S + 1.0)  # what it saved last is from after the burst
    memory = saved()
    assert memory is not None and memory["level"] is not None and memory["good"], memory
    # and its champion's drift detector, signed, as Redis keeps it
    drift = ErrorDriftMonitor.restored(spec.monitors.detector, memory["drift"], KEY)
    assert drift is not None and drift.statistic()["width"] > 0, {
        k: v for k, v in memory["drift"].items() if k in ("version", "settling", "alarms")
    }
    run.monitor.proc.kill()
    run.monitor.proc.wait()
    start_stage("monitor", model_poll_s=0.05)
    _, after = run.clean_until_rollback(registry)
    assert after < 30.0, f"rollback {after:.2f}s after clean labels"  # (it joins its group)
    decision = next(
        ModelEvent.decode(m.value())
        for m in collect(stack.kafka_bootstrap, spec.topics.model_events, 1, settle_s=3.0)
        if b'"rollback"' in m.value() and b'"monitor"' in m.value()
    )  # fmt: skip
    assert decision.evidence is not None
    assert decision.evidence["good_level"] == round(memory["level"], 6)
    assert decision.evidence["recent_accuracy"] < decision.evidence["good_level"] - 0.1


def _quality(monitor: StageProcess, model: str) -> float | None:
    try:
        return monitor.metric("riverflow_model_quality", model=model, metric="accuracy")
    except AssertionError:
        return None
