"""The Kafka runtime: one stage per process, state in Redis.

The scorer runs on a confluent-kafka loop in a consumer group (it scales by
partitions), or on Faust with ``RIVERFLOW_HOST=faust``. The learner always runs
on the confluent-kafka loop, reading every label partition from the positions
saved in its checkpoint (one learner per pipeline: River models learn in order).
"""

from __future__ import annotations

import gc
import logging
import math
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any, Protocol

from pydantic import ValidationError

from riverflow.assembly import (
    build_learner,
    build_monitor,
    build_scorer,
    label_feature_store,
    redis_backends,
    redis_client,
    through_outage,
    uses_dev_key,
)
from riverflow.errors import RiverflowError
from riverflow.features.scored import DiskScoredIndex, FollowedIndex
from riverflow.monitors.exporter import MonitorMetrics, StageMetrics, serve
from riverflow.settings import DEV_PII_KEY, Settings
from riverflow.spec import PipelineSpec
from riverflow.stages.audit import WINDOW_S, AuditReconciler
from riverflow.stages.common import guarded
from riverflow.stages.timeouts import Timeouts, label_timeout
from riverflow.streams.confluent_host import Checkpointing, ConfluentHost
from riverflow.streams.contracts import ModelEvent, Output, Processor
from riverflow.streams.faust_app import run_worker, stage_app
from riverflow.streams.guard import Guard
from riverflow.streams.hosting import HostSettings
from riverflow.streams.kafka_io import (
    GroupProgress,
    KafkaIOError,
    ReadProgress,
    TopicFollower,
    check_access,
    ensure_topics,
    read_topic,
    topic_retention,
)
from riverflow.streams.trailing import TrailingReader

log = logging.getLogger(__name__)
METRICS_PORTS = {"scorer": 9401, "learner": 9402, "monitor": 9403}
AUDIT_EVERY_S = 60.0  # how often the monitor looks for versions and moves the audit log lacks
WEEK_MS = 7 * 24 * 3600 * 1000  # Kafka's default retention


class Servers(Protocol):
    """Where a stage finds Kafka and Redis (the local stack's ``Endpoints``, or the
    servers the settings name): the runtime needs nothing else of the tools."""

    @property
    def kafka_bootstrap(self) -> str: ...

    @property
    def redis_url(self) -> str: ...


def freeze_startup_heap() -> None:
    """Keep what startup built (modules, spec, models) out of every later GC pass.

    A full collection walks every tracked object: ~120,000 after startup, ~100 ms
    of CPU on our 2-core machine, a pause every event in flight waits through
    (the scorer's p99 at 1,000 events/s, docs/benchmarks.md). The cyclic GC skips
    frozen objects; reference counting still frees them, so what leaks is only a
    cycle among startup's objects dropped later (e.g. a restored model replaced).
    """
    gc.collect()
    gc.freeze()


def instance_id(stage: str, settings: Settings) -> str | None:
    """This process's static membership id: ``RIVERFLOW_INSTANCE_ID``, or one derived
    from what stays the same when the process restarts on the same host: the stage,
    the hostname and the metrics port (two stages of one kind on one host already
    need two ports). With the metrics port off and no id set: None (a dynamic
    member), since two such processes on one host would take each other's id."""
    if settings.instance_id:
        return settings.instance_id
    port = METRICS_PORTS.get(stage, 0) if settings.metrics_port is None else settings.metrics_port
    return f"{stage}-{socket.gethostname()}-{port}" if port else None


def host_settings(
    stage: str, spec: PipelineSpec, settings: Settings, ep: Servers, tick_s: float
) -> HostSettings:
    """How ``stage`` runs on the confluent-kafka loop: its own consumer group (a static
    member of it, except the learner, which reads from its checkpoint), and (the scorer
    only) its heap frozen after every batch and transactions with ``exactly_once``."""
    return HostSettings(
        ep.kafka_bootstrap, f"riverflow-{spec.name}-{stage}", settings.batch_size,
        tick_s=tick_s, dlq_topic=spec.topics.dlq, freeze_gc=stage == "scorer",
        linger_s=settings.batch_linger_s,
        instance_id=None if stage == "learner" else instance_id(stage, settings),
        session_timeout_s=settings.session_timeout_s,
        max_poll_interval_s=settings.max_poll_interval_s,
        commit_interval_s=settings.commit_interval_s,
        exactly_once=stage == "scorer" and settings.processing_guarantee == "exactly_once",
        transaction_timeout_s=settings.transaction_timeout_s,
        transaction_interval_s=settings.transaction_interval_s,
        write_timeout_s=settings.outage_limit_s,
    )  # fmt: skip


