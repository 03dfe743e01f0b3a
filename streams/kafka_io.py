"""confluent-kafka helpers: topic creation, producing, reading a topic."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import Any, Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from riverflow.errors import RiverflowError
from riverflow.streams.contracts import Message

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # the DLQ must hold an oversized payload plus its envelope
# what a reader beside a stage's own loop (the learner's index follower, the label
# timeouts' trailing reader) may hold fetched ahead, unread: librdkafka's default is
# 64 MB (a follower not called while its topic held 120 MB of slate predictions grew
# 84 MB, 22 MB with this), and once the cap is met it fetches again after
# ``fetch.queue.backoff.ms``, 1 s by default: 10 ms keeps a capped reader's catch-up
# at ~200 MB/s, against ~30 (docs/bench/follower_prefetch.py, docs/benchmarks.md)
SIDE_READER_PREFETCH: dict[str, Any] = {
    "queued.max.messages.kbytes": 8192,
    "fetch.queue.backoff.ms": 10,
}


class KafkaIOError(RiverflowError):
    """Kafka refused or failed an operation riverflow needed."""


# librdkafka's security settings (TLS, SASL) for every client this process makes: a
# process talks to one cluster under one identity (``use_security``, set at startup)
_SECURITY: dict[str, Any] = {}


def use_security(config: Mapping[str, Any]) -> None:
    """The security settings every client made after this call gets."""
    _SECURITY.clear()
    _SECURITY.update(config)


def security() -> dict[str, Any]:
    """The process's security settings (``use_security``), a copy."""
    return dict(_SECURITY)


# how often every client refreshes the metadata of the topics it uses (librdkafka's
# default: 5 minutes). A consumer group's leader sees partitions added to a topic only
# then, and a producer writes to them only then: the scorers took new events partitions
# up to 5 minutes late (a static member restarted meanwhile got its old assignment back)
METADATA_REFRESH_S = 10.0
# how long a client with no broker left goes on before it bootstraps again from
# ``bootstrap.servers`` (librdkafka's default: 5 minutes). librdkafka drops a broker
# the metadata no longer lists, and the bootstrap ones once it has learned the
# cluster's: a single broker frozen 20 s (SIGSTOP, a long GC or VM pause) was listed
# by nobody for a moment after it resumed, so a client then had no broker at all: a
# stage's consumer (the monitor's, once the scorer's) was deaf until the host replaced
# it, 17-28 s after the broker was back
REBOOTSTRAP_S = 5.0
# the longest a client waits between two tries to reach a broker it lost (librdkafka's
# ``reconnect.backoff.max.ms``, 10 s by default): a stage's consumer back by itself
# within this is not taken for stuck (``DEAF_AFTER_S``), and so a stuck one can be
# replaced sooner (at 15 s, as with librdkafka's 10, it read again 16-18 s after a
# frozen broker's return: past the 15 s in which test_server_restarts wants every
# stage reading)
RECONNECT_MAX_S = 3.0


def client_config(bootstrap: str, **extra: Any) -> dict[str, Any]:
    """A librdkafka client's settings: ``bootstrap``, the metadata refresh and
    re-bootstrap, the process's security settings (``use_security``) and ``extra``."""
    refresh = {"topic.metadata.refresh.interval.ms": int(METADATA_REFRESH_S * 1000),
               "metadata.recovery.rebootstrap.trigger.ms": int(REBOOTSTRAP_S * 1000),
               "reconnect.backoff.max.ms": int(RECONNECT_MAX_S * 1000)}  # fmt: skip
    return {"bootstrap.servers": bootstrap, **refresh, **_SECURITY, **extra}


