"""Label-fed features in memory: every read equals a recount of the labels
written, new users and items start at the global rate, recency counts clicks
only, a label learned twice counts once and a label too late counts nowhere."""

from __future__ import annotations

import math

import pytest

from riverflow.features.definitions import FeatureSpec
from riverflow.features.labelled import LabelFeatures, LabelPlan, LearnedLabel
from tests.label_streams import PLAN, brute_force, check_stream, world

T0 = 1_767_225_600.0  # on an hour boundary: the 1h windows' 5-minute tiles start here
ALICE = {"user_id": "alice", "item_id": "i1", "category": "books"}


def plan(*features: dict[str, object], lateness_s: float = 3600.0) -> LabelPlan:
    specs = [
        FeatureSpec.model_validate({"source": "labels", "window": "1h", **f}) for f in features
    ]
    return LabelPlan.build(specs, "clicked", "user_id", lateness_s)


def label(n: int, fields: dict[str, str], clicked: bool, ts: float) -> LearnedLabel:
    return LearnedLabel(f"r{n}/{fields['item_id']}", fields, clicked, ts)


def test_reads_equal_a_recount_of_the_labels_written() -> None:
    totals = check_stream(LabelFeatures.in_memory(PLAN), requests=300, seed=3)
    assert totals["counted"] > 1000 and totals["late"] == 0 and totals["duplicates"] > 0
    assert totals["smoothed"] > 0 and totals["recent"] > 0


def test_a_batch_of_requests_at_many_times_reads_what_a_recount_gives_each() -> None:
    """As a scorer reads a batch: every request's pairs at its own time, in one call
    (the labels learned before the batch written first). Requests seconds apart share
    a tile bucket (their windows' tiles are summed once) and differ in the time since
    each entity's newest label; every value equals the recount at its request's time."""
    scored, labels = world(400, seed=5)
    features = LabelFeatures.in_memory(PLAN)
    written: list[LearnedLabel] = []
    due: list[LearnedLabel] = []
    recencies: set[float] = set()
    batches_of = [scored[i : i + 25] for i in range(0, len(scored), 25)]
    learned = iter(labels)
    pending = next(learned, None)
    for batch in batches_of:
        while pending is not None and pending[0] <= batch[0].ts:
            due.append(pending[1])
            pending = next(learned, None)
        assert features.write(due).late == 0
        written, due = written + due, []
        pairs = [pair for request in batch for pair in request.pairs]
        times = [request.ts for request in batch for _ in request.pairs]
        wanted = [v for r in batch for v in brute_force(written, r.pairs, r.ts)]
        got = features.read(pairs, times)
        assert len(got) == len(wanted) == len(pairs)
        for pair, t, values, want in zip(pairs, times, got, wanted, strict=True):
            assert values.keys() == want.keys()
            for name, value in values.items():
                assert math.isclose(value, want[name], rel_tol=1e-12, abs_tol=1e-12), (
                    name, value, want[name], pair, t,
                )  # fmt: skip
            recencies.add(values["item_since_shown"])
    # not vacuous: labels were read, and one batch's requests read different recencies
    assert len(written) > 1000 and len(recencies) > 100


def test_new_users_start_at_the_global_rate_and_move_to_their_own() -> None:
    features = LabelFeatures.in_memory(
        plan(
            {"name": "ctr", "agg": "rate", "field": "clicked", "prior": 10},
            {"name": "raw", "agg": "rate", "field": "clicked"},
        )
    )
    # others: 1 click in 4 labels
    others = [label(n, {**ALICE, "user_id": f"u{n}"}, n % 4 == 0, T0 + n) for n in range(40)]
    features.write(others)
    new = features.read([{**ALICE, "user_id": "newcomer"}], T0 + 60)[0]
    assert new == {"ctr": 0.25, "raw": 0.0}
    # alice clicks everything: after 10 labels she is halfway from the global rate
    # (now 20 / 50) to her own (1.0)
    features.write([label(100 + n, ALICE, True, T0 + 50) for n in range(10)])
    alice = features.read([ALICE], T0 + 60)[0]
    assert alice["raw"] == 1.0
    assert alice["ctr"] == pytest.approx((10 + 10 * 20 / 50) / (10 + 10))


def test_counts_and_sums_of_shown_and_clicked_items() -> None:
    features = LabelFeatures.in_memory(
        plan(
            {"name": "shown", "agg": "count", "entity": "item_id"},
            {"name": "clicks", "agg": "count", "entity": "item_id", "when": "clicked"},
            {"name": "clicked", "agg": "sum", "field": "clicked", "entity": "item_id"},
        )
    )
    features.write([label(n, {**ALICE, "user_id": f"u{n}"}, n < 3, T0 + n) for n in range(7)])
    assert features.read([ALICE], T0 + 10) == [{"shown": 7.0, "clicks": 3.0, "clicked": 3.0}]


