"""The Kafka host: a Faust app per stage, its agent running a processor over batches.

Offsets: Faust acks a batch's events only after the loop body returns, and the
body returns only once every output of the batch is acknowledged by the broker,
so a committed offset never covers an event whose prediction could be lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol

import faust

from streams.contracts import Message, Output

log = logging.getLogger(__name__)


class Processor(Protocol):
    """What the host runs: a named stage turning a batch into outputs."""

    stage: str

    def process(self, batch: Sequence[Message]) -> list[Output]: ...


def stage_app(
    processor: Processor,
    source: str,
    bootstrap: str,
    group: str,
    batch_size: int,
    batch_timeout_s: float,
) -> faust.App:
    """A Faust app whose one agent feeds ``source`` to ``processor`` in batches."""
    app = faust.App(
        group,
        broker=f"kafka://{bootstrap}",
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
    )
    topics: dict[str, Any] = {}

    def topic(name: str) -> Any:
        if name not in topics:
            topics[name] = app.topic(name, key_type=bytes, value_type=bytes)
        return topics[name]

    async def write(outputs: list[Output]) -> None:
        futures = [await topic(o.topic).send(key=o.key, value=o.value, force=True) for o in outputs]
        await asyncio.gather(*futures)

    @app.agent(topic(source), name=f"{processor.stage}-agent")
    async def run(stream: Any) -> None:
        async for events in stream.take_events(batch_size, within=batch_timeout_s):
            batch = [
                Message(e.message.topic, e.message.partition, e.message.offset,
                        e.message.key, e.message.value)
                for e in events
            ]  # fmt: skip
            await write(processor.process(batch))

    return app


def run_worker(app: faust.App, loglevel: str = "warning") -> None:
    """Run the app until SIGTERM/SIGINT (clean shutdown, final commit)."""
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