def ensure_topics(
    bootstrap: str,
    names: Iterable[str],
    partitions: int,
    replication: int = 1,
    configs: Mapping[str, Mapping[str, str]] | None = None,
    client: Mapping[str, Any] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; returns the names created.
    ``configs``: topic settings of the named topics beyond the defaults (applied on
    creation only: a topic that exists keeps what its operator gave it). ``client``:
    the admin client's own settings (another identity than the process's)."""
    admin = AdminClient(client_config(bootstrap, **(client or {})))
    existing = set(admin.list_topics(timeout=10).topics)
    base = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
    extra = configs or {}
    new = [
        NewTopic(n, partitions, replication, config={**base, **extra.get(n, {})})
        for n in names
        if n not in existing
    ]
    if not new:
        return []
    todo, deadline = {t.topic: t for t in new}, time.monotonic() + START_WAIT_S
    while todo:
        for name, future in admin.create_topics(list(todo.values())).items():
            try:
                future.result()
            except KafkaException as exc:
                if _starting(exc) and time.monotonic() < deadline:
                    continue  # asked again below
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise KafkaIOError(f"creating topic {name}: {exc}") from exc
            del todo[name]
        if todo:
            time.sleep(0.5)
    created = [t.topic for t in new]
    _await_leaders(admin, created)
    return created


# how long a topic's creation is asked again while the cluster is starting up
START_WAIT_S = 30.0
# how long a reader behind its topic may read nothing before its consumer is replaced
# (librdkafka reconnects within RECONNECT_MAX_S by itself)
STALL_S = 15.0
# a GroupProgress not called for this long settles as after an error (see there)
QUIET_GAP_S = 5.0
# how long such a look at a topic's end may wait for the broker (during an outage it
# fails: a reader's caller is held this long every STALL_S at most)
LOOK_TIMEOUT_S = 2.0
# how long ``read_topic`` short of its topic's end waits for a message before it gives
# up (a stalled consumer is replaced within 2 x STALL_S)
BEHIND_S = 60.0


class Stall:
    """Whether a groupless reader's consumer has stopped fetching: behind its topic's
    end and nothing read for ``STALL_S``. Seen after a broker restart under load: the
    client called the topic's partitions unknown, then fetched nothing while the
    topic grew. The reader says when it read something (``heard``) and, when asked
    (``look``: at most every ``STALL_S`` while nothing comes), whether it is behind."""

    def __init__(self) -> None:
        self._heard = time.monotonic()  # the consumer's last message (or end event)
        self._behind: float | None = None  # since when it has been found behind, silent
        self._looked = 0.0

    def heard(self) -> None:
        self._heard = time.monotonic()

    def look(self) -> bool:
        """Whether to read the topic's end now: silent for ``STALL_S``, not read
        within the last ``STALL_S``."""
        now = time.monotonic()
        if now - self._heard < STALL_S or now < self._looked + STALL_S:
            return False
        self._looked = now
        return True

    def check(self, consumer: Consumer, topic: str, at: Mapping[int, int]) -> str | None:
        """Why ``consumer``, reading ``topic``'s partitions from ``at`` (the next
        offset each; a logical start until one is read), should be replaced, or None:
        its ends refused for an unknown partition, or ``stalled``. Reads the ends,
        waiting ``LOOK_TIMEOUT_S`` at most."""
        try:
            ends = watermarks(consumer, topic, at, LOOK_TIMEOUT_S)
        except KafkaException as exc:
            log.warning("reading the end of %s: %s", topic, exc)
            return unknown_why(exc)
        # a partition not read yet is at its start: behind by what it holds
        return self.behind_by(sum(max(0, high - (o if o >= 0 else low)) for p, o in at.items()
                                  for low, high in [ends[p]]))  # fmt: skip

    def behind_by(self, behind: int) -> str | None:
        """Why to replace a consumer ``behind`` messages behind its topic's end, or
        None: ``stalled``."""
        silent = self.stalled(behind > 0)
        if silent is None:
            return None
        return f"{behind:,} messages behind and nothing read for {silent:.0f} s"

    def stalled(self, behind: bool) -> float | None:
        """Seconds silent while behind, once that is ``STALL_S`` or more (else None)."""
        if not behind:
            self._behind = None
            return None
        now = time.monotonic()
        self._behind = self._behind or now
        silent = now - max(self._heard, self._behind)
        return silent if silent >= STALL_S else None


def kafka_error(exc: BaseException) -> KafkaError | None:
    """The ``KafkaError`` a ``KafkaException`` carries (None for any other)."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return err if isinstance(err, KafkaError) else None


def unknown_why(exc: KafkaException) -> str | None:
    """Why to replace a consumer whose call raised ``exc``: it calls its topic's
    partitions unknown; or None."""
    err = kafka_error(exc)
    if err is None or err.code() != KafkaError._UNKNOWN_PARTITION:
        return None
    return f"the client calls its partitions unknown ({exc})"


# how often a reader that assigns itself every partition of a topic (the learner's
# labels, its index of the predictions, the label timeouts' trailing reader) asks for
# partitions added to it since (``kafka-topics.sh --alter --partitions``): before, they
# were read only after a restart, and labels of events predicted into a new predictions
# partition went to the DLQ as orphans
PARTITIONS_EVERY_S = METADATA_REFRESH_S


