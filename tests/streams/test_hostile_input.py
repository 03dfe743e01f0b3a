"""No message can crash or stall a stage: every hostile class, on the embedded runtime
(the same processors and guard as the Kafka hosts), and the guard itself."""

from __future__ import annotations

import base64
import hashlib
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence

import orjson
import pytest
import redis

from riverflow.embedded import EmbeddedRuntime
from riverflow.monitors.exporter import StageMetrics, serve
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec
from riverflow.stages.common import dead_letter, guarded
from riverflow.streams.contracts import DeadLetter, Message, Output, Prediction
from riverflow.streams.guard import StageOutage
from riverflow.streams.kafka_io import KafkaIOError
from riverflow.streams.topics import Topics
from riverflow.tools.hostile import HostileEvents
from riverflow.tools.stack import free_port


def letters(rt: EmbeddedRuntime) -> list[DeadLetter]:
    return [DeadLetter.decode(v) for _, v in rt.messages(rt.topics.dlq)]


def test_every_hostile_class_gets_its_kind_and_every_valid_event_one_prediction(
    fraud_spec: PipelineSpec, settings: Settings
) -> None:
    rt = EmbeddedRuntime(fraud_spec, settings)
    gen = HostileEvents(fraud_spec.events, seed=1, optional=fraud_spec.optional_fields)
    sent = []
    for name in sorted(gen.classes):
        sent += [gen.valid(), gen.one(name)]
    sent += [gen.oversized(), gen.oversized_key(), gen.valid()]
    for h in sent:
        rt.produce(rt.topics.events, h.key, h.value)  # type: ignore[arg-type]
    rt.drain()

    by_offset = dict(enumerate(sent))
    dead = [d for d in letters(rt) if d.stage == "scorer"]
    got = {by_offset[d.offset].cls: d.error_kind for d in dead}
    expected = {h.cls: h.kind for h in sent if h.kind is not None}
    assert got == expected
    assert all(d.error for d in dead)
    predicted = Counter(
        Prediction.decode(v).event_id for _, v in rt.messages(rt.topics.predictions)
    )
    valid = {h.event_id for h in sent if h.kind is None}
    assert set(predicted) == valid and set(predicted.values()) == {1}
    # an integer amount is a number
    assert "amount_int" in {h.cls for h in sent if h.kind is None}


def test_dead_letters_always_fit_and_still_identify_the_message(
    fraud_spec: PipelineSpec, settings: Settings
) -> None:
    gen = HostileEvents(fraud_spec.events, seed=2, optional=fraud_spec.optional_fields)
    big = gen.oversized()
    assert big.value is not None and len(big.value) > 3_000_000
    msg = Message(fraud_spec.topics.events, 0, 7, b"k" * (1 << 20), big.value)
    out = dead_letter(fraud_spec.topics, "scorer", msg, "oversized", "x" * 100_000)
    assert len(out.value) < 64 * 1024 and out.key is not None and len(out.key) == 64
    d = DeadLetter.decode(out.value)
    assert d.payload_b64 is None and d.payload_truncated and d.payload_bytes == len(big.value)
    assert d.payload_sha256 == hashlib.sha256(big.value).hexdigest()
    assert d.key_b64 is None and d.key_truncated and d.key_bytes == 1 << 20
    assert len(d.error) < 1100
    small = dead_letter(fraud_spec.topics, "scorer", msg.__class__("t", 0, 1, b"k", b"{"), "e", "e")
    s = DeadLetter.decode(small.value)
    assert base64.b64decode(s.payload_b64 or "") == b"{" and not s.payload_truncated


HOSTILE_BYTES = [
    None,
    b"",
    b"[" * 10_000 + b"]" * 10_000,
    b'{"event_id":"\\ud800","is_fraud":true}',
    b'{"event_id":"e1","is_fraud":"yes"}',
    b'{"event_id":"e1","is_fraud":NaN}',
    b"\x00\xff\xfe garbage",
    b"[]",
    b'{"event_id":"a","\\udc00":1,"is_fraud":true}',
]


