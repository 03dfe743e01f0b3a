"""The Faust host's app, as built (no broker: nothing here connects)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from riverflow.streams.contracts import Message, Output
from riverflow.streams.faust_app import stage_app
from riverflow.streams.hosting import HostSettings
from riverflow.streams.kafka_io import METADATA_REFRESH_S


class Nothing:
    stage = "scorer"

    def process(self, batch: Sequence[Message]) -> list[Output]:
        return []

    def status(self) -> dict[str, float]:
        return {}


def test_the_faust_hosts_clients_see_added_partitions_as_soon_as_the_confluent_ones(
    tmp_path: Path,
) -> None:
    """Partitions added to the events topic reach a Faust scorer's group at its
    consumer's metadata refresh, and its producer writes to new predictions partitions
    at its own: aiokafka's default is 5 minutes, every confluent client's 10 s."""
    settings = HostSettings("127.0.0.1:1", "riverflow-x-scorer", batch_size=100, poll_s=0.1,
                            dlq_topic="x.dlq")  # fmt: skip
    app = stage_app(Nothing(), "x.events", settings, datadir=str(tmp_path / "faust"))
    every_ms = int(METADATA_REFRESH_S * 1000)
    assert app.conf.consumer_metadata_max_age_ms == every_ms
    assert app.conf.producer_metadata_max_age_ms == every_ms