class PartitionWatch:
    """Partitions added to ``topic`` since the reader began, asked of the broker at most
    every ``PARTITIONS_EVERY_S`` (a metadata request of one topic)."""

    def __init__(
        self, topic: str, known: Iterable[int], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.topic = topic
        self.known = set(known)
        self._clock = clock
        self._next = clock() + PARTITIONS_EVERY_S

    def added(self, consumer: Any) -> list[int]:
        """The partitions added since the last call that found some (none before
        ``PARTITIONS_EVERY_S`` has passed since the last look); known after."""
        if self._clock() < self._next:
            return []
        self._next = self._clock() + PARTITIONS_EVERY_S
        try:
            meta = consumer.list_topics(self.topic, timeout=LOOK_TIMEOUT_S).topics.get(self.topic)
        except KafkaException as exc:  # the broker away: asked again next time
            log.info("partitions of %s not read: %s", self.topic, exc)
            return []
        if meta is None or meta.error is not None:
            return []
        added = sorted(set(meta.partitions) - self.known)
        if added:
            log.warning("%s: partitions %s were added: read from their start", self.topic, added)
            self.known.update(added)
        return added


def renewed_reader(
    old: Consumer,
    bootstrap: str,
    topic: str,
    group: str,
    settings: Mapping[str, Any],
    at: Mapping[int, int],
    why: str,
) -> Consumer:
    """A new groupless consumer of ``topic`` assigned at ``at`` in place of ``old``,
    which closes in the background (a client that lost its broker may take long to);
    ``old`` itself if no new one can be made now (the next stall tries again)."""
    try:
        consumer, _ = groupless_reader(bootstrap, topic, group, **settings)
    except (KafkaException, KafkaIOError) as exc:
        log.warning("reading %s: no new consumer yet: %s", topic, exc)
        return old
    log.warning("reading %s: a new consumer from where the last read to, since %s", topic, why)
    consumer.assign([TopicPartition(topic, p, o) for p, o in at.items()])
    threading.Thread(target=old.close, name="reader-close", daemon=True).start()
    return consumer


def _starting(exc: KafkaException) -> bool:
    """Whether a creation was refused only because the cluster is starting: a
    retriable error, or (KRaft) no broker unfenced yet, as just after a restart."""
    err = kafka_error(exc)
    if err is None:
        return False
    fenced = err.code() == KafkaError.INVALID_REPLICATION_FACTOR and "fenced" in err.str()
    return bool(err.retriable()) or fenced


def _await_leaders(admin: AdminClient, topics: Sequence[str], timeout_s: float = 30.0) -> None:
    """Return once every partition of ``topics`` has a leader in the metadata the
    brokers serve: the controller confirms a creation before the brokers learn of it,
    and a client that asks meanwhile (for the topic's configuration, its offsets) is
    told the topic does not exist."""
    deadline = time.monotonic() + timeout_s
    waiting = list(topics)
    while waiting:
        listed = admin.list_topics(timeout=10).topics
        waiting = [
            t for t in waiting
            if t not in listed or listed[t].error is not None or not listed[t].partitions
            or any(p.leader < 0 for p in listed[t].partitions.values())
        ]  # fmt: skip
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise KafkaIOError(f"topics {', '.join(waiting)} created, but without leaders "
                               f"after {timeout_s:g} s")  # fmt: skip
        time.sleep(0.1)


class KafkaAccessError(RiverflowError):
    """The cluster refuses this process: its login, or the TLS between them."""


def check_access(bootstrap: str, timeout_s: float = 10.0) -> None:
    """Return once the cluster lists its topics to this process; ``KafkaAccessError``
    naming the cause if it refuses the login or the certificates (a wrong password, an
    untrusted CA): retrying would not help. An unreachable cluster raises the client's
    ``KafkaException`` (an outage, waited out by the caller)."""
    refused: list[KafkaError] = []

    def on_error(err: KafkaError) -> None:
        # a broker that wants a client certificate answers with a TLS alert, which
        # librdkafka reports as a transport error
        alert = err.code() == KafkaError._TRANSPORT and "SSL routines" in err.str()
        if err.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL) or alert:
            refused.append(err)

    admin = AdminClient(client_config(bootstrap, error_cb=on_error, log_level=0))
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException:
        admin.poll(0)  # serves the error callbacks that came meanwhile
        if refused:
            why = refused[0].str().split(": ", 1)[-1]  # without librdkafka's broker prefix
            raise KafkaAccessError(f"Kafka at {bootstrap} refused this client: {why}") from None
        raise


def topic_retention(bootstrap: str, topic: str) -> tuple[int, int]:
    """``topic``'s ``retention.ms`` and ``retention.bytes`` (-1: unbounded)."""
    admin = AdminClient(client_config(bootstrap))
    resource = ConfigResource(ResourceType.TOPIC, topic)
    deadline = time.monotonic() + 10.0
    while True:
        try:
            found = admin.describe_configs([resource])[resource].result(timeout=10)
            break
        except KafkaException as exc:
            # a topic another process has just created: the broker asked may not know it yet
            err = kafka_error(exc)
            unknown = err is not None and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
            if not unknown or time.monotonic() > deadline:
                raise KafkaIOError(f"reading the configuration of topic {topic}: {exc}") from exc
            time.sleep(0.2)
    return int(found["retention.ms"].value), int(found["retention.bytes"].value)