def test_the_learner_refuses_hostile_labels_and_goes_on(
    fraud_spec: PipelineSpec, settings: Settings
) -> None:
    rt = EmbeddedRuntime(fraud_spec, settings)
    gen = HostileEvents(fraud_spec.events, seed=3, optional=fraud_spec.optional_fields)
    good = [gen.valid() for _ in range(5)]
    for h in good:
        rt.produce(rt.topics.events, h.key, h.value)  # type: ignore[arg-type]
    rt.drain()
    for raw in HOSTILE_BYTES:
        rt.produce(rt.topics.labels, b"k", raw)  # type: ignore[arg-type]
    for h in good:
        rt.produce(rt.topics.labels, None, orjson.dumps({"event_id": h.event_id, "is_fraud": True}))
    rt.drain()
    dead = [d for d in letters(rt) if d.stage == "learner"]
    assert sorted(d.offset for d in dead) == list(range(len(HOSTILE_BYTES)))
    assert rt.learner.learned == len(good)


def test_the_monitor_refuses_hostile_records_and_goes_on(
    fraud_spec: PipelineSpec, settings: Settings
) -> None:
    rt = EmbeddedRuntime(fraud_spec, settings)
    nan_prediction = orjson.dumps(
        {
            "event_id": "e",
            "entity": "c",
            "probability": 0.5,
            "model": "m",
            "version": 1,
            "features": {"a": 1.0},
            "event_time": 1.0,
            "scored_at": 1.0,
        }
    ).replace(b"0.5", b"NaN")
    hostile = [*HOSTILE_BYTES, nan_prediction]
    for raw in hostile:
        rt.produce(rt.topics.predictions, None, raw)  # type: ignore[arg-type]
        rt.produce(rt.topics.evaluations, None, raw)  # type: ignore[arg-type]
    rt.drain()
    dead = [d for d in letters(rt) if d.stage == "monitor"]
    assert Counter(d.topic for d in dead) == {
        rt.topics.predictions: len(hostile),
        rt.topics.evaluations: len(hostile),
    }
    assert {d.error_kind for d in dead} == {"bad_record"}


class Flaky:
    """A stage that raises on some messages, or while a 'server' is down."""

    stage = "scorer"

    def __init__(self, poison: set[bytes], down: int = 0, exc: Exception | None = None) -> None:
        self.poison, self.down, self.exc = poison, down, exc
        self.calls = 0

    def process(self, batch: Sequence[Message]) -> list[Output]:
        self.calls += 1
        if self.down > 0:
            self.down -= 1
            raise self.exc or redis.ConnectionError("Connection refused")
        for m in batch:
            if m.value in self.poison:
                raise KeyError(m.value)
        return [Output("out", None, m.value or b"") for m in batch]

    def status(self) -> dict[str, float]:
        return {}


def batch(values: list[bytes]) -> list[Message]:
    return [Message("in", 0, i, None, v) for i, v in enumerate(values)]


class Health:
    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def set_degraded(self, reason: str | None) -> None:
        self.seen.append(reason)


def test_the_guard_sends_what_still_raises_alone_to_the_dlq_and_processes_the_rest() -> None:
    topics = Topics("t")
    guard = guarded(Flaky({b"3", b"7"}), topics)
    out = guard.process(batch([str(i).encode() for i in range(10)]))
    done = [o.value for o in out if o.topic == "out"]
    assert done == [str(i).encode() for i in range(10) if i not in (3, 7)]
    dead = [DeadLetter.decode(o.value) for o in out if o.topic == topics.dlq]
    assert [(d.offset, d.error_kind) for d in dead] == [
        (3, "internal_error"),
        (7, "internal_error"),
    ]
    assert dead[0].error.startswith("KeyError")
    assert guard.status()["internal_errors"] == 2


