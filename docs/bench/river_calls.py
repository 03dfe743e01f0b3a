"""How much River work the embedded runtime does beside the bench's limit (not project code).

The bench's limit (``riverflow bench``, ``measure_limit``) is every candidate's predict +
learn once per event. The embedded runtime does more River work than that by design: the
scorer's champion predicts once more per event to serve it, and a challenger that the
monitor starts on a drift alarm learns too. This script counts River's calls in the
embedded drain of the bench's stream (``bench.stream(30000, 11)``, fraud-bench), times
the limit's parts in the same process, and prints the ratio an embedded runtime would
reach if everything but River cost nothing::

    python docs/bench/river_calls.py
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
from river import compose, linear_model, tree

from riverflow.embedded import EmbeddedRuntime
from riverflow.settings import Settings
from riverflow.spec import load_spec
from riverflow.tools import bench

CALLS: Counter[tuple[str, str]] = Counter()


def counted(cls: type, name: str) -> None:
    call: Callable[..., Any] = getattr(cls, name)

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        CALLS[cls.__name__, name] += 1
        return call(self, *args, **kwargs)

    setattr(cls, name, wrapper)


def main() -> None:
    spec = load_spec("examples/fraud-bench.yaml")
    events, labels = bench.stream(30_000, 11)
    limit = bench.measure_limit(spec, events, labels)
    for cls in (tree.HoeffdingTreeClassifier, linear_model.LogisticRegression, compose.Pipeline):
        for name in ("learn_one", "predict_proba_one"):
            if name in cls.__dict__:
                counted(cls, name)
    settings = Settings().model_copy(update={"snapshot_every_labels": 0, "label_wait_s": 0})
    rt = EmbeddedRuntime(spec, settings, retain=())
    for e in events:
        rt.produce(rt.topics.events, e[spec.events.key].encode(), orjson.dumps(e))
    for lab in labels:
        rt.produce(rt.topics.labels, lab["event_id"].encode(), orjson.dumps(lab))
    rt.drain()
    n = len(events)
    limit_us = 1e6 / limit["predict_learn_events_per_s"]  # every candidate, per event
    champion_us = 1e6 / limit["champion_predict_learn_events_per_s"]  # the tree alone
    predict_us = 1e6 / limit["predict_only_events_per_s"]  # the tree's predict alone
    trees_learned = CALLS["HoeffdingTreeClassifier", "learn_one"]
    trees_predicted = CALLS["HoeffdingTreeClassifier", "predict_proba_one"]
    for (cls_name, name), calls in sorted(CALLS.items()):
        print(f"{cls_name}.{name}: {calls:,} ({calls / n:.2f} an event)")
    # beyond the limit's one predict + learn of each candidate: the trees learned more
    # (a challenger), and the trees predicted more than they learned (the scorer's serve)
    extra_us = (trees_learned - n) / n * champion_us
    extra_us += (trees_predicted - trees_learned) / n * predict_us
    print(f"limit {limit_us:.1f} µs an event; River work beyond it in the drain "
          f"~{extra_us:.1f} µs (challenger trees, the scorer's predict)")  # fmt: skip
    ceiling = limit_us / (limit_us + extra_us)
    print(
        f"embedded ceiling with nothing but River: {ceiling:.2f} of the limit; at 0.6, "
        f"{limit_us / 0.6 - limit_us - extra_us:.1f} µs an event left for all the rest"
    )


if __name__ == "__main__":
    main()
