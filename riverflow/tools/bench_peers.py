"""Two peers ``riverflow bench`` runs beside the scorer, each as a process of its own.

- **bare**: the transport-plus-model limit. confluent-kafka batches of up to
  1,000 -> orjson decode -> the champion's ``predict_proba_one`` on the raw event
  fields the spec gives it (``models.inputs``; no features) -> produce a small
  JSON prediction, one flush and one commit per batch. No Redis, no learner, no
  feature store: what no scorer of this spec on this broker can beat by much.
- **textbook**: a Faust agent as tutorials write it: ``async for event in
  stream``, per event one awaited Redis call (a pipeline: the card's running count
  and sum, updated and read back), a River prediction, an awaited send.

Both score with the spec's champion, trained first on a few thousand generated
events (a tree of a few levels, not a lone leaf), and write
``{"event_id", "score", "scored_at"}`` to their sink topic, which is what the
bench's ``PredictionClock`` reads. They are tools, not stages: they keep no
state worth keeping and know only the generator's events.

``python -m riverflow.tools.bench_peers {bare,textbook} --spec ... --bootstrap ...``
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer

from riverflow.models.champion import positive_probability
from riverflow.models.factory import build_model
from riverflow.spec import PipelineSpec, load_spec
from riverflow.streams.kafka_io import client_config, producer
from riverflow.streams.schema import FieldType
from riverflow.tools.generator import FraudStreamConfig, with_labels

log = logging.getLogger(__name__)
PEERS = ("bare", "textbook")
TRAINING_EVENTS = 5_000  # the fraud-bench tree has ~9 nodes, 3 levels, after these
TRAINING_SEED = 97  # not the bench's seed: the peers score events they never learned
Features = Callable[[dict[str, Any]], dict[str, Any]]


def raw_inputs(spec: PipelineSpec) -> Features:
    """The event fields the spec feeds its models, taken as they come (no features)."""
    inputs = tuple(spec.models.inputs)
    return lambda event: {name: event[name] for name in inputs}


def summed_field(spec: PipelineSpec) -> str:
    """The numeric model input whose per-card sum the textbook agent keeps."""
    fields = spec.events.fields
    for name in spec.models.inputs:
        if fields[name] in (FieldType.FLOAT, FieldType.INT):
            return name
    raise ValueError(f"spec {spec.name!r}: the textbook peer sums a numeric models.input; none")


def trained_champion(spec: PipelineSpec, features: Features, events: int = TRAINING_EVENTS) -> Any:
    """The spec's champion after learning ``events`` generated events with their labels."""
    model: Any = build_model(spec.models.champion_spec)
    waiting: dict[str, dict[str, Any]] = {}
    event_id, label = spec.events.event_id, spec.label.field
    for kind, rec in with_labels(events, FraudStreamConfig(seed=TRAINING_SEED, drift_at=())):
        if kind == "event":
            waiting[rec[event_id]] = features(rec)
        else:
            model.learn_one(waiting.pop(rec[spec.label.event_id]), rec[label])
    return model


def prediction(event_id: str, score: float) -> bytes:
    return orjson.dumps({"event_id": event_id, "score": score, "scored_at": time.time()})