def producer_config(bootstrap: str, **extra: Any) -> dict[str, Any]:
    """Settings of a producer that batches (linger) and never blocks per message."""
    return client_config(
        bootstrap, **{"linger.ms": 5, "enable.idempotence": True,
                      "message.max.bytes": MAX_MESSAGE_BYTES, **extra},
    )  # fmt: skip


def producer(bootstrap: str, **extra: Any) -> Producer:
    """A producer that batches (linger) and never blocks per message."""
    return Producer(producer_config(bootstrap, **extra))


def produce_one(
    prod: Producer, topic: str, key: bytes | None, value: bytes, on_delivery: Callable[..., Any]
) -> None:
    """Produce one record, waiting for room while the local queue is full."""
    while True:
        try:
            prod.produce(topic, value=value, key=key, on_delivery=on_delivery)
            return
        except BufferError:  # local queue full: let deliveries drain
            prod.poll(0.05)


# during an outage a new client asks a broker for metadata every DEAF_PROBE_S; once one
# has answered, a client that still reaches no broker DEAF_AFTER_S later is stuck
# (librdkafka reconnects within RECONNECT_MAX_S by itself)
DEAF_PROBE_S = 5.0
DEAF_AFTER_S = 8.0
# a producer whose messages have waited this long for their acks while a new client has
# reached Kafka for DEAF_AFTER_S is stuck (librdkafka #5430: a partition it was told has
# leader -1 as the broker shut down stays without one)
STUCK_ACKS_S = 20.0


class FreshReach:
    """How long a new client has reached Kafka, asked (``probe``) at most every
    ``every_s``; an answer refused starts the count again."""

    def __init__(self) -> None:
        self._next = 0.0
        self._since: float | None = None

    def reached_for(self, now: float, probe: Callable[[], bool], every_s: float) -> float | None:
        """Seconds since a new client first reached Kafka (None: it has not)."""
        if now >= self._next:
            self._next = now + every_s
            if not probe():
                self._since = None
            elif self._since is None:
                self._since = now
        return None if self._since is None else now - self._since


class Renewal:
    """What ``produce_all`` needs to replace a stuck producer: a new one (``make``),
    and whether a new client reaches Kafka now (``reaches``)."""

    def __init__(self, make: Callable[[], Producer], reaches: Callable[[], bool]) -> None:
        self.make, self.reaches = make, reaches
        self.renewed = 0  # producers replaced so far


def reaches_kafka(bootstrap: str, timeout_s: float = 5.0) -> bool:
    """Whether a new client gets the cluster's metadata from ``bootstrap`` now."""
    client = AdminClient(client_config(bootstrap))
    try:
        client.list_topics(timeout=timeout_s)
        return True
    except KafkaException:
        return False


def produce_all(
    prod: Producer,
    records: Iterable[tuple[str, bytes | None, bytes]],
    timeout_s: float = 60.0,
    waiting: Callable[[int], None] | None = None,
    renewal: Renewal | None = None,
) -> int:
    """Produce every (topic, key, value); flush once at the end, waiting up to
    ``timeout_s`` for the acks (librdkafka retries meanwhile, e.g. while the broker
    restarts): ``waiting(n)`` is told every second of it how many are still
    unacknowledged. Raises on delivery errors.

    With ``renewal``, the messages are kept until acknowledged, and a producer that
    is stuck (``STUCK_ACKS_S``) is replaced by a new one, which sends them again: at
    least once, so a message the stuck one did write may be written twice."""
    errors: list[str] = []
    kept: dict[int, tuple[str, bytes | None, bytes]] = {}
    current = [0]  # the producer's generation: a replaced one's reports are ignored

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    def acked(i: int) -> Callable[[Any, Any], None]:
        generation = current[0]

        def done(err: Any, _msg: Any) -> None:
            if generation != current[0]:
                return
            if err is not None:
                errors.append(str(err))
            kept.pop(i, None)

        return done

    n = 0
    for topic, key, value in records:
        if renewal is None:
            produce_one(prod, topic, key, value, on_delivery)
        else:
            kept[n] = (topic, key, value)
            produce_one(prod, topic, key, value, acked(n))
        n += 1
        if n % 1000 == 0:
            prod.poll(0)
    started = time.monotonic()
    deadline = started + timeout_s
    reach = FreshReach()
    remaining = prod.flush(min(1.0, timeout_s))
    while remaining and (left := deadline - time.monotonic()) > 0:
        if waiting is not None:
            waiting(remaining)
        now = time.monotonic()
        if renewal is not None and kept and now - started >= STUCK_ACKS_S:
            up = reach.reached_for(now, renewal.reaches, DEAF_PROBE_S)
            if up is not None and up >= DEAF_AFTER_S:
                current[0] += 1
                prod = renewed_producer(prod, renewal, kept, acked)
                started, reach = time.monotonic(), FreshReach()
        remaining = prod.flush(min(1.0, left))
    if remaining or errors:
        unacked = (f"{remaining:,} of {n:,} messages not acknowledged within {timeout_s:g} s "
                   "after the last was produced (the broker out of reach?): they may not be "
                   "written")  # fmt: skip
        refused = f"{len(errors):,} refused: {errors[:3]}"
        why = [m for m, on in ((unacked, remaining), (refused, errors)) if on]
        raise KafkaIOError("; ".join(why))
    return n


