"""What a Kafka host is given, whichever it is (confluent-kafka loop or Faust): where it
reads and how it batches, and what it reports to after every batch: the stage's
metrics exporter.

The exporter lives with the monitors (``riverflow.monitors.exporter.StageMetrics``,
which satisfies this protocol structurally); the composition root passes it in, so
transport never imports what it reports to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from riverflow.streams.contracts import Message, Output


class StageReporter(Protocol):
    """Throughput, outcomes, lag and liveness of one stage, as its host sees them."""

    def observe(
        self, batch: Sequence[Message], outputs: Sequence[Output], seconds: float, dlq_topic: str
    ) -> None:
        """A batch whose outputs are acknowledged, ``seconds`` after it was taken; outputs
        to ``dlq_topic`` are dead letters."""
        ...

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        """Messages of the partition not consumed yet."""
        ...

    def set_status(self, status: dict[str, float]) -> None:
        """What the processor reports (``Processor.status``)."""
        ...

    def heartbeat(self) -> None:
        """The loop went round without a batch (the stage is alive while quiet)."""
        ...

    def set_degraded(self, reason: str | None, source: str = "stage") -> None:
        """The stage waits for a server (``reason``; None: no longer); ``source``
        names who says so (the host: ``kafka``), each clearing only its own."""
        ...


@dataclass(frozen=True)
class HostSettings:
    """Where a stage's loop reads and how it batches."""

    bootstrap: str
    group: str
    batch_size: int
    poll_s: float = 0.1  # the longest wait for a batch's first message
    # the longest a batch waits to fill once its first message is in, only while events
    # come fast (confluent host: ``LINGER_FROM_RATE``, ``LINGER_BATCH``)
    linger_s: float = 0.02
    tick_s: float | None = None  # also call the processor with an empty batch this often
    dlq_topic: str = ""  # outputs to it are reported as dead letters
    freeze_gc: bool = False  # freeze the heap after every batch (module docstring)
    # consumer-group membership and delivery (the confluent loop; Faust: session only)
    instance_id: str | None = None  # group.instance.id: static membership (None = dynamic)
    session_timeout_s: float = 6.0  # a member silent this long loses its partitions
    max_poll_interval_s: float = 300.0  # a batch slower than this leaves the group
    commit_interval_s: float = 1.0  # offsets committed at most this often, one commit in flight
    exactly_once: bool = False  # Kafka transactions: outputs and offsets commit together
    transaction_timeout_s: float = 5.0  # the broker aborts a transaction open this long
    transaction_interval_s: float = 0.1  # a transaction spans the batches of this long
    write_timeout_s: float = 120.0  # a batch's outputs wait this long for a broker that is down
