"""Label-fed features through the pipeline (``source: labels``, examples/recsys.yaml):
the learner writes every label it learns, the scorer serves the windows as they
stand when it scores, and the prediction carries what was served."""

from __future__ import annotations

import math
import random
from typing import Any

import orjson
import pytest

from riverflow.embedded import EmbeddedRuntime
from riverflow.features.labelled import LearnedLabel
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, SpecError, load_spec, parse_spec
from riverflow.streams.contracts import Evaluation, Output
from riverflow.streams.schema import LabelLearning
from riverflow.tools.generator import FraudStreamConfig, with_labels
from riverflow.tools.recsys import RecsysConfig, RecsysWorld
from tests.label_streams import brute_force, matching_prefix

T0 = 1_767_225_600.0


@pytest.fixture(scope="module")
def spec() -> PipelineSpec:
    return load_spec("examples/recsys.yaml")


def request(rid: str, user: str, ts: float, categories: str = "abcdefg") -> dict[str, Any]:
    items = [{"item_id": f"i{n}", "category": c, "quality": 0.5}
             for n, c in enumerate(categories)]  # fmt: skip
    return {"request_id": rid, "user_id": user, "device": "mobile", "page": "home", "ts": ts,
            "items": items}  # fmt: skip


def served(rt: EmbeddedRuntime, rid: str) -> dict[str, Any]:
    for _, value in rt.messages(rt.topics.predictions):
        p = orjson.loads(value)
        if p["event_id"] == rid:
            return p
    raise AssertionError(f"no prediction for {rid}")


def test_a_click_changes_the_next_requests_user_ctr(spec: PipelineSpec) -> None:
    # clicks learned as they come (the example holds them to their timeout: then the
    # same holds once r1's timeout has passed)
    at_once = spec.label.model_copy(update={"learn": LabelLearning.AT_ONCE})
    spec = spec.model_copy(update={"label": at_once})
    now = [T0]
    rt = EmbeddedRuntime(spec, Settings(), clock=lambda: now[0])
    t = rt.topics
    for rid, user in (("r1", "alice"), ("r2", "bob")):
        rt.produce(t.events, user.encode(), orjson.dumps(request(rid, user, T0)))
    rt.drain()
    first = served(rt, "r1")["slate"]
    assert {c["features"]["user_ctr_24h"] for c in first} == {0.0}  # nothing learned yet
    top = first[0]["item"]
    rt.produce(t.labels, b"r1", orjson.dumps({"request_id": "r1", "item_id": top,
                                              "clicked": True}))  # fmt: skip
    now[0] = T0 + 30
    rt.drain()
    rt.produce(t.events, b"alice", orjson.dumps(request("r3", "alice", T0 + 60)))
    rt.drain()
    # one label learned, a click: the global rate is 1, alice's too
    assert {c["features"]["user_ctr_24h"] for c in served(rt, "r3")["slate"]} == {1.0}
    # past r1's and r2's timeout (not r3's, scored at T0 + 30): their unclicked items are
    # negatives, 1 click in 10 labels
    now[0] = T0 + 615
    rt.drain()
    for rid, user in (("r4", "alice"), ("r5", "bob"), ("r6", "carol")):
        rt.produce(t.events, user.encode(), orjson.dumps(request(rid, user, T0 + 12 * 60)))
    rt.drain()
    ctr = {
        rid: served(rt, rid)["slate"][0]["features"]["user_ctr_24h"] for rid in ("r4", "r5", "r6")
    }
    # (clicks + 20 x 0.1) / (shown + 20): alice clicked, bob did not, carol is new
    assert ctr["r4"] == pytest.approx(3 / 25) and ctr["r5"] == pytest.approx(2 / 25)
    assert ctr["r6"] == pytest.approx(0.1)
    # the clicked category: alice clicked it a minute before r3, 12 minutes before r4: a
    # recency of exp(-720 s / 2 h); none in the week for the other categories
    clicked = next(c for c in first if c["item"] == top)["inputs"]["category"]
    r4 = {c["inputs"]["category"]: c["features"] for c in served(rt, "r4")["slate"]}
    assert r4[clicked]["user_category_click_recency_7d"] == pytest.approx(math.exp(-0.1))
    assert all(f["user_category_click_recency_7d"] == 0.0 for cat, f in r4.items()
               if cat != clicked)  # fmt: skip
    status = rt.learner.status()
    assert status["label_features_written"] == 10 and status["label_features_late"] == 0