def renewed_producer(
    stuck: Producer,
    renewal: Renewal,
    kept: dict[int, tuple[str, bytes | None, bytes]],
    acked: Callable[[int], Callable[[Any, Any], None]],
) -> Producer:
    """A new producer sending ``kept`` (by send number) again in place of ``stuck``
    (purged, let go); ``acked(i)`` is the delivery report of send ``i``. The caller
    ignores the reports of ``stuck`` from here on."""
    log.warning("%d messages unacknowledged for %.0f s while Kafka answers a new client: "
                "a new producer sends them again", len(kept), STUCK_ACKS_S)  # fmt: skip
    stuck.purge(in_queue=True, in_flight=True, blocking=False)
    stuck.flush(0)  # (its reports, of an older generation, are ignored)
    prod = renewal.make()
    renewal.renewed += 1
    for i, (topic, key, value) in list(kept.items()):
        produce_one(prod, topic, key, value, acked(i))
    return prod


def groupless_reader(
    bootstrap: str, topic: str, group: str, **config: Any
) -> tuple[Consumer, list[int]]:
    """A consumer to ``assign`` every partition of ``topic`` to, and those partitions:
    ``group`` only names it (librdkafka needs one), since it never subscribes or
    commits. ``KafkaIOError`` if the topic does not exist."""
    settings = {"group.id": group, "enable.auto.commit": False,
                "fetch.message.max.bytes": MAX_MESSAGE_BYTES, **config}  # fmt: skip
    consumer = Consumer(client_config(bootstrap, **settings))
    meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None:
        consumer.close()
        raise KafkaIOError(f"no topic {topic!r} on {bootstrap}")
    return consumer, sorted(meta.partitions)


def watermarks(
    consumer: Consumer, topic: str, partitions: Iterable[int], timeout_s: float = 10.0
) -> dict[int, tuple[int, int]]:
    """Per partition of ``topic``: its (low, high) watermarks (for a read_committed
    consumer the high one is the committed end)."""
    return {
        p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
        for p in partitions
    }


def offsets_since(
    consumer: Consumer,
    topic: str,
    partitions: Iterable[int],
    since_s: float,
    marks: Mapping[int, tuple[int, int]] | None = None,
) -> dict[int, int]:
    """Per partition of ``topic``, the offset of its first message no older than
    ``since_s`` seconds, or its end if none is that recent (``marks``: its watermarks,
    read just before; default: read here).

    The ends are read first: "none that recent" is true of the partition as it was
    when asked, and a message written after that (before the end is read) must not
    be skipped. Reading the end afterwards lost the predictions a scorer wrote in
    between (a learner started with its scorer orphaned their labels)."""
    wanted = list(partitions)
    ends = {p: int(high) for p, (_, high) in (marks or watermarks(consumer, topic, wanted)).items()}
    at_ms = int((time.time() - since_s) * 1000)
    found = consumer.offsets_for_times(
        [TopicPartition(topic, p, at_ms) for p in wanted], timeout=10
    )
    # -1: nothing that recent (then every message before the end read first is older)
    return {tp.partition: tp.offset if tp.offset >= 0 else ends[tp.partition] for tp in found}


