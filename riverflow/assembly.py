"""Build the processors of a pipeline from its spec and settings.

Both runtimes assemble their stages here, from different stores and registries.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from riverflow.errors import RiverflowError, refusal
from riverflow.features.labelled import LabelFeatures
from riverflow.features.scored import ScoredEvents
from riverflow.features.store import FeatureStore, MemoryFeatureStore, RedisFeatureStore
from riverflow.models.champion import ChampionReplica
from riverflow.models.factory import build_candidates, build_model, candidate_spec, search_plan
from riverflow.models.registry import MemoryRegistry, ModelRegistry, ModelVersion, RedisRegistry
from riverflow.models.search import SuccessiveHalving
from riverflow.models.signing import Keyring
from riverflow.models.target import Target
from riverflow.monitors.exporter import MonitorMetrics
from riverflow.monitors.history import MonitorHistory
from riverflow.monitors.policy import PipelineMonitor
from riverflow.monitors.prequential import PrequentialMetrics, metrics_for
from riverflow.settings import DEV_SIGNING_KEY, Settings
from riverflow.spec import PipelineSpec
from riverflow.stages.audit import AuditReconciler
from riverflow.stages.common import DLQ_KEEP_BYTES
from riverflow.stages.learner import LabelJoin, Learner, LearnerTiming, ScoredThrough
from riverflow.stages.lineage import Candidate, Following, Lineage
from riverflow.stages.monitor import Monitor
from riverflow.stages.quality import DataQuality
from riverflow.stages.scorer import Scorer
from riverflow.stages.search import Searches
from riverflow.stages.timeouts import Timeouts
from riverflow.streams.guard import FIRST_BACKOFF_S, MAX_BACKOFF_S, outage
from riverflow.streams.pii import Pseudonymizer
from riverflow.streams.validation import Bounds

log = logging.getLogger(__name__)


class ConnectionFailed(RiverflowError):
    """A server named in the settings cannot be reached."""


class Refused(ConnectionFailed):
    """Redis refused the stage's user at startup (a password, an ACL): not waited for."""


def signing_key(settings: Settings) -> Keyring:
    """The keyring models and checkpoints are signed and verified with: the signing key
    under its id, and the older keys that still verify (``verification_keys``)."""
    older = {k: v.get_secret_value().encode() for k, v in settings.verification_keys.items()}
    return Keyring(settings.signing_key_id, settings.signing_key.get_secret_value().encode(), older)


def uses_dev_key(settings: Settings) -> bool:
    return settings.signing_key.get_secret_value() == DEV_SIGNING_KEY


def kafka_security(settings: Settings) -> dict[str, Any]:
    """librdkafka's security settings from ``RIVERFLOW_KAFKA_*`` (none for PLAINTEXT)."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return {}
    out: dict[str, Any] = {"security.protocol": protocol}
    if protocol.startswith("SASL"):
        password = settings.kafka_sasl_password
        out["sasl.mechanism"] = settings.kafka_sasl_mechanism
        out["sasl.username"] = settings.kafka_sasl_username
        out["sasl.password"] = password.get_secret_value() if password else ""
    if protocol.endswith("SSL"):
        if settings.kafka_ssl_ca_file is not None:
            out["ssl.ca.location"] = str(settings.kafka_ssl_ca_file)
        if settings.kafka_ssl_cert_file is not None and settings.kafka_ssl_key_file is not None:
            out["ssl.certificate.location"] = str(settings.kafka_ssl_cert_file)
            out["ssl.key.location"] = str(settings.kafka_ssl_key_file)
            if settings.kafka_ssl_key_password is not None:
                out["ssl.key.password"] = settings.kafka_ssl_key_password.get_secret_value()
        check = settings.kafka_ssl_check_hostname
        out["ssl.endpoint.identification.algorithm"] = "https" if check else "none"
    return out


def pseudonymizer(spec: PipelineSpec, settings: Settings) -> Pseudonymizer:
    """What the scorer does with the spec's personal fields (``streams.pii``)."""
    key = settings.pii_key.get_secret_value().encode()
    return Pseudonymizer(spec.events.pii, key, spec.events.key, settings.pii_key_id)


T = TypeVar("T")


