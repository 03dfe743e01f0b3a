"""Backtesting: a replay of a history file is the pipeline's own result, the same on
any machine, and a bad line costs only itself."""

from __future__ import annotations

from pathlib import Path

import orjson

from riverflow.replay import replay
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.streams.contracts import DeadLetter, Evaluation, ModelEvent, Prediction
from riverflow.tools.generator import FraudStreamConfig, stamped_history

from .test_cli import riverflow


def write_history(where: Path, n: int, seed: int = 3) -> tuple[Path, Path]:
    events, labels = where / "events.jsonl", where / "labels.jsonl"
    with events.open("wb") as ev, labels.open("wb") as lb:
        for kind, rec in stamped_history(n, FraudStreamConfig(seed=seed, drift_at=(n // 2,))):
            (ev if kind == "event" else lb).write(orjson.dumps(rec) + b"\n")
    return events, labels


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def test_a_replay_depends_on_its_input_only(fraud_spec: PipelineSpec, tmp_path: Path) -> None:
    events, labels = write_history(tmp_path, 4000)
    # snapshots by time too (the default is every 60 s): event time, not the machine's
    settings = Settings(snapshot_every_labels=0, snapshot_every_s=60)
    first = replay(fraud_spec, events, labels, tmp_path / "a", settings)
    again = replay(fraud_spec, events, labels, tmp_path / "b", settings)
    names = ("predictions", "evaluations", "model-events", "dlq")
    for name in names:  # byte for byte: no stamp of the wall clock anywhere
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (
            tmp_path / "b" / f"{name}.jsonl"
        ).read_bytes(), name
    assert first.events == first.labels == 4000 and first.champion == again.champion
    assert first.written["predictions"] == first.written["evaluations"] == 4000
    predictions = [Prediction.decode(raw) for raw in lines(tmp_path / "a" / "predictions.jsonl")]
    # each scored within a second of event time after it came, as a live scorer would
    assert all(0 <= p.scored_at - p.event_time <= 1.0 for p in predictions)
    decisions = [ModelEvent.decode(raw) for raw in lines(tmp_path / "a" / "model-events.jsonl")]
    lead = fraud_spec.models.champion_spec.name
    published = [d for d in decisions if d.kind == "published" and d.model == lead]
    span_s = (first.last_ts or 0) - (first.first_ts or 0)
    assert span_s > 1800  # a snapshot a minute of the history's own time
    assert abs(len(published) - span_s / 60) <= 3
    assert {d.kind for d in decisions} >= {"published", "drift", "promote"}
    evaluations = [Evaluation.decode(raw) for raw in lines(tmp_path / "a" / "evaluations.jsonl")]
    assert {e.event_id for e in evaluations} == {p.event_id for p in predictions}


def test_bad_lines_cost_only_themselves(fraud_spec: PipelineSpec, tmp_path: Path) -> None:
    events, labels = write_history(tmp_path, 600)
    good = lines(events)
    # an event that is not JSON and one with no time: fed where they stand, refused
    timeless = {k: v for k, v in orjson.loads(good[100]).items() if k != "ts"}
    timeless["event_id"] = "no-time"
    events.write_bytes(b"\n".join([*good[:50], b"{not json", orjson.dumps(timeless),
                                   *good[50:]]) + b"\n")  # fmt: skip
    # a label with no time (placed at the time of the one before it), and a label
    # whose event never comes (to the dead letters once its wait runs out)
    stamped = lines(labels)
    unstamped = {k: v for k, v in orjson.loads(stamped[10]).items() if k != "ts"}
    never = {"event_id": "no-such-event", "is_fraud": True, "ts": orjson.loads(good[300])["ts"]}
    labels.write_bytes(b"\n".join([*stamped[:10], orjson.dumps(unstamped), *stamped[11:],
                                   orjson.dumps(never)]))  # fmt: skip
    out = tmp_path / "out"
    result = replay(fraud_spec, events, labels, out, Settings())
    assert (result.events, result.labels, result.unplaced) == (602, 601, 3)
    letters = [DeadLetter.decode(raw) for raw in lines(out / "dlq.jsonl")]
    assert sorted((d.stage, d.error_kind) for d in letters) == [
        ("learner", "orphan_label"), ("scorer", "invalid_json"), ("scorer", "missing_field"),
    ]  # fmt: skip
    assert "ts" in next(d.error for d in letters if d.error_kind == "missing_field")
    predicted = [Prediction.decode(raw).event_id for raw in lines(out / "predictions.jsonl")]
    assert len(predicted) == len(set(predicted)) == 600  # every good event, once
    evaluated = {Evaluation.decode(raw).event_id for raw in lines(out / "evaluations.jsonl")}
    assert evaluated == set(predicted)  # the unstamped label learned too


def test_generate_then_replay_from_the_command_line(tmp_path: Path) -> None:
    made = riverflow("generate", "--events", "2000", "--out", str(tmp_path))
    assert made.returncode == 0, made.stderr
    done = riverflow(
        "replay", "--events", str(tmp_path / "events.jsonl"),
        "--labels", str(tmp_path / "labels.jsonl"), "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "replayed 2,000 events and 2,000 labels" in done.stdout
    assert len(lines(tmp_path / "out" / "predictions.jsonl")) == 2000
    missing = riverflow("replay", "--events", str(tmp_path / "nope.jsonl"), "--out", "x")
    said = " ".join(missing.stderr.split())
    assert missing.returncode != 0 and "nope.jsonl: no such file" in said
    assert "Traceback" not in missing.stderr
    folder = riverflow("replay", "--events", str(tmp_path), "--out", "x")
    said = " ".join(folder.stderr.split())
    assert folder.returncode != 0 and "a directory, not a JSON-lines file" in said