def read_topic(
    bootstrap: str,
    topic: str,
    idle_s: float = 2.0,
    follow: bool = False,
    since_s: float | None = None,
    stop: threading.Event | None = None,
    last: int | None = None,
    on_end: Callable[[], None] | None = None,
) -> Generator[Any, None, None]:
    """Every message of ``topic`` from the beginning (``since_s``: from the first no
    older than that many seconds; ``last``: from the last ``last`` of each partition) to
    its end as it was when called, and on until none arrived for ``idle_s`` seconds (or
    forever with ``follow``), or ``stop`` is set (noticed within a poll, 0.2 s, even
    while nothing arrives). ``on_end`` is called once every partition has been read to
    that end (following too). Reads all partitions
    without a consumer group, so it commits nothing and joins no rebalance. A consumer
    that stops fetching (``Stall``) is replaced by a new one from where it read to.
    An error the client reports is ``KafkaIOError``; following, only a fatal one (the
    others, as a broker restarts, are logged: the read goes on).

    Short of the end, a pause in what comes is not the end: on a loaded machine a
    fetch took over ``idle_s``, and a read that stopped then returned part of the
    topic as if whole (the test of a pipeline missed a request; ``riverflow forget``
    would miss events). ``KafkaIOError`` if nothing comes for ``BEHIND_S`` while
    short of it. Ends are committed ends (read_committed): an open transaction's
    records are not waited for. Following, partitions added to the topic are read from
    their start (``PartitionWatch``)."""
    if since_s is not None and last is not None:
        raise ValueError("read_topic: since_s or last, not both")
    consumer, partitions = groupless_reader(
        bootstrap, topic, "riverflow-reader", **{"enable.partition.eof": True}
    )
    # the ends as they are now, before any offset is looked up or fetched (following
    # from the beginning with no end to tell, none is needed)
    ends_wanted = not follow or since_s is not None or last is not None or on_end is not None
    marks = watermarks(consumer, topic, partitions) if ends_wanted else {}
    starts = dict.fromkeys(partitions, OFFSET_BEGINNING)
    if since_s is not None:
        starts = offsets_since(consumer, topic, partitions, since_s, marks)
    elif last is not None:
        starts = {p: max(int(low), int(high) - last) if high > low else OFFSET_BEGINNING
                  for p, (low, high) in marks.items()}  # fmt: skip
    # the ends to read to (a partition with nothing to read has none); following, only
    # to tell on_end when they are reached
    short = {p: int(high) for p, (low, high) in marks.items()
             if high > max(low, starts[p])}  # fmt: skip
    if follow and on_end is None:
        short = {}
    consumer.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
    at = dict(starts)  # the next offset to read per partition (its start until one is read)
    stall = Stall()
    heard_at = time.monotonic()
    added = PartitionWatch(topic, partitions) if follow else None  # following: new ones too
    ended = False
    try:
        while not (stop and stop.is_set()):
            if not short and not ended:
                ended = True
                if on_end is not None:
                    on_end()
            for p in added.added(consumer) if added is not None else ():
                at[p] = OFFSET_BEGINNING
                consumer.incremental_assign([TopicPartition(topic, p, OFFSET_BEGINNING)])
            quiet = time.monotonic() - heard_at
            if not follow and not short and quiet >= idle_s:
                break
            if short and not follow and quiet >= BEHIND_S:
                left = sum(end - max(at[p], 0) for p, end in short.items())
                raise KafkaIOError(f"reading {topic}: nothing came for {BEHIND_S:g} s, "
                                   f"{left:,} messages short of its end")  # fmt: skip
            batch = consumer.consume(1000, timeout=0.2)
            heard = False
            for msg in batch:
                err, partition, offset = msg.error(), msg.partition(), msg.offset()
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    if not follow or err.fatal():
                        raise KafkaIOError(f"reading {topic}: {err}")
                    # following, the client's news (a broker restarting: partitions
                    # unknown for a while); a consumer that stops reading is replaced
                    log.warning("reading %s: %s", topic, err)
                    continue
                if partition is None or offset is None:
                    continue
                # an end event's offset is the end: past the markers of transactions too
                at[partition] = offset if err is not None else offset + 1
                if partition in short and at[partition] >= short[partition]:
                    del short[partition]
                if err is None:
                    heard = True
                    yield msg
            if heard:
                heard_at = time.monotonic()
                stall.heard()
            elif stall.look():
                why = stall.check(consumer, topic, at)
                if why is not None:
                    consumer = renewed_reader(consumer, bootstrap, topic, "riverflow-reader",
                                              {"enable.partition.eof": True}, at, why)  # fmt: skip
                    stall.heard()
    finally:
        consumer.close()


