"""The Kafka runtime: one stage per process, state in Redis.

The scorer is hosted by Faust (consumer group, scales by partitions); the learner
by a confluent-kafka loop that reads from the positions saved in its checkpoint.
"""

from __future__ import annotations

import logging
import math

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
from streams.contracts import Output
from streams.faust_app import run_worker, stage_app
from streams.kafka_io import ensure_topics
from streams.learner_host import run_learner_loop

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
    if stage == "scorer":
        scorer = build_scorer(spec, settings, store, registry)
        run_worker(stage_app(
            scorer, topics.events, ep.kafka_bootstrap, f"riverflow-{spec.name}-scorer",
            settings.batch_size, settings.batch_timeout_s,
        ))  # fmt: skip
    elif stage == "learner":
        learner = build_learner(spec, settings, store, registry)

        def publish_on_stop() -> list[Output]:
            publishing = settings.snapshot_every_labels or settings.snapshot_every_s
            return learner.publish() if publishing and learner.has_unpublished() else []

        # ticks retry waiting labels and take the timed snapshots
        tick_s = max(0.2, min(settings.label_wait_s / 4, settings.snapshot_every_s or math.inf))
        run_learner_loop(
            learner, topics.labels, ep.kafka_bootstrap, settings.batch_size,
            settings.batch_timeout_s, tick_s, publish_on_stop,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown stage {stage!r} (scorer or learner)")
