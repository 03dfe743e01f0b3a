"""How big a model version is, where an operator sees it, and the warning when a
model that grows with the stream passes the size a setting names: every scorer
loads each new champion on its main thread, and Redis keeps several of each."""

from __future__ import annotations

import itertools
import logging

import pytest

from riverflow.assembly import build_learner
from riverflow.models.registry import MemoryRegistry
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, parse_spec
from tests.stages.test_learner_publishing import scored_runtime

WARN_BYTES = 60_000  # the fraud tree passes it within a few thousand labels, and doubles


def test_a_growing_model_is_warned_of_past_the_size_and_at_each_doubling(
    unmonitored_spec: PipelineSpec, caplog: pytest.LogCaptureFixture
) -> None:
    rt, labels = scored_runtime(unmonitored_spec, 8000)
    settings = Settings(snapshot_every_labels=500, snapshot_every_s=0, label_wait_s=0,
                        snapshot_min_interval_s=0,
                        model_size_warn_mb=WARN_BYTES / 2**20)  # fmt: skip
    learner = build_learner(unmonitored_spec, settings, rt.store, rt.registry, rt.scored)
    registry = rt.registry
    assert isinstance(registry, MemoryRegistry)
    tree = unmonitored_spec.models.champion_spec.name
    with caplog.at_level(logging.WARNING, logger="riverflow.stages.lineage"):
        for at in range(0, len(labels), 500):
            learner.process(labels[at : at + 500])
            # what the learner reports is the size of what it just stored
            latest = registry.versions(tree)[-1]
            blob, _ = registry.blobs[tree, latest]
            assert learner.status()[f"{tree}:version_bytes"] == meta_bytes(registry, tree, latest)
            assert meta_bytes(registry, tree, latest) == len(blob)

    sizes = {v: meta_bytes(registry, tree, v) for v in registry.versions(tree)}
    warned = [r for r in caplog.records if r.name == "riverflow.stages.lineage"]
    assert all(r.levelno == logging.WARNING for r in warned)
    assert all(r.args[0] == tree for r in warned)  # the linear candidates stay small
    versions = [r.args[1] for r in warned]
    assert len(versions) >= 2, sizes
    # the first version past the size, then only one at least twice the last warned of
    first = min(v for v, size in sizes.items() if size >= WARN_BYTES)
    assert versions[0] == first
    for before, after in itertools.pairwise(versions):
        assert sizes[after] >= 2 * sizes[before]
        assert all(sizes[v] < 2 * sizes[before] for v in sizes if before < v < after)
    assert any(sizes[v] >= WARN_BYTES for v in sizes if v not in versions)  # not every one
    message = warned[0].getMessage()
    assert "max_size" in message and "RIVERFLOW_MODEL_SIZE_WARN_MB" in message


def meta_bytes(registry: MemoryRegistry, name: str, version: int) -> int:
    return int(registry.meta(name, version)["bytes"])


def with_tree_params(spec: PipelineSpec, **params: object) -> PipelineSpec:
    """``spec`` with its champion tree's parameters updated."""
    data = spec.model_dump(mode="json", by_alias=True)
    for candidate in data["models"]["candidates"]:
        if candidate["name"] == spec.models.champion_spec.name:
            candidate["estimator"]["params"].update(params)
    return parse_spec(data)


def test_a_restarted_learner_bounds_its_stored_tree_as_the_spec_now_says(
    unmonitored_spec: PipelineSpec, caplog: pytest.LogCaptureFixture
) -> None:
    """A deployment whose tree grew under River's default bound: the operator sets
    ``max_size`` in the spec and restarts. The continued tree takes the bound on (it
    keeps what it learned); another changed parameter is kept as stored; both said."""
    unbounded = with_tree_params(unmonitored_spec, max_size=100.0, memory_estimate_period=1_000_000)
    rt, labels = scored_runtime(unbounded, 2000)
    settings = Settings(snapshot_every_labels=1000, snapshot_every_s=0, label_wait_s=0,
                        snapshot_min_interval_s=0)  # fmt: skip
    tree = unmonitored_spec.models.champion_spec.name
    first = build_learner(unbounded, settings, rt.store, rt.registry, rt.scored)
    first.process(labels)
    rt.log.write(first.publish())
    first.commit()
    learned = first.candidates[tree].model

    bounded = with_tree_params(unbounded, max_size=8, memory_estimate_period=100_000,
                               grace_period=300)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="riverflow.stages.lineage"):
        again = build_learner(bounded, settings, rt.store, rt.registry, rt.scored)
    model = again.candidates[tree].model
    step = model["HoeffdingTreeClassifier"]
    assert (step.max_size, step.memory_estimate_period) == (8, 100_000)
    assert step.grace_period == 100  # as it was made: its leaves were grown with it
    # what it learned is kept: the same predictions as the tree that published it
    xs = [{"amount": a, "category": "travel", "country": "FR", "channel": "web"}
          for a in (5.0, 80.0, 950.0)]  # fmt: skip
    assert [model.predict_proba_one(x) for x in xs] == [learned.predict_proba_one(x) for x in xs]
    applied, kept = (r.getMessage() for r in caplog.records if r.args and r.args[0] == tree)
    assert "max_size: 100.0 -> 8" in applied
    assert "memory_estimate_period: 1000000 -> 100000" in applied
    assert "grace_period: 100 -> 300" in kept and "max_size" not in kept