def through_outage(
    call: Callable[[], T], wait_s: float, what: str, refusals_wait: bool = False
) -> T:
    """``call()``, retried with the guard's backoff while a server is down, for
    at most ``wait_s``; then its error is raised. A server down is what the guard
    calls an outage (``streams.guard.outage``: Redis unreachable, timing out,
    loading, BUSY...) or a Kafka cluster that cannot be reached. For what a stage
    does outside its batches (startup, restore, checkpoint commit, creating
    topics): each is safe to repeat.

    Redis refusing the stage's user (a wrong password, an ACL without a command) is
    ``Refused`` at once, naming the settings to check: at startup that is a
    misconfiguration, and waiting it out only delayed the error. ``refusals_wait``:
    waited out as an outage, as the guard does for a stage already running (an ACL
    changed under it)."""
    give_up, pause = time.monotonic() + wait_s, FIRST_BACKOFF_S
    while True:
        try:
            return call()
        except Exception as exc:
            refused = None if refusals_wait else refusal(exc)
            if refused is not None:
                raise Refused(
                    f"{what}: {refused} (check RIVERFLOW_REDIS_USERNAME, "
                    "RIVERFLOW_REDIS_PASSWORD and the user's ACL: riverflow acls STAGE --redis)"
                ) from exc
            why = outage(exc) or kafka_unreachable(exc)
            if why is None or time.monotonic() + pause > give_up:
                raise
            log.warning("%s: %s; retrying in %.1fs", what, why, pause)
            time.sleep(pause)
            pause = min(MAX_BACKOFF_S, pause * 2)


def kafka_unreachable(exc: BaseException) -> str | None:
    """Why ``exc`` is the Kafka cluster being unreachable, or its partitions' leaders
    not there yet (a topic just created, a broker restarting): not a refusal. None
    if it is neither."""
    from confluent_kafka import KafkaError

    from riverflow.streams.kafka_io import kafka_error

    err = kafka_error(exc)
    if err is None:
        return None
    down = (KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN,
            # offsets_for_times says so, not retriable, right after a topic is made
            KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE)  # fmt: skip
    return f"Kafka: {err}" if err.code() in down or err.retriable() else None


