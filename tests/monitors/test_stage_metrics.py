"""The stage's status reaches the right Prometheus gauge, batch after batch."""

from __future__ import annotations

from riverflow.monitors.exporter import StageMetrics


def test_each_status_name_sets_its_gauge_and_later_batches_update_it() -> None:
    metrics = StageMetrics("scorer")
    sample = metrics.registry.get_sample_value

    def values() -> list[float | None]:
        return [
            sample("riverflow_stage_status", {"stage": "scorer", "name": "model_version"}),
            sample("riverflow_field_quality",
                   {"stage": "scorer", "field": "amount", "measure": "missing_rate"}),
            sample("riverflow_cleaned_values",
                   {"stage": "scorer", "field": "amount", "rule": "clip"}),
            sample("riverflow_event_freshness_seconds", {"stage": "scorer", "partition": "2"}),
            sample("riverflow_field_type_errors", {"stage": "scorer", "field": "ts"}),
        ]  # fmt: skip

    status = {"model_version": 3.0, "missing_rate:amount": 0.25, "cleaned:amount:clip": 4.0,
              "freshness_s:2": 0.5, "type_errors:ts": 1.0}  # fmt: skip
    metrics.set_status(status)
    assert values() == [3.0, 0.25, 4.0, 0.5, 1.0]
    # the next batch's values replace them, on the same series
    metrics.set_status({name: value * 2 for name, value in status.items()})
    assert values() == [6.0, 0.5, 8.0, 1.0, 2.0]
    metrics.set_status({"model_version": 7.0})  # a name left out keeps its last value
    assert values() == [7.0, 0.5, 8.0, 1.0, 2.0]


def test_the_lag_of_each_partition_is_its_own_series_and_follows_each_batch() -> None:
    metrics = StageMetrics("scorer")

    def lags() -> list[float | None]:
        return [
            metrics.registry.get_sample_value(
                "riverflow_consumer_lag", {"stage": "scorer", "topic": t, "partition": p}
            )
            for t, p in (("events", "0"), ("events", "1"), ("labels", "0"))
        ]

    metrics.set_lag("events", 0, 120)
    metrics.set_lag("events", 1, 7)
    assert lags() == [120.0, 7.0, None]
    metrics.set_lag("events", 0, 3)  # the next batch: the same series, its new value
    metrics.set_lag("labels", 0, 40)
    assert lags() == [3.0, 7.0, 40.0]