def check_guarantee(settings: Settings) -> None:
    """Refuse what the settings ask and the host cannot give."""
    if settings.processing_guarantee == "exactly_once" and settings.host == "faust":
        raise RiverflowError(
            "RIVERFLOW_PROCESSING_GUARANTEE=exactly_once needs the confluent host: the Faust "
            "host gives at least once only (unset RIVERFLOW_HOST or set it to confluent)"
        )


def ensure_pipeline_topics(
    bootstrap: str, spec: PipelineSpec, settings: Settings, client: Mapping[str, Any] | None = None
) -> list[str]:
    """Create the pipeline's topics that do not exist yet (``client``: as another
    identity than the process's, e.g. an admin). The predictions topic keeps its
    records at least the label horizon (and Kafka's default week): the learner
    builds its index of scored events from it, again from the start if the index is
    lost, so a label is joined only while its prediction is still on the topic."""
    keep_ms = max(WEEK_MS, int(settings.label_horizon_s * 1000))
    return ensure_topics(
        bootstrap, spec.topics.all(), settings.partitions, settings.replication_factor,
        configs={spec.topics.predictions: {"retention.ms": str(keep_ms)}}, client=client,
    )  # fmt: skip


def retention_problem(bootstrap: str, topic: str, horizon_s: float) -> str | None:
    """What is wrong, if anything, with ``topic``'s retention for a label horizon of
    ``horizon_s``: a time shorter than the horizon, or a size bound (either may delete
    a prediction before its label comes, if the learner's index must be rebuilt)."""
    keep_ms, keep_bytes = topic_retention(bootstrap, topic)
    if 0 <= keep_ms < horizon_s * 1000:
        return (
            f"topic {topic} keeps records {keep_ms / 3_600_000:g} h (retention.ms={keep_ms}), "
            f"less than the label horizon of {horizon_s / 3600:g} h "
            "(RIVERFLOW_LABEL_HORIZON_S)"
        )
    if keep_bytes >= 0:
        return (
            f"topic {topic} deletes records past {keep_bytes} bytes a partition "
            "(retention.bytes), whatever their age"
        )
    return None


def label_timeouts(
    spec: PipelineSpec, settings: Settings, ep: Servers, scored: FollowedIndex
) -> Timeouts | None:
    """The learner's labels by timeout (``riverflow.stages.timeouts``), if the spec's
    label has them: a reader trailing the predictions topic, never past what the
    index of scored events has read."""
    timeout = label_timeout(spec.label, settings.label_horizon_s)
    if timeout is None:
        return None
    follower = scored.follower
    assert isinstance(follower, TopicFollower)
    reader = through_outage(
        lambda: TrailingReader(ep.kafka_bootstrap, spec.topics.predictions,
                               settings.label_horizon_s),
        settings.outage_limit_s, f"Kafka at {ep.kafka_bootstrap}",
    )  # fmt: skip
    log.info("learner: a scored event without a label within %g s is labelled %r",
             timeout.after_s, timeout.default)  # fmt: skip
    return Timeouts(
        timeout, reader, lambda: follower.at, clock=time.time, limit=10 * settings.batch_size
    )