def redis_client(settings: Settings, url: str, wait_s: float = 0.0) -> Any:
    """A Redis client that answered PING (waiting up to ``wait_s`` for one), or
    ``ConnectionFailed`` saying where; a malformed URL is a ``ConnectionFailed`` too.

    Transient errors (connection, timeout) are retried with exponential backoff;
    the scripts a store runs are atomic, so a retried batch is either wholly
    applied or not at all, and dedup by event id makes a re-run harmless.
    """
    import redis

    if settings.redis_cluster and url.startswith(("redis://", "rediss://")):
        url = url.replace("://", "+cluster://", 1)
    for plain in ("redis://", "redis+cluster://"):
        if settings.redis_tls and url.startswith(plain):
            url = plain.replace("redis", "rediss", 1) + url.removeprefix(plain)
    tls: dict[str, Any] = {}
    if (
        url.startswith(("rediss://", "rediss+cluster://"))
        and settings.redis_tls_ca_file is not None
    ):
        tls["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
    from redis.exceptions import RedisClusterException

    safe = url.split("@")[-1]  # never echo credentials embedded in the URL
    give_up = time.monotonic() + wait_s
    try:
        # a cluster client asks a node for the slot map as it is built: it may wait too
        client = through_outage(
            lambda: _client_from_url(redis, settings, url, tls), wait_s, f"Redis at {safe}"
        )
        through_outage(client.ping, max(0.0, give_up - time.monotonic()), f"Redis at {safe}")
    except ValueError as exc:  # a scheme redis-py does not know, a port that is no number
        raise ConnectionFailed(f"Redis URL {safe!r} is malformed: {exc}") from exc
    except (redis.RedisError, RedisClusterException) as exc:
        raise ConnectionFailed(f"Redis unreachable at {safe}: {exc}") from exc
    return client


def _client_from_url(redis: Any, settings: Settings, url: str, tls: dict[str, Any]) -> Any:
    """A ``redis.Redis``, or a ``redis.cluster.RedisCluster`` for a
    ``redis+cluster://`` (``rediss+cluster://``) URL: the URL names one node, the
    client finds the others; the same credentials, TLS, timeouts and retries."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    common: dict[str, Any] = {
        "username": settings.redis_username,
        "password": password,
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        **tls,
    }
    backoff = ExponentialBackoff(cap=settings.redis_backoff_cap_s, base=0.05)
    scheme, sep, rest = url.partition("://")
    if sep and scheme in CLUSTER_SCHEMES:
        from redis.cluster import RedisCluster

        # a connection error or CLUSTERDOWN refreshes the slot map and retries: a
        # failed-over primary's slots are found on the replica that took over
        return RedisCluster.from_url(
            f"{CLUSTER_SCHEMES[scheme]}://{rest}",
            retry=Retry(backoff, retries=settings.redis_retries),
            **common,
        )
    return redis.Redis.from_url(
        url,
        retry=Retry(backoff, retries=settings.redis_retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        **common,
    )


# a URL naming a Redis Cluster, and the scheme redis-py takes for it
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def redis_store(spec: PipelineSpec, settings: Settings, client: Any) -> RedisFeatureStore:
    return RedisFeatureStore(
        client, spec.name, spec.feature_plan(), settings.label_horizon_s,
        cached_entities=settings.feature_cache_entities, replay_window_s=settings.replay_window_s,
        wait_replicas=settings.redis_wait_replicas, wait_timeout_s=settings.redis_wait_timeout_s,
    )  # fmt: skip


def redis_backends(
    spec: PipelineSpec, settings: Settings, client: Any
) -> tuple[RedisFeatureStore, ModelRegistry]:
    registry = RedisRegistry(
        client, spec.name, signing_key(settings), keep_versions=settings.registry_keep_versions
    )
    return redis_store(spec, settings, client), registry


def memory_backends(
    spec: PipelineSpec, settings: Settings, clock: Callable[[], float] | None = None
) -> tuple[FeatureStore, ModelRegistry]:
    """The embedded runtime's store and registry; ``clock``: the time both go by
    (default: the process's clocks)."""
    # the same retention as on Redis: a long embedded run keeps a bounded registry
    keep = settings.registry_keep_versions
    if clock is None:
        return MemoryFeatureStore(spec.feature_plan()), MemoryRegistry(signing_key(settings), keep)
    registry = MemoryRegistry(signing_key(settings), keep, clock=clock)
    return MemoryFeatureStore(spec.feature_plan(), clock=clock), registry


def label_feature_store(
    spec: PipelineSpec, settings: Settings, client: Any = None
) -> LabelFeatures | None:
    """The spec's label-fed features (``features.labelled``), or None if it has none:
    on Redis under ``rf:{ns}:lab:`` with ``client``, else in memory. The learner
    writes them and the scorer reads them: one for both in the embedded runtime."""
    plan = spec.label_plan(settings.label_wait_s)
    if plan is None:
        return None
    if client is None:
        return LabelFeatures.in_memory(plan)
    return LabelFeatures.on_redis(
        client, spec.name, plan, dedup_s=settings.replay_window_s,
        wait_replicas=settings.redis_wait_replicas, wait_timeout_s=settings.redis_wait_timeout_s,
    )  # fmt: skip


def build_scorer(
    spec: PipelineSpec,
    settings: Settings,
    store: FeatureStore,
    registry: ModelRegistry,
    model_poll_s: float | None = None,
    clock: Callable[[], float] = time.time,
    label_features: LabelFeatures | None = None,
) -> Scorer:
    """``label_features``: where it reads the label-fed features the learner writes
    (``label_feature_store``); by default, if the spec has some, its own in memory,
    where no label ever comes (a scorer on its own: tests, benchmarks)."""
    if label_features is None:
        label_features = label_feature_store(spec, settings)
    first = spec.models.champion_spec
    poll_s = settings.model_poll_s if model_poll_s is None else model_poll_s
    target = Target(spec.label.type, spec.label.classes)
    champion = ChampionReplica(
        registry,
        lambda: ModelVersion(first.name, 0, build_model(first, target, spec.clean)),
        poll_s,
    )
    return Scorer(
        spec.topics, spec.events, spec.feature_plan(), spec.models.inputs, store, champion,
        settings.max_event_bytes, explain_top=spec.models.explain, segment=spec.monitors.segment,
        bounds=Bounds(settings.event_time_min_s, settings.event_time_max_s,
                      settings.max_abs_number),
        dlq_keep_bytes=settings.dlq_keep_bytes, clock=clock, pii=pseudonymizer(spec, settings),
        target=target,
        clean=spec.clean,
        label_features=label_features,
        quality=DataQuality(spec.events.fields, spec.monitors.quality.window,
                            spec.monitors.quality.schema_missing_rate,
                            spec.optional_fields),
    )  # fmt: skip


def build_learner(
    spec: PipelineSpec,
    settings: Settings,
    store: FeatureStore,
    registry: ModelRegistry,
    scored: ScoredEvents,
    registry_poll_s: float | None = None,
    scored_through: ScoredThrough | None = None,
    clock: Callable[[], float] = time.monotonic,
    timeouts: Timeouts | None = None,
    label_features: LabelFeatures | None = None,
) -> Learner:
    """A learner that continues from its last checkpoint, or from fresh candidates.

    ``scored``: the scored events its labels join (``features.scored``).

    ``scored_through``: how far the scorer has got (see ``ScoredThrough``); by
    default every event is taken as scored (the embedded runtime).

    ``timeouts``: where its labels by timeout read the predictions topic, if the
    spec's label has ``default`` and ``after`` (``riverflow.stages.timeouts``).

    ``label_features``: where it writes the labels it learns for the label-fed
    features (``label_feature_store``; the scorer's); by default, if the spec has
    some, its own in memory, which no scorer reads.

    A candidate added to the spec since the checkpoint starts fresh; one removed
    from the spec is no longer trained (its versions stay in the registry).
    """
    if label_features is None:
        label_features = label_feature_store(spec, settings)
    target = Target(spec.label.type, spec.label.classes)
    fresh = build_candidates(spec.models, target, spec.clean)  # also checks every candidate builds

    def fresh_model(base: str) -> Any | None:
        # a spec candidate, or a configuration of a search (a survivor may be champion)
        candidate = candidate_spec(spec.models, base)
        return None if candidate is None else build_model(candidate, target, spec.clean)

    def configuration(name: str) -> Any:
        model = fresh_model(name)
        assert model is not None  # a search's configurations are built from the spec
        return model

    plans = [p for p in map(search_plan, spec.models.candidates) if p is not None]

    def metrics(state: dict[str, Any] | None) -> PrequentialMetrics:
        return PrequentialMetrics() if state is None else PrequentialMetrics.from_state(state)

    searches = Searches([SuccessiveHalving(p, configuration, metrics) for p in plans])

    poll_s = settings.model_poll_s if registry_poll_s is None else registry_poll_s
    lineage = Lineage(
        registry, spec.topics,
        [Candidate(name, model, 0, metrics_for(target.kind)) for name, model in fresh.items()],
        spec.models.champion_spec.name,
        Following(fresh_model, poll_s, functools.partial(metrics_for, target.kind)),
        int(settings.model_size_warn_mb * 2**20),
    )  # fmt: skip
    join = LabelJoin(spec.label, settings.max_event_bytes, spec.feature_plan(),
                     tuple(spec.models.inputs), spec.monitors.segment)  # fmt: skip
    timing = LearnerTiming(
        settings.label_wait_s, settings.snapshot_every_labels, settings.snapshot_every_s,
        label_horizon_s=settings.label_horizon_s, max_waiting=settings.label_max_waiting,
        keep_learned_s=settings.learned_keep_s,
        snapshot_min_interval_s=settings.snapshot_min_interval_s,
    )  # fmt: skip
    learner = Learner(
        spec.topics, store, scored, lineage, join, timing, clock=clock,
        scored_through=scored_through, dlq_keep_bytes=settings.dlq_keep_bytes, searches=searches,
        timeouts=timeouts,
        label_features=label_features,
    )  # fmt: skip
    saved = registry.checkpoint()
    if saved is not None:
        learner.restore(saved)
    return learner


def build_monitor(
    spec: PipelineSpec,
    registry: ModelRegistry,
    metrics: MonitorMetrics | None = None,
    dlq_keep_bytes: int = DLQ_KEEP_BYTES,
    clock: Callable[[], float] = time.time,
    audit: AuditReconciler | None = None,
) -> Monitor:
    slate = spec.events.slate
    core = PipelineMonitor(
        spec.name, spec.monitors, registry, spec.models.champion_spec.name, clock=clock,
        target=Target(spec.label.type, spec.label.classes),
        explores=slate is not None and slate.epsilon > 0,  # promotes off-policy
    )  # fmt: skip
    return Monitor(spec.topics, core, MonitorHistory(clock), metrics, dlq_keep_bytes, audit)
