"""What ``riverflow bench`` reports: every throughput beside its ratios to the limit
(River alone) and to bare (the transport-plus-model peer), on synthetic figures."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from riverflow.tools.bench import BenchResult, report
from tests.conftest import REPO_ROOT


def drain(rate: float, **more: Any) -> dict[str, Any]:
    return {"drain_events_per_s": rate, "cpu_s_per_million": 90.0, "kafka_cpu_s_per_million": 20.0,
            "redis_cpu_s_per_million": 3.0, "peak_rss_mb": 120.0, **more}  # fmt: skip


def result(peers: bool = True) -> BenchResult:
    hold = {"rate": 6_000, "sustained": True}
    latency = {"rate": 1_000, "offered_per_s": 1_000.0, "sent": 5_000, "received": 5_000,
               "sustained": True, "p50_ms": 4.0, "p95_ms": 9.0, "p99_ms": 20.0}  # fmt: skip
    return BenchResult(
        machine={"cpus": 2},
        spec={
            "name": "fraudbench",
            "features": 6,
            "model": "HoeffdingTreeClassifier",
            "events": 30_000,
        },
        limit={"predict_learn_events_per_s": 10_000.0, "predict_only_events_per_s": 40_000.0},
        embedded={"events_per_s": 2_000.0, "cpu_s_per_million": 500.0},
        kafka={
            "confluent": drain(
                7_000.0,
                max_sustained_events_per_s=6_000,
                search={"holds": [hold]},
                latency={"1000": latency},
            ),
            "confluent, exactly_once": drain(5_000.0),
        },
        peers={"bare": drain(12_500.0, events=30_000), "textbook": drain(500.0, events=5_000)}
        if peers
        else {},
    )


def test_every_throughput_is_divided_by_the_limit_and_by_bare() -> None:
    ratios = result().ratios()
    assert ratios == {
        "limit": {"to_limit": 1.0, "to_bare": 0.8},
        "predict_only": {"to_limit": 4.0, "to_bare": 3.2},
        "embedded": {"to_limit": 0.2, "to_bare": 0.16},
        "confluent: drain": {"to_limit": 0.7, "to_bare": 0.56},
        "confluent: max sustained": {"to_limit": 0.6, "to_bare": 0.48},
        "confluent, exactly_once: drain": {"to_limit": 0.5, "to_bare": 0.4},
        "bare": {"to_limit": 1.25, "to_bare": 1.0},
        "textbook": {"to_limit": 0.05, "to_bare": 0.04},
    }


def test_without_the_peers_there_is_no_ratio_to_bare() -> None:
    ratios = result(peers=False).ratios()
    assert "bare" not in ratios and "textbook" not in ratios
    assert {r["to_bare"] for r in ratios.values()} == {None}
    assert ratios["confluent: drain"]["to_limit"] == pytest.approx(0.7)


def test_the_json_carries_the_peers_and_the_ratios() -> None:
    figures = result().as_dict()
    assert figures["peers"]["textbook"]["drain_events_per_s"] == 500.0
    assert figures["ratios"]["textbook"] == {"to_limit": 0.05, "to_bare": 0.04}


def table_rows(res: BenchResult) -> list[list[str]]:
    """The report's rows as cells."""
    console = Console(width=300, record=True)
    console.print(report(res))
    lines = [line for line in console.export_text().splitlines() if "│" in line]
    return [[c.strip() for c in line.strip("│ ").split("│")] for line in lines]


def figures(rows: list[list[str]], what: str) -> list[str]:
    """events/s, ÷ limit and ÷ bare of the one row that starts with ``what``."""
    (row,) = [row for row in rows if row[0].startswith(what)]
    return row[1:4]


def test_the_table_shows_each_row_with_both_ratios() -> None:
    rows = table_rows(result())
    assert figures(rows, "bare: consume → decode →") == ["12,500", "1.25", "1.00"]
    assert figures(rows, "textbook Faust agent") == ["500", "0.05", "0.04"]
    assert figures(rows, "Kafka scorer on confluent:") == ["7,000", "0.70", "0.56"]
    assert figures(rows, "max sustained") == ["6,000", "0.60", "0.48"]
    assert figures(rows, "Kafka scorer on confluent, exactly") == ["5,000", "0.50", "0.40"]
    assert figures(rows, "River alone: predict + learn") == ["10,000", "1.00", "0.80"]
    assert figures(rows, "embedded") == ["2,000", "0.20", "0.16"]


def test_the_table_leaves_the_bare_column_empty_without_the_peers() -> None:
    rows = table_rows(result(peers=False))
    assert figures(rows, "Kafka scorer on confluent:") == ["7,000", "0.70", ""]
    assert not any(row[0].startswith(("bare", "textbook")) for row in rows)


def test_latency_percentiles_include_p99_9_by_nearest_rank() -> None:
    from riverflow.tools.bench import _percentiles

    figures = _percentiles([i / 1000 for i in range(2000)])  # 0 .. 1.999 s
    assert figures["p50_ms"] == 1000.0
    assert figures["p99_ms"] == 1980.0
    assert figures["p999_ms"] == 1998.0
    assert figures["max_ms"] == 1999.0


def test_the_timed_drain_follows_a_warm_up_as_long_as_the_longest_window() -> None:
    # the paced holds run on full windows: the drain they are compared to must too
    from riverflow.spec import load_spec
    from riverflow.tools.bench import MAX_DRAIN_WARMUP, BenchConfig, drain_warmup

    bench = load_spec(str(REPO_ROOT / "examples" / "fraud-bench.yaml"))
    assert drain_warmup(bench, BenchConfig.quick()) == 86_400  # 24 h at one event a second
    assert drain_warmup(bench, BenchConfig(drain_warmup=0)) == 0
    week = bench.model_copy(update={"features": [
        f.model_copy(update={"window": "7d"}) for f in bench.features]})  # fmt: skip
    assert drain_warmup(week, BenchConfig()) == MAX_DRAIN_WARMUP
    res = result()
    res.kafka["confluent"].update(drain_warmup_events=86_400, warmup_events_per_s=9_000.0)
    rows = table_rows(res)
    assert figures(rows, "Kafka scorer on confluent: backlog drain after 86,400")[0] == "7,000"
    assert figures(rows, "the first 86,400 (windows filling)")[0] == "9,000"


def test_the_recsys_rows_say_which_rate_held_its_lag() -> None:
    """The 1,000 requests/s point and, when it was not sustained, the point at a share
    of the drain: each says whether the lag stayed bounded."""
    res = result()

    def point(rate: int, sustained: bool) -> dict[str, Any]:
        return {"rate": rate, "offered_per_s": float(rate), "sent": 10 * rate,
                "received": 10 * rate, "sustained": sustained, "p50_ms": 3_000.0,
                "p99_ms": 5_000.0, "p999_ms": 6_000.0}  # fmt: skip

    res.slates = {"slate": 20, "drain_requests_per_s": 950.0, "drain_items_per_s": 19_000.0,
                  "cpu_s_per_million_requests": 1_000.0, "peak_rss_mb": 150.0,
                  "latency": {"1000": point(1_000, False), "450": point(450, True)}}  # fmt: skip
    rows = {row[0]: row for row in table_rows(res)}
    assert rows["recsys at 1,000 requests/s (10,000/10,000 back, lag grows)"][1] == "1,000"
    assert rows["recsys at 450 requests/s (4,500/4,500 back, lag bounded)"][1] == "450"
