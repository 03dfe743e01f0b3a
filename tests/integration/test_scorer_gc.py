"""The scorer freezes its heap after every batch (``HostSettings(freeze_gc=True)``),
so the cyclic GC never collects what outlives a batch. That is safe only while
the scorer's steady state makes no reference cycle: here it runs its batches on
real Redis, with new champion versions (a tree, a pipeline), bad messages, a
refused commit and the server path, and the cyclic GC, off meanwhile, then finds nothing to collect.
"""

from __future__ import annotations

import gc
import uuid

import orjson
import redis

from riverflow.assembly import build_scorer, redis_backends
from riverflow.models.factory import build_model
from riverflow.models.registry import ChampionPointer
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.streams.contracts import Message
from riverflow.tools.generator import FraudStreamConfig, transactions


def test_a_scorer_makes_no_garbage_cycle_in_its_steady_state(
    redis_client: redis.Redis, fraud_spec: PipelineSpec, settings: Settings
) -> None:
    spec = fraud_spec.model_copy(update={"name": f"gc-{uuid.uuid4().hex[:8]}"})
    events = [e for e, _ in transactions(1200, FraudStreamConfig(cards=40, mean_gap_s=30.0))]
    raw = [orjson.dumps(e) for e in events]
    bad = [b"{not json", orjson.dumps({"card_id": "c"}), b"[1]", b'{"amount": NaN}']
    topic = spec.topics.events
    messages = [Message(topic, 0, i, b"k", v) for i, v in enumerate(raw)]
    store, registry = redis_backends(spec, settings, redis_client)
    scorer = build_scorer(spec, settings, store, registry)
    # a second scorer on the same keys: its turns make the first one's commits refused
    other_store, _ = redis_backends(spec, settings, redis_client)
    other = build_scorer(spec, settings, other_store, registry)
    # champion versions to switch between: the tree, and a pipeline (scaler | logreg)
    versions = []
    for candidate in spec.models.candidates:
        model = build_model(candidate)
        for i, e in enumerate(events[:300]):
            x = {k: e[k] for k in spec.models.inputs} | {f.name: i % 7 for f in spec.features}
            model.learn_one(x, e["amount"] > 200)
        version = registry.publish(candidate.name, model, {})
        versions.append(ChampionPointer(candidate.name, version))
    assert len({v.model for v in versions}) == 2
    scorer.process(messages[:100])  # first use: scripts loaded, connections made
    gc.collect()
    gc.disable()
    try:
        for i in range(100, 1200, 100):
            if i in (500, 900, 1000):  # the scorer loads each new champion, drops the old
                registry.promote(versions[i == 900])
                scorer.champion.refresh(force=True)
            if i == 700:
                other.process(messages[i : i + 100])
                continue
            batch = messages[i : i + 100] + [Message(topic, 1, i + j, None, v)
                                             for j, v in enumerate(bad)]  # fmt: skip
            scorer.process(batch)
        served = ChampionPointer(scorer.champion.name, scorer.champion.version)
        assert served == versions[0]
        assert store.batches["refused"] >= 1 and store.batches["server"] >= 1
        assert store.batches["in_process"] >= 5
        assert scorer.counters.dead_letters == 4 * 10
        found = gc.collect()
    finally:
        gc.enable()
    assert found == 0, f"{found} objects in reference cycles: the frozen heap would keep them"
