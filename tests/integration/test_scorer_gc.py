"""The scorer freezes its heap after every batch (``HostSettings(freeze_gc=True)``),
so the cyclic GC never collects what outlives a batch. That is safe only while
the scorer's steady state makes no reference cycle: here it runs its batches on
real Redis, with new champion versions (a tree, a pipeline), bad messages, a
refused commit and the server path, and the cyclic GC, off meanwhile, then finds nothing to collect.

The scorer runs in a process of its own, as ``riverflow run scorer`` does: the cyclic GC
sees the whole heap, and threads other tests left in the pytest worker (servers, clients)
would count their garbage against the scorer's.
"""

from __future__ import annotations

import collections
import gc
import subprocess
import sys
import uuid
from typing import Any

import orjson
import redis

from riverflow.assembly import build_scorer, redis_backends
from riverflow.models.factory import build_model
from riverflow.models.registry import ChampionPointer
from riverflow.settings import DEFAULT_SPEC, Settings
from riverflow.spec import load_spec
from riverflow.streams.contracts import Message
from riverflow.tools.generator import FraudStreamConfig, transactions
from riverflow.tools.stack import Endpoints


def steady_state(redis_url: str) -> dict[str, Any]:
    """The scorer's batches with the cyclic GC off; what it then collects, by type."""
    redis_client = redis.Redis.from_url(redis_url)
    settings = Settings(label_wait_s=0.0, snapshot_every_labels=1000)
    spec = load_spec(DEFAULT_SPEC).model_copy(update={"name": f"gc-{uuid.uuid4().hex[:8]}"})
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
        gc.set_debug(gc.DEBUG_SAVEALL)  # what it finds stays in gc.garbage, to be named
        found = gc.collect()
    finally:
        gc.set_debug(0)
        gc.enable()
    kinds = collections.Counter(type(o).__qualname__ for o in gc.garbage)
    return {"found": found, "kinds": kinds.most_common(12)}


def test_a_scorer_makes_no_garbage_cycle_in_its_steady_state(stack: Endpoints) -> None:
    run = subprocess.run(
        [sys.executable, __file__, stack.redis_url], capture_output=True, timeout=300
    )
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    result = orjson.loads(run.stdout.splitlines()[-1])
    assert result["found"] == 0, (
        f"{result['found']} objects in reference cycles: the frozen heap would keep them "
        f"(most: {result['kinds']})"
    )


if __name__ == "__main__":
    sys.stdout.write(orjson.dumps(steady_state(sys.argv[1])).decode() + "\n")
