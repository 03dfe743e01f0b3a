"""The embedded store: windows equal a brute-force recount; replays never double count."""

from __future__ import annotations

import orjson

from features.store import Claim, FeatureRequest, FeatureSnapshot, MemoryFeatureStore
from riverflow.generator import FraudStreamConfig, transactions
from riverflow.spec import PipelineSpec
from tests.helpers import assert_features_match, brute_force_features


def requests(spec: PipelineSpec, n: int, **config: object) -> list[FeatureRequest]:
    out = []
    for event, _ in transactions(n, FraudStreamConfig(**config)):  # type: ignore[arg-type]
        out.append(
            FeatureRequest(
                event["event_id"], event["ts"], {"card_id": event["card_id"]},
                {"amount": event["amount"]}, orjson.dumps({"amount": event["amount"]}),
            )
        )  # fmt: skip
    return out


def test_windows_equal_brute_force(fraud_spec: PipelineSpec) -> None:
    # few cards and a short gap: windows hold many events and buckets roll over
    config = {"cards": 20, "mean_gap_s": 30.0}
    events = [e for e, _ in transactions(3000, FraudStreamConfig(**config))]  # type: ignore[arg-type]
    plan = fraud_spec.feature_plan()
    store = MemoryFeatureStore(plan)
    snaps: list[FeatureSnapshot] = []
    reqs = requests(fraud_spec, 3000, **config)
    for i in range(0, len(reqs), 250):
        snaps += store.update_and_read(reqs[i : i + 250])
    expected = brute_force_features(events, fraud_spec.features, "card_id", "ts")
    assert max(s.aggregates[0][0] for s in snaps) > 5  # the test exercises real windows
    for snap in snaps:
        assert_features_match(plan.values(snap.aggregates), expected[snap.event_id])


def test_a_replayed_batch_changes_nothing(fraud_spec: PipelineSpec) -> None:
    store = MemoryFeatureStore(fraud_spec.feature_plan())
    reqs = requests(fraud_spec, 500, cards=10)
    first = store.update_and_read(reqs)
    tiles = {k: {b: list(v) for b, v in t.items()} for k, t in store.tiles.items()}
    again = store.update_and_read(reqs)
    assert all(s.replayed for s in again)
    assert [s.aggregates for s in again] == [s.aggregates for s in first]
    assert store.tiles == tiles


def never(token: str) -> bool:
    return False


def tokens(ids: list[str], run: str) -> list[str]:
    return [f"{run}:{i}" for i in ids]


def test_each_snapshot_is_claimed_once(fraud_spec: PipelineSpec) -> None:
    store = MemoryFeatureStore(fraud_spec.feature_plan())
    reqs = requests(fraud_spec, 3)
    store.update_and_read(reqs[:2])
    ids = [r.event_id for r in reqs]
    first = store.claim_snapshots(ids, tokens(ids, "run1"), never)
    assert isinstance(first[0], FeatureSnapshot) and first[0].inputs == {
        "amount": reqs[0].numbers["amount"]
    }
    assert first[2] is Claim.MISSING
    assert store.claim_snapshots(ids[:2], tokens(ids[:2], "run1"), never) == [
        Claim.DUPLICATE,
        Claim.DUPLICATE,
    ]
    # a mark whose learning was lost (the learner crashed before its snapshot) is taken over
    lost = store.claim_snapshots(ids[:2], tokens(ids[:2], "run2"), lambda t: t == f"run1:{ids[0]}")
    assert isinstance(lost[0], FeatureSnapshot) and lost[1] is Claim.DUPLICATE
    assert store.claim_snapshots(ids[:1], ["run3"], lambda t: t.startswith("run1")) == [
        Claim.DUPLICATE
    ]