def run_bare(
    spec: PipelineSpec, bootstrap: str, source: str, sink: str, group: str,
    batch_size: int = 1_000,
) -> None:  # fmt: skip
    """Score ``source`` into ``sink`` until SIGTERM or SIGINT."""
    x_of = raw_inputs(spec)
    model = trained_champion(spec, x_of)
    event_id = spec.events.event_id
    consumer = Consumer(
        {**client_config(bootstrap), "group.id": group, "enable.auto.commit": False,
         "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10}
    )  # fmt: skip
    consumer.subscribe([source])
    prod = producer(bootstrap)  # the scorer's producer settings (linger, idempotence)
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    loads, produce = orjson.loads, prod.produce
    try:
        while not stopping:
            batch = consumer.consume(batch_size, timeout=0.1)
            for msg in batch:
                if msg.error() is not None:
                    log.warning("bare peer: %s", msg.error())
                    continue
                event = loads(msg.value())  # type: ignore[arg-type]
                score = positive_probability(model, x_of(event))
                produce(sink, prediction(event[event_id], score), msg.key())
            if batch:
                if prod.flush(30):  # the batch's predictions acknowledged, then its offsets
                    raise RuntimeError("bare peer: predictions unacknowledged after 30 s")
                consumer.commit(asynchronous=True)
    finally:
        prod.flush(10)
        consumer.close()


def textbook_app(
    spec: PipelineSpec, bootstrap: str, redis_url: str, source: str, sink: str, group: str,
    datadir: Path,
) -> Any:  # fmt: skip
    """A faust-streaming app as a tutorial writes it (see the module's docstring).

    Redis keys: ``{group}:card:{key}`` hashes (``count``, ``sum``); the bench
    deletes them after the run (``forget_textbook_state``).
    """
    import faust
    import redis.asyncio as aioredis

    key, event_id, amount = spec.events.key, spec.events.event_id, summed_field(spec)
    x_raw = raw_inputs(spec)
    totals: dict[str, tuple[int, float]] = {}

    def training_features(event: dict[str, Any]) -> dict[str, Any]:
        count, total = totals.get(event[key], (0, 0.0))
        totals[event[key]] = count + 1, total + event[amount]
        return {**x_raw(event), "count": count + 1, "sum": total + event[amount]}

    model = trained_champion(spec, training_features)
    app = faust.App(
        group,
        broker=f"kafka://{bootstrap}",
        value_serializer="json",
        datadir=str(datadir),
        store="memory://",
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
    )
    events_topic = app.topic(source)
    predictions_topic = app.topic(sink)
    r = aioredis.from_url(redis_url)

    @app.agent(events_topic)
    async def score(stream: Any) -> None:
        async for event in stream:
            card = f"{group}:card:{event[key]}"
            pipe = r.pipeline(transaction=False)
            pipe.hincrby(card, "count", 1)
            pipe.hincrbyfloat(card, "sum", event[amount])
            count, total = await pipe.execute()
            x = {**x_raw(event), "count": count, "sum": float(total)}
            p = positive_probability(model, x)
            await predictions_topic.send(
                key=event[key].encode(),
                value={"event_id": event[event_id], "score": p, "scored_at": time.time()},
            )

    return app


def forget_textbook_state(redis_url: str, group: str) -> int:
    """Delete the textbook agent's per-card hashes of ``group``; returns how many."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{group}:card:*", count=1_000))
        for i in range(0, len(keys), 1_000):
            client.delete(*keys[i : i + 1_000])
        return len(keys)
    finally:
        client.close()


def peer_command(
    peer: str, spec_file: Path, bootstrap: str, source: str, sink: str, group: str,
    redis_url: str = "", datadir: Path | None = None,
) -> list[str]:  # fmt: skip
    """The command line that runs ``peer`` as a process of its own."""
    if peer not in PEERS:
        raise ValueError(f"no bench peer {peer!r}; known: {', '.join(PEERS)}")
    cmd = [sys.executable, "-m", "riverflow.tools.bench_peers", peer, "--spec", str(spec_file),
           "--bootstrap", bootstrap, "--source", source, "--sink", sink,
           "--group", group]  # fmt: skip
    if redis_url:
        cmd += ["--redis", redis_url]
    if datadir is not None:
        cmd += ["--datadir", str(datadir)]
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="riverflow.tools.bench_peers", description=__doc__)
    parser.add_argument("peer", choices=PEERS)
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--source", required=True, help="the events topic")
    parser.add_argument("--sink", required=True, help="the topic predictions go to")
    parser.add_argument("--group", required=True, help="consumer group (and Redis key prefix)")
    parser.add_argument("--redis", default="", help="textbook: the Redis URL")
    parser.add_argument("--datadir", type=Path, help="textbook: Faust's data directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    spec = load_spec(args.spec)
    if args.peer == "bare":
        run_bare(spec, args.bootstrap, args.source, args.sink, args.group)
        return 0
    if not args.redis:
        parser.error("textbook: --redis is required")
    from riverflow.streams.faust_app import run_worker

    datadir = args.datadir or Path(f"{args.group}-data")
    datadir.mkdir(parents=True, exist_ok=True)
    app = textbook_app(
        spec, args.bootstrap, args.redis, args.source, args.sink, args.group, datadir
    )
    run_worker(app)
    return 0


if __name__ == "__main__":
    sys.exit(main())
