"""The Kafka runtime: one stage per process, hosted by Faust, state in Redis."""

from __future__ import annotations

import logging

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
from streams.faust_app import run_worker, stage_app
from streams.kafka_io import ensure_topics

log = logging.getLogger(__name__)


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
    if stage == "scorer":
        scorer = build_scorer(spec, settings, store, registry)
        app = stage_app(
            scorer, topics.events, ep.kafka_bootstrap, group,
            settings.batch_size, settings.batch_timeout_s,
        )  # fmt: skip
    elif stage == "learner":
        learner = build_learner(spec, settings, store, registry)

        def publish_on_stop() -> None:
            if learner.learned and learner.snapshot_every:
                learner.publish()

        app = stage_app(
            learner, topics.labels, ep.kafka_bootstrap, group,
            settings.batch_size, settings.batch_timeout_s,
            tick_s=max(settings.label_wait_s / 4, 0.2), on_stop=publish_on_stop,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown stage {stage!r} (scorer or learner)")
    run_worker(app)