def test_every_pair_serves_a_recount_of_the_labels_learned_before_it_was_scored(
    spec: PipelineSpec,
) -> None:
    """The embedded runtime scores a batch, then learns a batch: the labels a request
    sees are exactly the evaluations written before its prediction. Every served
    label-fed value equals a recount of them (each at its request's time), and what
    the learner trains on is what was served."""
    world = RecsysWorld(RecsysConfig(seed=5, users=15, items=60, categories=4, slate=8,
                                     mean_gap_s=20.0, shift_at=()))  # fmt: skip
    now = [world.config.start_ts]
    learned: list[LearnedLabel] = []
    times: dict[str, float] = {}
    checked = [0]
    served_features: dict[str, dict[str, float]] = {}
    cache: dict[tuple[str, tuple[str, ...]], str] = {}
    labelled = spec.label_features
    fresh: list[dict[str, Any]] = []  # predictions the users have not seen yet

    def seen(outputs: list[Output]) -> None:
        for o in outputs:
            if o.topic.endswith(".predictions"):
                p = orjson.loads(o.value)
                fresh.append(p)
                times[p["event_id"]] = p["event_time"]
                pairs = [{**p["inputs"], **c["inputs"]} for c in p["slate"]]
                want = brute_force(learned, pairs, p["event_time"], labelled, "user_id", cache)
                for c, w in zip(p["slate"], want, strict=True):
                    for f in labelled:
                        value = c["features"][f.name]
                        assert math.isclose(value, w[f.name], rel_tol=1e-12, abs_tol=1e-12), (
                            p["event_id"], c["item"], f.name, value, w[f.name])  # fmt: skip
                    served_features[f"{p['event_id']}/{c['item']}"] = c["features"]
                    checked[0] += 1
                if len(times) % 10 == 0:  # the pipeline test's incremental recount agrees
                    values = [{f.name: c["features"][f.name] for f in labelled}
                              for c in p["slate"]]  # fmt: skip
                    n = len(learned)
                    at = p["event_time"]
                    assert matching_prefix(learned, pairs, at, values, labelled, "user_id",
                                           (n, n)) == n  # fmt: skip
            elif o.topic.endswith(".evaluations"):
                e = Evaluation.decode(o.value)
                assert e.inputs is not None and e.request is not None
                assert not isinstance(e.label, str)
                # the learner trains on what the scorer served
                features = served_features[e.event_id]
                assert {k: e.inputs[k] for k in features} == features
                learned.append(LearnedLabel(e.event_id, e.inputs, e.label, times[e.request]))

    rt = EmbeddedRuntime(spec, Settings(batch_size=20), retain=(), clock=lambda: now[0],
                         on_output=seen)  # fmt: skip
    rng = random.Random(6)
    stream = world.requests(400)
    for chunk in iter(lambda: [r for _, r in zip(range(20), stream, strict=False)], []):
        for r in chunk:
            rt.produce(rt.topics.events, r.user.encode(), orjson.dumps(world.event(r)))
        now[0] = chunk[-1].ts
        rt.step()
        for p in fresh:
            for click in world.click_labels(p, rng):
                rt.produce(rt.topics.labels, b"", orjson.dumps(click))
        fresh.clear()
    now[0] += (spec.label.after_s or 0.0) + 1.0
    rt.drain()
    assert checked[0] == 400 * 8
    clicks = sum(x.value for x in learned)
    assert len(learned) == 400 * 5 and clicks > 20
    assert rt.learner.status()["label_features_late"] == 0
    # the windows did fill: pairs were served rates of their own
    assert len({round(v["user_category_ctr_7d"], 9) for v in served_features.values()}) > 20