class PersonalFlaky(Flaky):
    """``Flaky`` in a stage with personal data marked: its exceptions quote values."""

    pii = True

    def redact(self, msg: Message) -> tuple[Message, str]:
        return msg._replace(value=None), " (withheld)"


def test_a_stage_with_personal_data_keeps_exception_messages_out_of_the_dlq_and_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    topics = Topics("t")
    email = b"alice@example.com"
    for stage, quoted in ((PersonalFlaky({email}), False), (Flaky({email}), True)):
        caplog.clear()
        out = guarded(stage, topics).process(batch([b"1", email, b"2"]))
        (dead,) = [DeadLetter.decode(o.value) for o in out if o.topic == topics.dlq]
        assert dead.error_kind == "internal_error"
        assert dead.error.startswith("KeyError")
        assert ("alice" in dead.error) is quoted
        assert ("alice" in caplog.text) is quoted
        assert [o.value for o in out if o.topic == "out"] == [b"1", b"2"]


@pytest.mark.parametrize(
    "exc",
    [
        redis.ConnectionError("Connection refused"),
        redis.TimeoutError("Timeout reading from socket"),
        redis.BusyLoadingError("Redis is loading the dataset in memory"),
        redis.ResponseError("BUSY Redis is busy running a script."),
        # as redis-py raises a Redis Cluster's answers during a failover: its own class,
        # the code cut off the message ("CLUSTERDOWN The cluster is down"). A
        # ClusterDownError went to the DLQ as an internal error (a CI run, 2026-12-04)
        redis.exceptions.ClusterDownError("The cluster is down"),
        redis.exceptions.MasterDownError(
            "Link with MASTER is down and replica-serve-stale-data is set to 'no'."
        ),
        redis.exceptions.TryAgainError("Multiple keys request during rehashing of slot"),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
        redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        redis.exceptions.NoPermissionError(
            "this user has no permissions to run the 'evalsha' command"
        ),
        redis.exceptions.SlotNotCoveredError("Command # 1 (EVALSHA) failed: no node for slot 866"),
        redis.exceptions.RedisClusterUnreachableError("Redis Cluster cannot be connected."),
    ],
    ids=lambda e: type(e).__name__,
)
def test_the_guard_waits_out_a_server_outage_without_blaming_a_message(exc: Exception) -> None:
    topics = Topics("t")
    now = [0.0]
    health = Health()
    stage = Flaky(set(), down=4, exc=exc)
    guard = guarded(stage, topics, outage_limit_s=60, health=health)
    guard.sleep = lambda s: now.__setitem__(0, now[0] + s)
    guard.clock = lambda: now[0]
    waits: list[float] = []  # the exactly-once host commits its transaction here
    guard.on_wait.append(lambda: waits.append(now[0]))
    out = guard.process(batch([b"a", b"b"]))
    assert [o.value for o in out] == [b"a", b"b"]  # the same batch, once, nothing in the DLQ
    assert stage.calls == 5
    assert waits == [0.0]  # once, before the first wait
    assert health.seen[0] is not None and health.seen[-1] is None
    assert 0 < now[0] < 60