class GroupProgress:
    """How far a consumer group has got through a topic, as a time on ``clock``.

    Called (at most every ``poll_s``; between calls the last answer is returned)
    it returns T such that every message produced to ``topic`` before T has
    been committed by ``group``, or None until that is first known. It reads the
    high watermarks at T, then waits until the group's committed offsets reach
    them; then T is confirmed and a new probe starts. The learner's
    ``ScoredThrough`` in the Kafka runtime: the scorer group's committed offsets
    on the events topic (it commits a batch once its snapshots are stored).
    A Kafka error keeps the last answer (the learner's labels wait longer), and
    then no new probe starts until Kafka has answered again for ``settle_s``:
    producers hold what they made while the broker was out of reach and deliver
    it only once they reconnect (librdkafka retries a broker at most every
    ``RECONNECT_MAX_S``), so high watermarks read the moment
    Kafka is back do not cover what was produced during the outage. Errors for
    ``STALL_S`` on end bring a new consumer, the old one closing in the background
    (a client can stay stuck after a broker restart while new ones reach it, as the
    other readers here can: without it, no label would time out again).
    Not called for ``QUIET_GAP_S`` (its caller was held up: by an outage, often, that
    it never saw), it settles as after an error: seen under a Redis and then a broker
    restart, the learner blocked on its writes all through the outage, and its
    timeouts fell due before the clicks held meanwhile came (learned as negatives).
    """

    def __init__(
        self,
        bootstrap: str,
        group: str,
        topic: str,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        settle_s: float = 0.0,
    ) -> None:
        self.topic = topic
        self.poll_s = poll_s
        self.clock = clock
        self.settle_s = settle_s
        self._failed = False  # Kafka out of reach at the last call
        self._called: float | None = None  # when it was last called (on ``clock``)
        self._failing_since: float | None = None
        # group.id only names whose committed offsets are read: it never subscribes,
        # so it never joins the group or takes partitions from its members
        self._config = client_config(bootstrap, **{"group.id": group, "enable.auto.commit": False})
        self.consumer = Consumer(self._config)
        self._probe: tuple[float, dict[int, int]] | None = None
        self._through: float | None = None
        self._next = 0.0

    def __call__(self) -> float | None:
        now = self.clock()
        called, self._called = self._called, now
        if called is not None and now - called > QUIET_GAP_S:
            self._failed = True  # as if Kafka had been away: settle before a new probe
        if now < self._next:
            return self._through
        self._next = now + self.poll_s
        try:
            if self._probe is not None:
                at, highs = self._probe
                committed = self._committed(list(highs))
                if all(h <= 0 or committed.get(p, -1) >= h for p, h in highs.items()):
                    self._through, self._probe = at, None
            if self._probe is None:
                at = self.clock()
                highs = self._highs()
                if self._failed:  # Kafka answers again: let the producers catch up first
                    self._failed, self._probe = False, None
                    self._next = self.clock() + max(self.settle_s, self.poll_s)
                else:
                    self._probe = (at, highs)
            self._failing_since = None
        except KafkaException as exc:
            log.warning("reading how far the group has got on %s: %s", self.topic, exc)
            self._failed = True
            if self._failing_since is None:
                self._failing_since = now
            elif now - self._failing_since >= STALL_S:
                self._renew()
        return self._through

    def _renew(self) -> None:
        try:
            consumer = Consumer(self._config)
        except KafkaException as exc:
            log.warning("reading how far the group has got on %s: no new consumer yet: %s",
                        self.topic, exc)  # fmt: skip
            return
        log.warning("reading how far the group has got on %s: a new consumer, after "
                    "errors for %.0f s", self.topic, STALL_S)  # fmt: skip
        old, self.consumer, self._failing_since = self.consumer, consumer, None
        threading.Thread(target=old.close, name="progress-close", daemon=True).start()

    def _highs(self) -> dict[int, int]:
        meta = self.consumer.list_topics(self.topic, timeout=5).topics.get(self.topic)
        if meta is None or meta.error is not None:
            raise KafkaException(f"no topic {self.topic!r}")
        highs = {}
        for p in sorted(meta.partitions):
            _, high = self.consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=5)
            highs[p] = high
        return highs

    def _committed(self, partitions: list[int]) -> dict[int, int]:
        tps = [TopicPartition(self.topic, p) for p in partitions]
        return {tp.partition: tp.offset for tp in self.consumer.committed(tps, timeout=5)}

    def close(self) -> None:
        self.consumer.close()


