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
from riverflow.spec import PipelineSpec
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