def test_an_outage_spanning_a_bisected_batch_is_logged_with_its_own_length(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch that raised something else while a server was down is bisected, call by
    call: the one that succeeds said "recovered after 43185.0s" (the clock's value, not
    the outage's length: a CI run, 2026-12-04)."""

    now = [43_000.0]
    topics = Topics("t")
    stage = Flaky({b"x"}, down=2)  # Redis down twice, then a message that raises
    guard = guarded(stage, topics, outage_limit_s=60)
    guard.sleep = lambda s: now.__setitem__(0, now[0] + s)
    guard.clock = lambda: now[0]
    with caplog.at_level("WARNING"):
        out = guard.process(batch([b"a", b"x"]))
    assert [o.value for o in out if o.topic == "out"] == [b"a"]
    assert [DeadLetter.decode(o.value).error_kind for o in out if o.topic == topics.dlq] == [
        "internal_error"
    ]
    (recovered,) = [r.getMessage() for r in caplog.records if "recovered after" in r.getMessage()]
    assert recovered == "scorer recovered after 0.6s", recovered
    assert guard.down_since is None and guard.degraded is None


def test_the_guard_gives_up_after_the_outage_limit() -> None:
    now = [0.0]
    stage = Flaky(set(), down=10**9)
    guard = guarded(stage, Topics("t"), outage_limit_s=60)
    guard.sleep = lambda s: now.__setitem__(0, now[0] + s)
    guard.clock = lambda: now[0]
    with pytest.raises(StageOutage, match=r"down 60s.*outage_limit_s.*Connection refused"):
        guard.process(batch([b"a"]))
    assert 60 <= now[0] < 61


class DownPoisonDown(Flaky):
    """Redis down for ``first`` calls, then a message that raises (the batch is
    bisected), then Redis down for good."""

    def __init__(self, first: int) -> None:
        super().__init__({b"x"}, down=first)
        self.poisoned = False

    def process(self, batch: Sequence[Message]) -> list[Output]:
        if self.down == 0 and self.poisoned:
            self.down = 10**9
        if self.down == 0:
            self.poisoned = True
        return super().process(batch)


def test_an_outage_that_a_bisection_spans_is_given_its_limit_once() -> None:
    """Each call of the bisection started the limit again: an outage of 48 s before a
    message raised and the batch was split was waited out 60 s more in the first half."""
    now = [0.0]
    stage = DownPoisonDown(first=50)  # 0.2 + 0.4 + 0.8 + 47 x 1 s of backoff: 48.4 s
    guard = guarded(stage, Topics("t"), outage_limit_s=60)
    guard.sleep = lambda s: now.__setitem__(0, now[0] + s)
    guard.clock = lambda: now[0]
    with pytest.raises(StageOutage, match=r"down 60s"):
        guard.process(batch([b"a", b"x"]))
    assert 60 <= now[0] < 61


def test_a_hook_that_fails_before_the_wait_stops_the_stage_and_blames_no_message() -> None:
    """The exactly-once host commits its transaction in the guard's hook; a host that
    then cannot go on (another process fences each new producer) raised there, and the
    guard took that for the batch's fault: bisected, every message in the DLQ."""
    stage = Flaky(set(), down=1)
    guard = guarded(stage, Topics("t"), outage_limit_s=60)
    guard.sleep = lambda s: None

    def fenced() -> None:
        raise KafkaIOError("transaction failed 3 times within 60 s: give each its own id")

    guard.on_wait.append(fenced)
    with pytest.raises(StageOutage, match="scorer: transaction failed 3 times"):
        guard.process(batch([b"a", b"b"]))
    assert guard.internal_errors == 0


def test_healthz_answers_503_with_the_reason_while_a_server_is_down() -> None:
    metrics = StageMetrics("scorer")
    server = serve(metrics, free_port())
    url = f"http://127.0.0.1:{server.server_port}/healthz"

    def healthz() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    try:
        assert healthz() == (200, b"ok\n")
        metrics.set_degraded("Redis: Connection refused")
        assert healthz() == (503, b"degraded: Redis: Connection refused\n")
        metrics.set_degraded("Kafka: 1/1 brokers are down", "kafka")
        assert healthz() == (
            503, b"degraded: Redis: Connection refused; Kafka: 1/1 brokers are down\n"
        )  # fmt: skip
        metrics.set_degraded(None)  # Redis back: Kafka's reason stays until it is back too
        assert healthz() == (503, b"degraded: Kafka: 1/1 brokers are down\n")
        metrics.set_degraded(None, "kafka")
        assert healthz() == (200, b"ok\n")
    finally:
        server.shutdown()
        server.server_close()