class ReadProgress(GroupProgress):
    """``GroupProgress`` of a reader in this process that commits nothing to Kafka:
    T such that every message produced to ``topic`` before T has been read, from
    the reader's own ``positions`` (partition -> next offset to read), over every
    partition the topic has (one added while the reader runs is read from its start,
    ``PartitionWatch``: a label there is read before T passes it).
    ``clock``: wall time by default, the time record timestamps are in.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        positions: Callable[[], Mapping[int, int]],
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.time,
        settle_s: float = 0.0,
    ) -> None:
        # (the group is never joined, nor are its offsets read)
        group = f"riverflow-read-progress-{topic}"
        super().__init__(bootstrap, group, topic, poll_s, clock, settle_s)
        self._positions = positions

    def _committed(self, partitions: list[int]) -> dict[int, int]:
        read = self._positions()
        return {p: read.get(p, -1) for p in partitions}


class TopicIndex(Protocol):
    """What ``TopicFollower`` keeps up to date: an index of a topic's records that
    stores its own read positions with them (``features.scored.DiskScoredIndex``)."""

    def add(self, messages: Sequence[Message]) -> None: ...

    def positions(self, source: str) -> dict[int, int]: ...


class TopicFollower:
    """Reads every partition of ``topic`` into ``index``, without a consumer group
    (it commits nothing and joins no rebalance): the index's stored positions say
    where to go on from, if they were saved for this cluster and topic. A
    partition the index has no position for starts at the first message not
    older than ``since_s`` (the label horizon: older records could not be joined
    anyway).

    ``follow`` indexes what has arrived, at most ``max_per_call`` messages a
    call; ``caught_up`` reads the high watermarks now and reads on until every
    partition reaches them (within the same bound): then every message written
    before the call is indexed. Where a partition is comes from its messages
    and from librdkafka's end-of-partition events, which also count the
    transaction markers an exactly-once scorer leaves.

    A consumer that stops fetching is replaced by a new one assigned where this one
    had read to: seen after a broker restart, when the client called the topic's
    partitions unknown and then fetched nothing while the topic grew, so the
    learner's labels waited for their events for good. It is replaced when the
    high watermarks cannot be read for an unknown partition, or when ``caught_up``
    finds it behind and nothing has come for ``STALL_S`` (``follow`` asks that
    itself every ``STALL_S`` while nothing comes).
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        index: TopicIndex,
        since_s: float,
        max_per_call: int = 50_000,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.index = index
        self.max_per_call = max_per_call
        self._settings: dict[str, Any] = {
            "enable.partition.eof": True,
            # a saved position the topic no longer has: index it again from the start
            "auto.offset.reset": "earliest",
            **SIDE_READER_PREFETCH,
            **(config or {}),
        }
        self._group = f"riverflow-follower-{topic}"
        self.consumer, self.partitions = groupless_reader(
            bootstrap, topic, self._group, **self._settings
        )
        self._stall = Stall()
        cluster = self.consumer.list_topics(timeout=10).cluster_id
        start = dict(index.positions(f"{cluster}/{topic}"))
        new = [p for p in self.partitions if p not in start]
        if new:
            start.update(offsets_since(self.consumer, topic, new, since_s))
        self.at = {p: start[p] for p in self.partitions}  # the next offset per partition
        self.consumer.assign([TopicPartition(topic, p, o) for p, o in self.at.items()])
        self._since_s = since_s
        self._added = PartitionWatch(topic, self.partitions)

    def _take_added(self) -> None:
        """Partitions added to the topic since: read from their first record no older
        than the horizon (a new partition's first)."""
        added = self._added.added(self.consumer)
        if not added:
            return
        start = offsets_since(self.consumer, self.topic, added, self._since_s)
        self.partitions = sorted([*self.partitions, *added])
        self.at.update(start)
        assigned = [TopicPartition(self.topic, p, o) for p, o in start.items()]
        self.consumer.incremental_assign(assigned)

    def _high(self, partition: int, timeout_s: float) -> int:
        tp = TopicPartition(self.topic, partition)
        return int(self.consumer.get_watermark_offsets(tp, timeout=timeout_s)[1])

    def follow(self) -> int:
        """Index what has arrived (bounded); returns how many messages were read.
        Silent for ``STALL_S``, it looks at the topic's end (``caught_up``) at most
        every ``STALL_S``: a stalled consumer is found even when nobody asks."""
        self._take_added()
        read = 0
        while read < self.max_per_call:
            batch = self.consumer.consume(1000, timeout=0)
            if not batch:
                break
            read += self._add(batch)
        if not read and self._stall.look():
            self.caught_up(LOOK_TIMEOUT_S)
        return read

    def caught_up(self, timeout_s: float = 10.0) -> bool:
        """Whether everything written before the call is indexed (the ends read
        within ``timeout_s`` each), in partitions added since too."""
        self._take_added()
        try:
            highs = {p: self._high(p, timeout_s) for p in self.partitions}
        except KafkaException as exc:
            log.warning("reading the end of %s: %s", self.topic, exc)
            why = unknown_why(exc)
            if why is not None:
                self._renew(why)
            return False
        read = 0
        while read < self.max_per_call:
            if all(self.at[p] >= h for p, h in highs.items()):
                self._stall.stalled(behind=False)
                return True
            batch = self.consumer.consume(1000, timeout=0.5)
            if not batch:  # the broker is slow or away: not known yet
                why = self._stall.behind_by(sum(max(0, h - self.at[p]) for p, h in highs.items()))
                if why is not None:
                    self._renew(why)
                return False
            read += self._add(batch)
        return False

    def _renew(self, why: str) -> None:
        self.consumer = renewed_reader(self.consumer, self.bootstrap, self.topic, self._group,
                                       self._settings, self.at, why)  # fmt: skip
        self._stall.heard()

    def _add(self, batch: list[Any]) -> int:
        self._stall.heard()
        messages = []
        for msg in batch:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    p = msg.partition()
                    self.at[p] = max(self.at.get(p, 0), msg.offset())
                else:
                    log.warning("reading %s: %s", self.topic, err)
                continue
            ts_type, ts = msg.timestamp()
            messages.append(
                Message(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value(),
                        ts if ts_type else None)
            )  # fmt: skip
            self.at[msg.partition()] = max(self.at.get(msg.partition(), 0), msg.offset() + 1)
        if messages:
            self.index.add(messages)
        return len(messages)

    def close(self) -> None:
        self.consumer.close()
