"""The learner checkpoint: a signed JSON document a restarted learner continues from
exactly, and that is refused when it is tampered with or in a format we do not read."""

from __future__ import annotations

import base64
import pickle
import pickletools
from typing import Any

import orjson
import pytest

from riverflow.assembly import build_learner, signing_key
from riverflow.embedded import EmbeddedRuntime
from riverflow.models.checkpoint import FORMAT, LearnerCheckpoint
from riverflow.models.errors import CheckpointError, SignatureError
from riverflow.models.registry import MemoryRegistry
from riverflow.models.signing import sign, sign_bytes, verify_bytes
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.tools.generator import FraudStreamConfig, with_labels

# (no floor between versions, as the embedded runtime's learner has none: the restored
# learner's status is compared with that one's)
SETTINGS = Settings(
    snapshot_every_labels=0, snapshot_every_s=0, label_wait_s=60, snapshot_min_interval_s=0
)
KEY = signing_key(SETTINGS)


def feed(rt: EmbeddedRuntime, stream: list[tuple[str, dict[str, Any]]]) -> None:
    for kind, rec in stream:
        topic = rt.topics.events if kind == "event" else rt.topics.labels
        rt.produce(topic, None, orjson.dumps(rec))
    rt.drain()


@pytest.fixture
def checkpointed(unmonitored_spec: PipelineSpec) -> tuple[EmbeddedRuntime, list[Any]]:
    """A runtime whose learner saved a checkpoint partway through a stream, with a fresh
    challenger and a label still waiting for its event; and the stream's rest."""
    stream = list(with_labels(1600, FraudStreamConfig(seed=5)))
    rt = EmbeddedRuntime(unmonitored_spec, SETTINGS)
    lead = unmonitored_spec.models.champion_spec.name
    rt.registry.start_challenger(f"{lead}.r1", lead, "test")
    feed(rt, stream[:1600])
    feed(rt, [("label", {"event_id": "later", "is_fraud": True})])
    rt.log.write(rt.learner.publish())
    rt.learner.commit()
    return rt, stream[1600:]


def stored(rt: EmbeddedRuntime) -> bytes:
    assert isinstance(rt.registry, MemoryRegistry) and rt.registry.saved is not None
    return rt.registry.saved


def test_a_restored_learner_continues_exactly_as_the_one_that_saved(
    unmonitored_spec: PipelineSpec, checkpointed: tuple[EmbeddedRuntime, list[Any]]
) -> None:
    rt, rest = checkpointed
    saved = rt.registry.checkpoint()
    assert saved is not None and saved.encode(KEY) == stored(rt)  # decoded as it was written
    assert saved.labels_seen == rt.learner.learned > 0
    assert saved.searches["fraud-logreg"]["alive"]  # saved mid-round: the round goes on
    assert [(m.value, label) for m, label in saved.pending] == [
        (orjson.dumps({"event_id": "later", "is_fraud": True}), True)
    ]

    restored = build_learner(unmonitored_spec, SETTINGS, rt.store, rt.registry, rt.scored)
    assert list(restored.candidates) == list(rt.learner.candidates)  # the challenger too
    assert restored.lineage.dynamic == rt.learner.lineage.dynamic
    assert restored.status() == rt.learner.status() and list(restored.pending) == ["later"]

    done = len(rt.messages(rt.topics.evaluations))
    feed(rt, rest)  # the learner that saved goes on...
    labels = rt.log.read(rt.topics.labels, saved.positions[0], 10_000)
    outputs = restored.process(labels)  # ... and the restored one reads the same labels
    # (an evaluation also carries the model search's decisions taken on its label)
    evaluations = [o.value for o in outputs if o.topic == rt.topics.evaluations]
    assert len(evaluations) == len(labels) > 500
    assert evaluations == [v for _, v in rt.messages(rt.topics.evaluations)[done:]]
    assert restored.status() == rt.learner.status()
    for name, candidate in restored.candidates.items():
        assert candidate.metrics.state() == rt.learner.candidates[name].metrics.state()


def test_a_tampered_checkpoint_or_another_key_is_refused(
    unmonitored_spec: PipelineSpec, checkpointed: tuple[EmbeddedRuntime, list[Any]]
) -> None:
    rt, _ = checkpointed
    assert isinstance(rt.registry, MemoryRegistry)
    raw = bytearray(stored(rt))
    raw[-10] ^= 0x01
    rt.registry.saved = bytes(raw)
    with pytest.raises(SignatureError, match="learner checkpoint signature does not verify"):
        build_learner(unmonitored_spec, SETTINGS, rt.store, rt.registry, rt.scored)
    with pytest.raises(SignatureError, match="learner checkpoint signature does not verify"):
        LearnerCheckpoint.decode(sign_bytes(b"{}", b"other key"), KEY)
    with pytest.raises(SignatureError, match="learner checkpoint is not signed"):
        LearnerCheckpoint.decode(orjson.dumps({"format": FORMAT}), KEY)


def test_an_unknown_format_or_an_old_pickled_checkpoint_is_refused(
    checkpointed: tuple[EmbeddedRuntime, list[Any]],
) -> None:
    rt, _ = checkpointed
    document = orjson.loads(verify_bytes(stored(rt), KEY, "test"))
    document["format"] = "riverflow-learner-checkpoint/2"
    with pytest.raises(CheckpointError, match="format 'riverflow-learner-checkpoint/2' is unknown"):
        LearnerCheckpoint.decode(sign_bytes(orjson.dumps(document), KEY), KEY)
    del document["format"]
    with pytest.raises(CheckpointError, match="format None is unknown"):
        LearnerCheckpoint.decode(sign_bytes(orjson.dumps(document), KEY), KEY)
    with pytest.raises(CheckpointError, match="signed pickle written by an earlier riverflow"):
        LearnerCheckpoint.decode(sign({"labels_seen": 1}, KEY), KEY)
    document = {"format": FORMAT, "labels_seen": 1}
    with pytest.raises(CheckpointError, match="malformed"):
        LearnerCheckpoint.decode(sign_bytes(orjson.dumps(document), KEY), KEY)


def pickled_globals(blob: bytes) -> set[str]:
    """The modules a pickle would import; empty for bytes that are no pickle."""
    found, strings = set(), []
    try:
        for op, arg, _ in pickletools.genops(blob):
            if op.name == "GLOBAL":
                found.add(str(arg).split(" ")[0])
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.add(strings[-2])
            elif isinstance(arg, str):
                strings.append(arg)
    except ValueError:  # not a pickle, or not one to the end
        pass
    return found


def test_the_checkpoint_is_json_with_no_pickled_class_of_ours(
    checkpointed: tuple[EmbeddedRuntime, list[Any]],
) -> None:
    rt, _ = checkpointed
    document = orjson.loads(verify_bytes(stored(rt), KEY, "test"))
    assert document["format"] == FORMAT
    assert set(document["candidates"]) == set(rt.learner.candidates)
    blobs = [base64.b64decode(item[field])
             for item in document["pending"] for field in ("key_b64", "value_b64")
             if item[field] is not None]  # fmt: skip
    assert blobs and not any("riverflow" in m for b in blobs for m in pickled_globals(b))
    # while a pickle of a class of ours would be seen
    assert "riverflow.monitors.prequential" in pickled_globals(pickle.dumps(rt.learner.metrics))