def scored_index(spec: PipelineSpec, settings: Settings, ep: Servers) -> FollowedIndex:
    """The learner's index of scored events (``features.scored``): on disk at
    ``scored_dir``, kept up to date with the predictions topic."""
    where = settings.scored_dir or settings.cache_dir / "scored" / spec.name
    index = DiskScoredIndex(where, settings.label_horizon_s)
    follower = through_outage(
        lambda: TopicFollower(
            ep.kafka_bootstrap, spec.topics.predictions, index, settings.label_horizon_s,
            max_per_call=50 * settings.batch_size,
        ),
        settings.outage_limit_s, f"Kafka at {ep.kafka_bootstrap}",
    )  # fmt: skip
    log.info("learner: scored events indexed at %s, from %s", where, spec.topics.predictions)
    try:
        problem = retention_problem(
            ep.kafka_bootstrap, spec.topics.predictions, settings.label_horizon_s
        )
    except KafkaIOError as exc:  # e.g. no DescribeConfigs right: say so, go on
        log.warning("learner: could not check the predictions topic's retention: %s", exc)
    else:
        if problem:
            log.warning(
                "learner: %s: a label whose prediction Kafka deleted is orphaned if the "
                "index at %s has to be rebuilt; raise the topic's retention", problem, where,
            )  # fmt: skip
    return FollowedIndex(index, follower)


def audit_window_s(bootstrap: str, topic: str) -> float:
    """How far back a starting monitor looks for versions and pointer moves the audit
    log lacks: a day, or an hour less than what ``topic`` keeps by time (a record older
    than that would be found missing from a log that deleted it, and written again).
    A size bound, if it has one, is not known to keep a day: then an hour."""
    try:
        keep_ms, keep_bytes = topic_retention(bootstrap, topic)
    except KafkaIOError as exc:
        log.warning("monitor: %s; the audit log is checked an hour back", exc)
        return 3_600.0
    if keep_bytes >= 0:
        return 3_600.0
    if keep_ms < 0:
        return WINDOW_S
    return max(0.0, min(WINDOW_S, keep_ms / 1000 - 3_600.0))


def logged_model_events(bootstrap: str, spec: PipelineSpec, since_s: float) -> Iterator[ModelEvent]:
    """The records of ``{ns}.model-events`` of the last ``since_s`` seconds (to its end
    as it is now); one that is not a model-event is passed over."""
    for msg in read_topic(bootstrap, spec.topics.model_events, idle_s=0.0, since_s=since_s):
        try:
            yield ModelEvent.decode(msg.value() or b"")
        except ValidationError:
            continue


