"""The Kafka runtime: one stage per process (confluent-kafka loop or Faust), state in Redis."""

from __future__ import annotations

import logging
from collections.abc import Callable

from monitors.exporter import StageMetrics, serve
from riverflow.assembly import (
    build_learner,
    build_scorer,
    redis_backends,
    redis_client,
    uses_dev_key,
)
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.stack import Endpoints
from streams.confluent_host import ConfluentHost
from streams.contracts import Processor
from streams.faust_app import run_worker, stage_app
from streams.kafka_io import ensure_topics

log = logging.getLogger(__name__)
METRICS_PORTS = {"scorer": 9401, "learner": 9402}


def run_stage(stage: str, spec: PipelineSpec, settings: Settings, ep: Endpoints) -> None:
    """Run ``scorer`` or ``learner`` until SIGTERM / Ctrl-C."""
    if uses_dev_key(settings):
        log.warning("RIVERFLOW_SIGNING_KEY is the development default: set your own key")
    topics = spec.topics
    ensure_topics(
        ep.kafka_bootstrap, topics.all(), settings.partitions, settings.replication_factor
    )
    store, registry = redis_backends(spec, settings, redis_client(settings, ep.redis_url))
    group = f"riverflow-{spec.name}-{stage}"
    processor: Processor
    on_stop: Callable[[], None] | None = None
    tick_s: float | None = None
    if stage == "scorer":
        processor = build_scorer(spec, settings, store, registry)
        source = topics.events
        # follow the champion (and keep /healthz fresh) while the stream is quiet too
        tick_s = settings.model_poll_s
    elif stage == "learner":
        learner = processor = build_learner(spec, settings, store, registry)
        source = topics.labels
        tick_s = max(settings.label_wait_s / 4, 0.2)  # retries labels waiting for their event

        def on_stop() -> None:
            if learner.learned and learner.snapshot_every:
                learner.publish()

    else:
        raise ValueError(f"unknown stage {stage!r} (scorer or learner)")
    metrics = StageMetrics(stage)
    port = METRICS_PORTS[stage] if settings.metrics_port is None else settings.metrics_port
    if port:
        serve(metrics, port, settings.metrics_host)
    log.info("%s on %s (%s host), metrics on :%s", stage, source, settings.host, port or "-")
    if settings.host == "confluent":
        ConfluentHost(
            processor, source, ep.kafka_bootstrap, group, settings.batch_size,
            tick_s=tick_s, on_stop=on_stop, metrics=metrics, dlq_topic=topics.dlq,
        ).run()  # fmt: skip
    else:
        app = stage_app(
            processor, source, ep.kafka_bootstrap, group, settings.batch_size,
            settings.batch_timeout_s, tick_s=tick_s, on_stop=on_stop, metrics=metrics,
            dlq_topic=topics.dlq,
        )  # fmt: skip
        run_worker(app)