def broken(spec: PipelineSpec, change: Any) -> str:
    data = spec.model_dump(mode="json", exclude_none=True)
    change(data)
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    return str(err.value)


def test_a_label_fed_feature_is_refused_where_it_cannot_be_fed(spec: PipelineSpec) -> None:
    def category_label(d: dict[str, Any]) -> None:
        d.update(load_spec("examples/fraud.yaml").model_dump(mode="json", exclude_none=True))
        d["label"].update(type="category", classes=["fraud", "ok"])
        d["features"].append(
            {
                "name": "category_rate_1d",
                "agg": "rate",
                "field": "is_fraud",
                "window": "1d",
                "entity": "category",
                "source": "labels",
            }
        )

    n = len(load_spec("examples/fraud.yaml").features)
    assert f"features.{n}.source: a label-fed feature aggregates the label, a bool or a " \
        "number, and label.type is category" in broken(spec, category_label)  # fmt: skip

    def other_field(d: dict[str, Any]) -> None:
        d["features"][3]["field"] = "quality"

    assert "features.3.field: 'quality' is not the label field 'clicked'" in broken(
        spec, other_field
    )

    def not_stored(d: dict[str, Any]) -> None:
        d["models"]["inputs"].remove("page")
        for c in d["models"]["candidates"]:
            c["select"] = [n for n in c["select"] if n != "page"]
            c["crosses"] = [x for x in c.get("crosses", []) if "page" not in x]
        d["features"][4]["entity"] = "page"

    assert "features.4.entity: 'page' is not a model input" in broken(spec, not_stored)

    def clash(d: dict[str, Any]) -> None:
        d["features"][3]["name"] = "user_requests_1h"

    assert "features.3.name: duplicate feature 'user_requests_1h'" in broken(spec, clash)


def test_the_fraud_shape_serves_label_fed_features_and_a_replay_the_same(
    fraud_spec: PipelineSpec,
) -> None:
    """A fraud rate per category, fed by the labels learned: it moves as labels come,
    and a replayed event is served the values its first scoring read."""
    data = fraud_spec.model_dump(mode="json", exclude_none=True)
    data["features"].append({"name": "category_fraud_rate_1d", "agg": "rate",
                             "field": "is_fraud", "window": "1d", "entity": "category",
                             "source": "labels", "prior": 10})  # fmt: skip
    spec = parse_spec(data)
    rt = EmbeddedRuntime(spec, Settings(batch_size=50))
    t = rt.topics
    events = []
    stream = with_labels(600, FraudStreamConfig(seed=4, burst_rate=0.05, label_delay=20))
    for n, (kind, rec) in enumerate(stream):
        if kind == "event":
            events.append(rec)
            rt.produce(t.events, rec["card_id"].encode(), orjson.dumps(rec))
        else:
            rt.produce(t.labels, rec["event_id"].encode(), orjson.dumps(rec))
        if n % 10 == 0:
            rt.step()
    rt.drain()
    first = {p["event_id"]: p for p in map(orjson.loads, (v for _, v in
             rt.messages(t.predictions)))}  # fmt: skip
    rates = [p["features"]["category_fraud_rate_1d"] for p in first.values()]
    assert rates[0] == 0.0 and len(set(rates)) > 50  # it moves as labels are learned
    assert rt.learner.status()["label_features_written"] == 600
    for e in events[:100]:  # replays, after every label was learned
        rt.produce(t.events, e["card_id"].encode(), orjson.dumps(e))
    rt.drain()
    again = [orjson.loads(v) for _, v in rt.messages(t.predictions)][600:]
    assert len(again) == 100 and all(p["replayed"] for p in again)
    assert [p["features"] for p in again] == [first[p["event_id"]]["features"] for p in again]
    assert all("@labelled" not in p["inputs"] for p in again)