def test_since_a_click_counts_clicks_only_and_is_the_window_without_one() -> None:
    features = LabelFeatures.in_memory(
        plan(
            {"name": "since_click", "agg": "since", "entity": ["user_id", "category"],
             "when": "clicked"},
            {"name": "since_shown", "agg": "since", "entity": ["user_id", "category"]},
        )
    )  # fmt: skip
    features.write([label(1, ALICE, True, T0 + 100), label(2, ALICE, False, T0 + 400)])
    films = {**ALICE, "category": "films"}
    features.write([label(3, films, False, T0 + 400)])
    books, films_read = features.read([ALICE, films], T0 + 900)
    assert books == {"since_click": 800.0, "since_shown": 500.0}
    assert films_read == {"since_click": 3600.0, "since_shown": 500.0}  # no click: the window
    # an hour and a tile later the click has left the window
    assert features.read([ALICE], T0 + 100 + 3600 + 300)[0]["since_click"] == 3600.0


def test_windows_slide_with_the_read_time() -> None:
    features = LabelFeatures.in_memory(plan({"name": "shown", "agg": "count"}))
    features.write([label(1, ALICE, True, T0 + 10), label(2, ALICE, False, T0 + 1800)])
    times = [T0 + 1800, T0 + 3600 + 10, T0 + 3600 + 1800, T0]
    assert [v["shown"] for v in features.read([ALICE] * 4, times)] == [2.0, 1.0, 0.0, 1.0]


def test_a_read_sees_no_label_of_a_later_tile() -> None:
    """Point in time: a read at ``at`` counts labels up to ``at``'s tile (5 minutes
    wide here), whatever was learned since."""
    features = LabelFeatures.in_memory(plan({"name": "shown", "agg": "count"}))
    features.write([label(n, ALICE, False, T0 + 300 * n) for n in range(6)])
    assert [v["shown"] for v in features.read([ALICE] * 3, [T0, T0 + 299, T0 + 600])] == [
        1.0, 1.0, 3.0,
    ]  # fmt: skip


def test_a_label_learned_again_counts_once() -> None:
    features = LabelFeatures.in_memory(plan({"name": "shown", "agg": "count"}))
    batch = [label(n, ALICE, False, T0 + n) for n in range(5)]
    assert features.write(batch).counted == 5
    again = features.write([*batch[3:], label(9, ALICE, True, T0 + 9)])
    assert (again.counted, again.duplicates) == (1, 2)
    assert features.read([ALICE], T0 + 10)[0]["shown"] == 6.0


def test_a_label_later_than_the_lateness_counts_nowhere() -> None:
    features = LabelFeatures.in_memory(plan({"name": "shown", "agg": "count"}, lateness_s=600))
    features.write([label(1, ALICE, False, T0 + 1200)])
    result = features.write([label(2, ALICE, True, T0 + 500), label(3, ALICE, True, T0 + 700)])
    assert (result.counted, result.late) == (2, 1)
    assert features.read([ALICE], T0 + 1200)[0]["shown"] == 2.0


def test_bad_pairs_and_labels_are_refused_naming_the_problem() -> None:
    features = LabelFeatures.in_memory(
        plan({"name": "cat", "agg": "count", "entity": ["user_id", "category"]})
    )
    with pytest.raises(ValueError, match="no field 'category'"):
        features.read([{"user_id": "alice"}], T0)
    with pytest.raises(ValueError, match="not a bool or finite number"):
        features.write([LearnedLabel("r1/i1", ALICE, "yes", T0)])
    with pytest.raises(ValueError, match="'r1/i1' is nan"):
        features.write([LearnedLabel("r1/i1", ALICE, float("nan"), T0)])
    with pytest.raises(ValueError, match="2 pairs but 1 read times"):
        features.read([ALICE, ALICE], [T0])
    with pytest.raises(ValueError, match="out of the feature store's range"):
        features.read([ALICE], float("nan"))


def test_forgetting_a_user_erases_their_windows_alone_and_crossed() -> None:
    features = LabelFeatures.in_memory(
        plan(
            {"name": "user", "agg": "count"},
            {"name": "cross", "agg": "count", "entity": ["user_id", "category"]},
            {"name": "item", "agg": "count", "entity": "item_id"},
        )
    )
    bob = {**ALICE, "user_id": "bob"}
    features.write([label(1, ALICE, True, T0), label(2, bob, False, T0)])
    assert features.forget("user_id", "alice") == 2
    assert features.read([ALICE, bob], T0) == [
        {"user": 0.0, "cross": 0.0, "item": 2.0},
        {"user": 1.0, "cross": 1.0, "item": 2.0},
    ]