def run_stage(stage: str, spec: PipelineSpec, settings: Settings, ep: Servers) -> None:
    """Run ``scorer``, ``learner`` or ``monitor`` until SIGTERM / Ctrl-C."""
    if stage not in METRICS_PORTS:
        raise ValueError(f"unknown stage {stage!r} (scorer, learner or monitor)")
    check_guarantee(settings)
    if uses_dev_key(settings):
        log.warning("RIVERFLOW_SIGNING_KEY is the development default: set your own key")
    if stage == "scorer" and spec.events.pii and settings.pii_key.get_secret_value() == DEV_PII_KEY:
        log.warning("RIVERFLOW_PII_KEY is the development default: anyone with the source can "
                    "test a token against a guess; set your own key")  # fmt: skip
    topics = spec.topics
    # a refused login or certificate stops the stage at once, in one line; a broker
    # that is down is waited for
    through_outage(lambda: check_access(ep.kafka_bootstrap), settings.outage_limit_s,
                   f"Kafka at {ep.kafka_bootstrap}")  # fmt: skip
    through_outage(  # a broker that is down at startup is waited for, as later
        lambda: ensure_pipeline_topics(ep.kafka_bootstrap, spec, settings),
        settings.outage_limit_s, f"Kafka at {ep.kafka_bootstrap}",
    )  # fmt: skip
    # a Redis that is down at startup is waited for, as it is later (streams.guard)
    client = redis_client(settings, ep.redis_url, settings.outage_limit_s)
    store, registry = redis_backends(spec, settings, client)
    if stage == "scorer":  # a spec that would misread the stored entity state stops here
        through_outage(store.check_layout, settings.outage_limit_s, "Redis")
        store.check_server()
    # label-fed features: the learner writes them, the scorer reads them
    labelled = label_feature_store(spec, settings, client) if stage != "monitor" else None
    if labelled is not None:
        through_outage(labelled.check_layout, settings.outage_limit_s, "Redis")
    metrics = StageMetrics(stage)

    def guard(processor: Processor) -> Guard:  # internal errors to the DLQ, outages waited out
        return guarded(processor, topics, settings.outage_limit_s, settings.dlq_keep_bytes, metrics)

    port = METRICS_PORTS[stage] if settings.metrics_port is None else settings.metrics_port
    host = settings.host if stage == "scorer" else "confluent"
    log.info("%s on %s host, metrics on :%s", stage, host, port or "-")
    if stage == "scorer":
        log.info("scorer: %s, group instance %s", settings.processing_guarantee,
                 instance_id(stage, settings) if host == "confluent" else "- (faust)")  # fmt: skip
    if stage == "monitor":
        audit = AuditReconciler(
            registry, lambda since_s: logged_model_events(ep.kafka_bootstrap, spec, since_s),
            settings.audit_grace_s, min(AUDIT_EVERY_S, settings.audit_grace_s),
            window_s=audit_window_s(ep.kafka_bootstrap, topics.model_events),
        )  # fmt: skip
        monitor = build_monitor(
            spec, registry, MonitorMetrics(metrics.registry), settings.dlq_keep_bytes,
            audit=audit,
        )  # fmt: skip
        if port:  # with the status page: /, /status.json
            serve(metrics, port, settings.metrics_host, view=monitor.view)
        freeze_startup_heap()
        # ticks re-read the champion pointer and retire stale challengers while quiet
        ConfluentHost(
            guard(monitor), [topics.evaluations, topics.predictions],
            host_settings(stage, spec, settings, ep, settings.model_poll_s), metrics=metrics,
        ).run()  # fmt: skip
        return
    if port:
        serve(metrics, port, settings.metrics_host)
    if stage == "scorer":
        scorer = build_scorer(spec, settings, store, registry, label_features=labelled)
        # ticks follow the champion (and keep /healthz fresh) while the stream is quiet
        loop = host_settings(stage, spec, settings, ep, settings.model_poll_s)
        freeze_startup_heap()
        if host == "faust":
            faust_loop = replace(loop, poll_s=settings.batch_timeout_s)
            datadir = str(settings.cache_dir / "faust" / loop.group)
            run_worker(stage_app(guard(scorer), topics.events, faust_loop, metrics, datadir))
        else:
            ConfluentHost(guard(scorer), topics.events, loop, metrics=metrics).run()
        return
    # labels wait for their events while the scorer group has not caught up on them
    scorer_group = host_settings("scorer", spec, settings, ep, settings.model_poll_s).group
    progress = GroupProgress(
        ep.kafka_bootstrap, scorer_group, topics.events, settings.scorer_progress_poll_s
    )
    scored = scored_index(spec, settings, ep)
    timeouts = label_timeouts(spec, settings, ep, scored)
    learner = through_outage(
        lambda: build_learner(spec, settings, store, registry, scored, scored_through=progress,
                              timeouts=timeouts, label_features=labelled),
        settings.outage_limit_s, "restoring the learner",
    )  # fmt: skip

    if timeouts is not None:  # a default waits for the labels produced before it to be read
        timeouts.labels_read = ReadProgress(
            ep.kafka_bootstrap, topics.labels, lambda: learner.positions,
            settings.scorer_progress_poll_s, settle_s=settings.labels_settle_s,
        )  # fmt: skip

    def publish_on_stop() -> list[Output]:
        publishing = settings.snapshot_every_labels or settings.snapshot_every_s
        return learner.publish() if publishing and learner.has_unpublished() else []

    def commit() -> None:
        # (running: a refusal is an ACL changed under the stage, waited out as the guard does)
        through_outage(learner.commit, settings.outage_limit_s, "saving the checkpoint",
                       refusals_wait=True)  # fmt: skip

    freeze_startup_heap()
    # ticks retry waiting labels, take the timed snapshots and label by timeout: at least
    # every second then, so 10 x batch_size defaults a tick keep up with the events
    # when few label messages come (fraud)
    by_timeout = math.inf if timeouts is None else min(1.0, timeouts.timeout.after_s / 4)
    tick_s = max(
        0.2, min(settings.label_wait_s / 4, settings.snapshot_every_s or math.inf, by_timeout)
    )
    loop = host_settings(stage, spec, settings, ep, tick_s)
    ConfluentHost(
        guard(learner), topics.labels, loop, metrics=metrics,
        checkpoint=Checkpointing(learner.positions, commit, on_stop=publish_on_stop),
    ).run()  # fmt: skip
