"""The Kafka host: a Faust app per stage, its agent running a processor over batches.

Offsets: Faust acks a batch's events only after the loop body returns, and the
body returns only once every output of the batch is acknowledged by the broker,
so a committed offset never covers an event whose prediction could be lost.

The processor runs in a worker thread of its own (one, so never two batches at
once), not on the event loop, as Faust asks of blocking work: a batch that waits
out a Redis outage (the guard's backoff sleeps) leaves the loop to Faust's own
services (fetching, committing, its monitors). Faust's consumer heartbeats from
a thread of its own, so the group membership survives either way
(tests/integration/test_server_restarts.py). Outputs that wait over a second
for their acks make the stage degraded (``/healthz``) until they are
acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faust
from aiokafka.helpers import create_ssl_context
from faust.types import TP

from riverflow.streams.contracts import Message, Output, Processor
from riverflow.streams.hosting import HostSettings, StageReporter
from riverflow.streams.kafka_io import METADATA_REFRESH_S, security

log = logging.getLogger(__name__)


def faust_credentials(config: dict[str, Any]) -> Any | None:
    """Faust's (aiokafka's) credentials from librdkafka's security settings
    (``kafka_io.use_security``): the same login and certificates for either host."""
    protocol = config.get("security.protocol", "PLAINTEXT")
    if protocol == "PLAINTEXT":
        return None
    context = None
    if protocol.endswith("SSL"):
        password = config.get("ssl.key.password")
        context = create_ssl_context(
            cafile=config.get("ssl.ca.location"),
            certfile=config.get("ssl.certificate.location"),
            keyfile=config.get("ssl.key.location"),
            password=password,
        )
        context.check_hostname = config.get("ssl.endpoint.identification.algorithm") != "none"
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=config["sasl.username"], password=config["sasl.password"],
            mechanism=config["sasl.mechanism"], ssl_context=context,
        )  # fmt: skip
    return faust.SSLCredentials(context)


def stage_app(
    processor: Processor,
    source: str,
    settings: HostSettings,
    metrics: StageReporter | None = None,
    datadir: str | None = None,
) -> faust.App:
    """A Faust app whose one agent feeds ``source`` to ``processor`` in batches of up to
    ``settings.batch_size``, waiting at most ``settings.poll_s`` to fill one.

    ``settings.tick_s`` also calls the processor with an empty batch on a timer (the
    scorer follows the champion pointer on it while the stream is quiet);
    ``settings.freeze_gc`` is the confluent loop's only. ``datadir``: where Faust keeps
    its files (default: ``{group}-data`` in the working directory, Faust's own default).
    """
    group, batch_size, tick_s, dlq_topic = (
        settings.group,
        settings.batch_size,
        settings.tick_s,
        settings.dlq_topic,
    )
    extra: dict[str, Any] = {}
    if datadir is not None:
        Path(datadir).mkdir(parents=True, exist_ok=True)  # Faust makes only the last level
        extra["datadir"] = datadir
    credentials = faust_credentials(security())
    if credentials is not None:
        extra["broker_credentials"] = credentials
    app = faust.App(
        group,
        **extra,
        broker=f"kafka://{settings.bootstrap}",
        key_serializer="raw",
        value_serializer="raw",
        store="memory://",
        web_enabled=False,
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        producer_max_request_size=4 * 1024 * 1024,
        consumer_max_fetch_size=4 * 1024 * 1024,
        broker_commit_every=batch_size,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(0.1, settings.session_timeout_s / 5),
        # partitions added to a topic are seen at the next refresh (aiokafka: 5 minutes)
        consumer_metadata_max_age_ms=int(METADATA_REFRESH_S * 1000),
        producer_metadata_max_age_ms=int(METADATA_REFRESH_S * 1000),
    )
    topics: dict[str, Any] = {}

    def topic(name: str) -> Any:
        if name not in topics:
            topics[name] = app.topic(name, key_type=bytes, value_type=bytes)
        return topics[name]

    async def write(batch: list[Message], outputs: list[Output], started: float) -> None:
        futures = [await topic(o.topic).send(key=o.key, value=o.value, force=True) for o in outputs]
        acked = asyncio.gather(*futures)
        late = False
        while not (await asyncio.wait({acked}, timeout=1.0))[0]:
            late = True
            if metrics is not None:
                metrics.set_degraded(f"Kafka: {len(outputs)} outputs wait for their acks", "kafka")
        acked.result()  # a delivery error raises here
        if metrics is None:
            return
        if late:
            metrics.set_degraded(None, "kafka")
        metrics.set_status(processor.status())
        if not batch and not outputs:
            metrics.heartbeat()
            return
        metrics.observe(batch, outputs, time.perf_counter() - started, dlq_topic)
        for tp in {(m.topic, m.partition) for m in batch}:
            high = app.consumer.highwater(TP(*tp))
            last = max(m.offset for m in batch if (m.topic, m.partition) == tp)
            metrics.set_lag(tp[0], tp[1], max(0, high - last - 1))

    lock = asyncio.Lock()  # the agent and the timer never run the processor at once
    worker = ThreadPoolExecutor(1, thread_name_prefix=processor.stage)

    async def process(batch: list[Message]) -> list[Output]:
        return await asyncio.get_running_loop().run_in_executor(worker, processor.process, batch)

    @app.agent(topic(source), name=f"{processor.stage}-agent")
    async def run(stream: Any) -> None:
        async for events in stream.take_events(batch_size, within=settings.poll_s):
            started = time.perf_counter()
            batch = [
                Message(e.message.topic, e.message.partition, e.message.offset,
                        e.message.key, e.message.value, int(e.message.timestamp * 1000))
                for e in events
            ]  # fmt: skip
            async with lock:
                await write(batch, await process(batch), started)

    if tick_s is not None:

        @app.timer(interval=tick_s)
        async def tick() -> None:
            async with lock:
                await write([], await process([]), time.perf_counter())

    return app


def run_worker(app: faust.App, loglevel: str = "warning") -> None:
    """Run the app until SIGTERM/SIGINT (clean shutdown, final commit)."""
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
