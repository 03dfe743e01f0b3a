"""The soak in CI: two minutes of paced load on the real broker and Redis, with the
scorer, learner and monitor as their own processes (``riverflow soak`` runs 25)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
from rich.console import Console

from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.tools.generator import history, stream_for
from riverflow.tools.soak import SoakConfig, report, run_soak
from riverflow.tools.stack import Endpoints
from tests.integration.conftest import collect

# a moderate rate: CI has 2 shared cores, and other jobs run beside the suite
CONFIG = SoakConfig(minutes=2.0, rate=300.0, labels_behind=400, warmup_s=20.0, drain_s=60.0)


def test_two_minutes_of_steady_load_lose_and_stall_nothing(
    stack: Endpoints, spec: PipelineSpec, tmp_path: Path
) -> None:
    result = run_soak(spec, CONFIG, Settings(), stack, tmp_path, log=lambda _: None)
    Console(width=140).print(report(result))  # shown under a failure, as the user sees it
    counts = result.counts
    produced = counts["events_produced"]
    assert produced == CONFIG.events
    # every event predicted, once or with its replays flagged
    assert counts["missing_predictions"] == 0
    assert counts["second_predictions_unflagged"] == 0
    # (a gap the soak's own process was held up for is the loaded CI box's)
    assert result.gaps["over_unexplained"] == 0, result.gaps
    # labels: every one produced (all but the last 400 events') learned once, none orphaned
    assert counts["labels_produced"] == produced - CONFIG.labels_behind - 1
    assert counts["orphan_labels"] == 0
    assert counts["labels_learned_twice"] == 0
    assert counts["labels_learned"] == counts["labels_produced"]
    assert all(stage["alive"] for stage in result.stages.values()), result.stages
    # memory is reported (too short a run to judge flatness)
    for stage in ("scorer", "learner", "monitor"):
        assert result.memory["rss_mb"][stage]
    assert result.memory["redis_mb"] and result.memory["redis_keys"]
    # and the learner's index of scored events, read from its /metrics: a memtable
    # of the run's records once the learner is up (flushed at 16 MB: not a count)
    index = [mb for t, mb in result.memory["learner_index_mb"] if not math.isnan(mb)]
    assert index and max(index) - min(index) > 0.5 and max(index) < 256 + 2 * 16
    assert not math.isnan(result.memory["learner_less_index_slope_mb_min"])
    # what Redis holds by kind of key: every candidate's versions, the entities' state
    kinds = result.memory["redis_by_kind"]
    for candidate in spec.models.candidates:
        assert kinds[f"model:{candidate.name}"]["mb"] > 0, kinds
    assert any(kind.startswith("ent:") and used["keys"] > 0 for kind, used in kinds.items())
    assert sum(used["keys"] for used in kinds.values()) <= result.memory["redis_keys"][-1][1]
    # and the versions' bytes through the run, which the Redis target takes out
    models = result.memory["redis_models_mb"]
    assert models and 0 < models[-1][1] <= sum(u["mb"] for k, u in kinds.items() if "model:" in k)
    assert orjson.loads(orjson.dumps(result.as_dict()))["counts"] == counts


def test_produce_at_a_rate_is_paced_and_delivers_everything(
    stack: Endpoints, spec_file: Path, spec: PipelineSpec
) -> None:
    env = {**os.environ, "RIVERFLOW_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
           "RIVERFLOW_REDIS_URL": stack.redis_url}  # fmt: skip
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "riverflow.cli", "produce", "--events", "1000", "--rate", "400",
         "--spec", str(spec_file)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    assert "produced 2,000 messages" in done.stdout  # 1,000 events and their labels
    assert took >= 1000 / 400 - 0.1  # paced: never faster than asked
    assert len(collect(stack.kafka_bootstrap, spec.topics.events, 1000, settle_s=0.5)) == 1000


def test_produce_skips_the_first_events_of_the_stream_and_their_labels(
    stack: Endpoints, spec_file: Path, spec: PipelineSpec
) -> None:
    """``--events 1000 --skip 600``: the last 400 events of the 1,000-event stream and
    their labels (a stream resumed where an earlier run stopped)."""
    env = {**os.environ, "RIVERFLOW_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
           "RIVERFLOW_REDIS_URL": stack.redis_url}  # fmt: skip

    def produce(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "riverflow.cli", "produce", "--spec", str(spec_file),
             "--seed", "5", *args],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip

    wrong = produce("--events", "10", "--skip", "11")
    assert wrong.returncode != 0 and "--skip 11: must be from 0 to --events (10)" in wrong.stderr
    rest = produce("--events", "1000", "--skip", "600")
    assert rest.returncode == 0, rest.stderr
    assert "produced 800 messages" in rest.stdout
    name = stream_for(spec.label.field, None)
    whole = [rec for kind, rec in history(name, 1000, 5) if kind == "event"]
    t = spec.topics
    sent = [orjson.loads(m.value()) for m in collect(stack.kafka_bootstrap, t.events, 400)]
    assert sorted(sent, key=lambda e: e["event_id"]) == whole[600:]  # (in order per partition)
    labels = collect(stack.kafka_bootstrap, t.labels, 400, settle_s=0.5)
    assert sorted(orjson.loads(m.value())["event_id"] for m in labels) == [
        e["event_id"] for e in whole[600:]
    ]
