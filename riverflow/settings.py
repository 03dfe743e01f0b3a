"""Runtime settings, read from ``RIVERFLOW_*`` environment variables (pydantic-settings).

The pipeline spec says *what* to compute; these settings say *where* and *how
fast*. Secrets are ``SecretStr`` so they never show up in logs or reprs.
"""

from __future__ import annotations

import shlex
from importlib.resources import files
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# package data, so an installed riverflow finds it from any directory
DEFAULT_SPEC = Path(str(files("riverflow.examples").joinpath("fraud.yaml")))
DEV_SIGNING_KEY = "riverflow-dev-signing-key-change-me"
DEV_PII_KEY = "riverflow-dev-pii-key-change-me"


class Settings(BaseSettings):
    """Where the servers are and how the stages batch."""

    model_config = SettingsConfigDict(env_prefix="RIVERFLOW_", extra="ignore")

    spec: Path = Field(DEFAULT_SPEC, description="pipeline spec (YAML)")
    kafka_bootstrap: str | None = Field(
        None, description="host:port of a running Kafka; unset = start the local stack"
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="how every client riverflow makes talks to Kafka"
    )
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism (PLAIN for managed clusters' API keys)"
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user (this stage's)")
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) that signed the brokers' certificates"
    )
    kafka_ssl_cert_file: Path | None = Field(None, description="client certificate (PEM, mTLS)")
    kafka_ssl_key_file: Path | None = Field(None, description="its private key (PEM)")
    kafka_ssl_key_password: SecretStr | None = None
    kafka_ssl_check_hostname: bool = Field(
        True, description="the broker's certificate must name the host connected to"
    )
    redis_url: str | None = Field(
        None,
        description="redis:// URL of a running Redis (redis+cluster:// names a Redis "
        "Cluster node); unset = start the local stack",
    )
    redis_username: str | None = Field(None, description="Redis ACL user (default: 'default')")
    redis_password: SecretStr | None = None
    redis_tls: bool = Field(False, description="TLS to Redis (same as a rediss:// URL)")
    redis_cluster: bool = Field(
        False, description="the URL names a Redis Cluster node (same as redis+cluster://)"
    )
    redis_wait_replicas: int = Field(
        0, ge=0,
        description="replicas that must hold a batch's Redis writes before its outputs "
        "go out (WAIT); 0 = do not wait (replication stays asynchronous)",
    )  # fmt: skip
    redis_wait_timeout_s: float = Field(
        1.0, gt=0, description="how long a write waits for those replicas before a retry"
    )
    redis_tls_ca_file: Path | None = Field(None, description="CA bundle that signed Redis' cert")
    redis_socket_timeout_s: float = Field(5.0, gt=0, description="per-command timeout")
    redis_connect_timeout_s: float = Field(5.0, gt=0)
    redis_retries: int = Field(3, ge=0, description="retries of a command on a transient error")
    redis_backoff_cap_s: float = Field(1.0, gt=0, description="longest wait between retries")
    feature_cache_entities: int = Field(
        500_000, ge=0,
        description="entities a scorer holds in process for the feature store (0 = none: "
        "every batch is computed by Redis); each costs ~0.5 KB of memory, frozen "
        "(besides up to 4,096 ready to compute, 3-7 KB each)",
    )  # fmt: skip
    partitions: int = Field(3, ge=1, description="partitions of every topic riverflow creates")
    replication_factor: int = Field(1, ge=1)
    host: Literal["confluent", "faust"] = Field(
        "confluent",
        description="what hosts a stage on Kafka: a confluent-kafka loop (measured ~10x "
        "cheaper per event, docs/benchmarks.md) or a Faust agent",
    )
    metrics_port: int | None = Field(
        None,
        description="port of /metrics and /healthz; default 9401 scorer, 9402 learner; 0 = off",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="address /metrics binds (0.0.0.0 in containers)"
    )
    batch_size: int = Field(1000, ge=1, description="max messages per processor batch")
    batch_timeout_s: float = Field(0.05, gt=0, description="max wait to fill a batch (Faust host)")
    batch_linger_s: float = Field(
        0.02, ge=0, le=0.1,
        description="confluent host: the longest a batch waits to fill once its first event "
        "is in, only while events come at 5,000/s or more, and only until about 200 are "
        "in (10 ms at 20,000/s); 0 = never",
    )  # fmt: skip
    max_event_bytes: int = Field(65_536, ge=64, description="larger payloads go to the DLQ")
    label_horizon_s: float = Field(
        7 * 24 * 3600.0, gt=0,
        description="how long a scored event waits for its label (the learner's index of "
        "predictions keeps it this long: keep the predictions topic's retention at least this)",
    )  # fmt: skip
    label_wait_s: float = Field(
        30.0, ge=0, description="how long a label waits for its event to be scored"
    )
    replay_window_s: float = Field(
        900.0, gt=0,
        description="how long Redis keeps each event's feature snapshot and served "
        "prediction, so that a scorer replaying it (after a crash) counts it once and "
        "serves the same answer; a replay later than this is scored as new",
    )  # fmt: skip
    scored_dir: Path | None = Field(
        None,
        description="where the learner keeps its index of scored events, the records "
        "labels join (RocksDB, up to rate x label horizon x ~150 B); default "
        "{cache_dir}/scored/{pipeline}. Lost, it is rebuilt from the predictions topic",
    )
    snapshot_every_labels: int = Field(
        1000, ge=0, description="learner publishes a model version every N labels (0 = never)"
    )
    snapshot_every_s: float = Field(
        60.0, ge=0,
        description="... and at least every T seconds while labels come (0 = never), or at "
        "the floor (snapshot_min_interval_s) if a grown model has raised it past T",
    )  # fmt: skip
    snapshot_min_interval_s: float = Field(
        1.0, ge=0,
        description="... but at most one version every T seconds (0 = no floor), or "
        "further apart while publishing takes over 0.5% of the time between them: a "
        "version copies every candidate, which the learner pickles and every scorer "
        "loads, so the cost grows with the model; the embedded runtime has no floor (its "
        "runs do not depend on the machine's speed)",
    )  # fmt: skip
    model_size_warn_mb: float = Field(
        32.0, ge=0,
        description="the learner logs a WARNING when a candidate's signed version passes "
        "this size, and again at each doubling (0 = never): a scorer loads each new "
        "champion on its main thread (~17 ms a MB on a development machine) and Redis "
        "keeps registry_keep_versions of each candidate; a Hoeffding tree grows with the "
        "stream up to its max_size (River's default: 100 MB of memory)",
    )  # fmt: skip
    model_poll_s: float = Field(0.1, gt=0, description="how often a scorer checks the champion")
    audit_grace_s: float = Field(
        300.0, gt=0,
        description="the monitor writes a version or pointer move missing from model-events "
        "once it is this old (its maker was killed before logging it)",
    )  # fmt: skip
    signing_key: SecretStr = Field(
        SecretStr(DEV_SIGNING_KEY), description="HMAC key for model snapshots"
    )
    signing_key_id: str = Field(
        "1", min_length=1, max_length=64,
        description="the id of RIVERFLOW_SIGNING_KEY, kept with every version it signs",
    )  # fmt: skip
    verification_keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="older signing keys by id (JSON: {\"1\": \"...\"}): what they signed "
        "still verifies; drop one to refuse what it signed",
    )  # fmt: skip
    pii_key_id: str = Field(
        "1", min_length=1, max_length=32,
        description="the name of RIVERFLOW_PII_KEY, written in every prediction: change "
        "both together when you rotate the key",
    )  # fmt: skip
    pii_key: SecretStr = Field(
        SecretStr(DEV_PII_KEY),
        description="HMAC key of the tokens that replace personal fields (events.pii); "
        "changing it changes every token, so entities start afresh",
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "riverflow", description="downloaded Kafka jars, stack state"
    )
    kafka_version: str = "4.1.1"
    kafka_jvm_options: str = Field(
        "-Xms256m -Xmx1g -XX:+UseZGC",
        description="JVM options of the broker the local stack starts (heap, collector): "
        "ZGC, because G1's young-generation pauses (~15 ms, a few every 15 s) held the "
        "scorer's acks at 1,000 events/s (docs/benchmarks.md)",
    )

    # hostile input and outages (streams.validation, streams.guard)
    event_time_min_s: float = Field(0.0, description="an earlier event time goes to the DLQ")
    event_time_max_s: float = Field(
        253_402_300_799.0, description="a later event time goes to the DLQ (default: year 9999)"
    )
    max_abs_number: float = Field(
        1e18, gt=0, le=1e300, description="an int or float field beyond +-this goes to the DLQ"
    )
    dlq_keep_bytes: int = Field(
        256 * 1024, ge=0, le=1024 * 1024,
        description="a DLQ record keeps this much of the original key and value (beyond: "
        "length and sha256)",
    )  # fmt: skip
    outage_limit_s: float = Field(
        120.0, ge=60,
        description="a stage waits out Redis or Kafka being down (at startup, restore, every "
        "batch, checkpoint commit) this long, retrying with backoff, then exits",
    )  # fmt: skip
    # -- the learner's labels and what it keeps in Redis --------------------------
    label_max_waiting: int = Field(
        50_000, ge=1,
        description="labels waiting for their event to be scored: at this many the learner "
        "stops reading labels until some are scored (confluent host); a host that reads on "
        "regardless orphans the oldest past twice this. Labels held for their prediction's "
        "timeout (label.learn: at_timeout): past twice this, the oldest is learned at once",
    )  # fmt: skip
    learned_keep_s: float = Field(
        600.0, ge=0,
        description="a learned label's mark stays this long after the checkpoint covering "
        "it is committed (a duplicate label is still recognised); 0 = deleted then",
    )  # fmt: skip
    scorer_progress_poll_s: float = Field(
        1.0, gt=0, description="how often the learner reads the scorer group's lag on events"
    )
    labels_settle_s: float = Field(
        30.0, ge=0,
        description="with a label timeout: once Kafka answers the learner again after an "
        "outage, how long no timeout falls due, so that the labels producers held during "
        "the outage reach the topic first (librdkafka retries a broker every 10 s at most "
        "by default, 3 s in riverflow's clients; a producer stuck after a broker restart, "
        "as riverflow produce replaces one, delivers 8-13 s after the broker is back)",
    )  # fmt: skip
    registry_keep_versions: int = Field(
        20, ge=1,
        description="newest versions kept per candidate at publish; the champion, versions "
        "a promotion or rollback moved the pointer to or from, and the checkpoint's are "
        "always kept",
    )  # fmt: skip

    # -- delivery guarantees and failover (docs/architecture.md, "Delivery and failover") --
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="the scorer's predictions: at least once (a crash replays the last "
        "~commit_interval_s of events, flagged replayed with the same answer) or exactly "
        "once for read_committed readers (Kafka transactions; the confluent host only)",
    )
    instance_id: str | None = Field(
        None,
        description="this process's static group membership id (group.instance.id); a "
        "restart with the same id takes its partitions back at once. Default: "
        "{stage}-{hostname}-{metrics port} (none with the metrics port off: a dynamic "
        "member); set it where hostnames change per restart",
    )
    session_timeout_s: float = Field(
        6.0, ge=1,
        description="a scorer silent this long loses its partitions to the others "
        "(the broker's group.min.session.timeout.ms, default 6 s, is the floor)",
    )  # fmt: skip
    commit_interval_s: float = Field(
        1.0, gt=0, description="offsets committed at most this often, one commit in flight"
    )
    max_poll_interval_s: float = Field(
        300.0, ge=1, description="a batch slower than this takes the stage out of its group"
    )
    transaction_interval_s: float = Field(
        0.1, ge=0,
        description="exactly once: a transaction spans the batches of this long (what a "
        "read_committed reader waits at most, beyond the batch)",
    )  # fmt: skip
    transaction_timeout_s: float = Field(
        5.0, ge=1,
        description="exactly once: the broker aborts a transaction left open this long. "
        "A scorer killed between its offsets and its commit holds its partitions' "
        "offsets until then, plus the broker's "
        "transaction.abort.timed.out.transaction.cleanup.interval.ms (1 s on the stack "
        "riverflow starts): keep the sum under the 10 s failover bound, and above the "
        "slowest batch (a batch waiting out an outage ends its transaction first)",
    )  # fmt: skip

    @field_validator("kafka_jvm_options")
    @classmethod
    def _jvm_options_split(cls, value: str) -> str:
        try:
            shlex.split(value)
        except ValueError as exc:  # an unclosed quote
            raise ValueError(f"not a list of JVM options ({exc}): {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _kafka_security_complete(self) -> Settings:
        sasl = self.kafka_security_protocol.startswith("SASL")
        if sasl and not (self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(
                f"kafka_security_protocol {self.kafka_security_protocol} needs "
                "RIVERFLOW_KAFKA_SASL_USERNAME and RIVERFLOW_KAFKA_SASL_PASSWORD"
            )
        if (self.kafka_ssl_cert_file is None) != (self.kafka_ssl_key_file is None):
            raise ValueError("kafka_ssl_cert_file and kafka_ssl_key_file go together (mTLS)")
        for name in ("kafka_ssl_ca_file", "kafka_ssl_cert_file", "kafka_ssl_key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: {path} is not a readable file")
        return self

    @model_validator(mode="after")
    def _poll_outlasts_outage(self) -> Settings:
        # a batch waiting out an outage must not take the stage out of its group
        if self.max_poll_interval_s <= self.outage_limit_s + 30:
            raise ValueError(
                f"max_poll_interval_s ({self.max_poll_interval_s:g}) must exceed "
                f"outage_limit_s ({self.outage_limit_s:g}) by more than 30 s: a batch "
                "waiting out an outage would otherwise take the stage out of its group"
            )
        return self
