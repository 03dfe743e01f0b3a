"""Ranking requests (``events.slate``): one ranked prediction per request, features
per (user, item) pair that count a request once in each entity, hostile requests
refused naming the candidate, and the shown items indexed for the label join."""

from __future__ import annotations

import base64
import json
import math
import random
from typing import Any

import orjson
import pytest
import yaml

from riverflow.assembly import build_scorer, memory_backends
from riverflow.features.scored import ScoredEvent, defaulted_ids, scored_records
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, SpecError, load_spec, parse_spec
from riverflow.stages.scorer import Scorer
from riverflow.streams.contracts import Message, Output, Prediction, pair_id
from riverflow.tools.recsys import RecsysConfig, RecsysWorld
from tests.helpers import slate_recount


@pytest.fixture(scope="module")
def spec() -> PipelineSpec:
    return load_spec("examples/recsys.yaml")


def scorer_of(spec: PipelineSpec) -> Scorer:
    store, registry = memory_backends(spec, Settings())
    return build_scorer(spec, Settings(), store, registry)


def requests(n: int, seed: int = 3) -> tuple[RecsysWorld, list[dict[str, Any]]]:
    world = RecsysWorld(RecsysConfig(seed=seed, users=30, items=120, slate=20, mean_gap_s=40))
    return world, [world.event(r) for r in world.requests(n)]


def messages(events: list[dict[str, Any]]) -> list[Message]:
    return [Message("recsys.events", 0, i, b"", orjson.dumps(e)) for i, e in enumerate(events)]


def predictions(out: list[Output]) -> list[dict[str, Any]]:
    return [orjson.loads(o.value) for o in out if o.topic.endswith(".predictions")]


def test_each_request_gets_one_prediction_with_its_candidates_ranked(spec: PipelineSpec) -> None:
    _, events = requests(60)
    scorer = scorer_of(spec)
    out = predictions(scorer.process(messages(events[:25])) + scorer.process(messages(events[25:])))
    assert [p["event_id"] for p in out] == [e["request_id"] for e in events]
    for p, e in zip(out, events, strict=True):
        slate = p["slate"]
        assert sorted(c["item"] for c in slate) == sorted(i["item_id"] for i in e["items"])
        assert [c["position"] for c in slate] == list(range(len(slate)))
        scores = [c["score"] for c in slate]
        assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
        assert p["shown"] == 5 and [c["shown"] for c in slate] == [i < 5 for i in range(20)]
        assert p["model"] == "recsys-fm" and p["probability"] is None
        by_id = {i["item_id"]: i for i in e["items"]}
        for c in slate:  # the item's own inputs, as the request carried them
            assert c["inputs"] == {
                k: by_id[c["item"]][k] for k in ("item_id", "category", "quality")
            }
        assert p["inputs"] == {k: e[k] for k in ("user_id", "device", "page")}
        # label-free drift watches one number per prediction: the top item's score
        assert Prediction.decode(orjson.dumps(p)).score == slate[0]["score"]


def test_a_pair_sees_what_a_recount_of_the_requests_touching_its_entities_gives(
    spec: PipelineSpec,
) -> None:
    """A request counts once in each entity it touches: the user once, each item
    once, a (user, category) once however many of its candidates share the category."""
    _, events = requests(150)
    out = predictions(scorer_of(spec).process(messages(events)))
    served = {pair_id(p["event_id"], c["item"]): c["features"] for p in out for c in p["slate"]}
    assert len(served) == 150 * 20
    sourced = {f.name for f in spec.events_features}
    assert {k: {n: v[n] for n in sourced} for k, v in served.items()} == slate_recount(spec, events)
    # and the label-fed ones, with no label learned: no click yet, no click in the week
    # (a recency of 0)
    labelled = {f.name: 0.0 for f in spec.label_features}
    assert all({n: v[n] for n in labelled} == labelled for v in served.values())
    # the counts do count: a user's requests, and an item over many requests
    assert max(v["user_requests_1h"] for v in served.values()) > 1
    assert max(v["item_candidacy_24h"] for v in served.values()) > 5
    assert max(v["user_category_candidates_24h"] for v in served.values()) > 1


def test_session_windows_count_a_request_once_per_session_of_each_entity(
    spec: PipelineSpec,
) -> None:
    """Session windows on a slate pipeline: per user, per item and per (user,
    category), a request counts once in the session of each entity it touches, as a
    recount of the requests in order (some out of order) gives."""
    data = spec.model_dump(mode="json", exclude_none=True)
    data["features"] += [
        {"name": "user_session_requests", "agg": "count",
         "window": {"session": "5m", "grace": "1m"}},
        {"name": "item_session_quality", "agg": "mean", "field": "quality",
         "window": {"session": "10m"}, "entity": "item_id"},
        {"name": "user_category_session_s", "agg": "duration", "window": {"session": "5m"},
         "entity": ["user_id", "category"]},
    ]  # fmt: skip
    sessions = parse_spec(data)
    _, events = requests(300)
    random.Random(1).shuffle(events[100:140])  # late and early ones
    scorer = scorer_of(sessions)
    out = predictions(
        scorer.process(messages(events[:150])) + scorer.process(messages(events[150:]))
    )
    served = {pair_id(p["event_id"], c["item"]): c["features"] for p in out for c in p["slate"]}
    recount = slate_recount(sessions, events)
    assert len(recount) == 300 * 20
    for pid, want in recount.items():  # (a mean adds up in another order: to the rounding)
        got = {n: served[pid][n] for n in want}
        assert all(math.isclose(got[n], x, rel_tol=1e-12) for n, x in want.items()), (got, want)
    # the sessions do hold more than one request
    assert max(v["user_session_requests"] for v in served.values()) > 1
    assert max(v["user_category_session_s"] for v in served.values()) > 0


def test_a_replayed_request_gets_the_ranking_it_was_served(spec: PipelineSpec) -> None:
    _, events = requests(30)
    scorer = scorer_of(spec)
    first = predictions(scorer.process(messages(events)))
    again = predictions(scorer.process(messages(events[10:20])))
    for p, q in zip(first[10:20], again, strict=True):
        assert q["replayed"] and not p["replayed"]
        assert q["slate"] == p["slate"]


def test_a_request_replayed_with_its_candidates_in_another_order_gets_its_ranking(
    spec: PipelineSpec,
) -> None:
    _, events = requests(3)
    scorer = scorer_of(spec)
    first = predictions(scorer.process(messages(events)))[1]
    reordered = dict(events[1], items=events[1]["items"][::-1])
    [again] = predictions(scorer.process(messages([reordered])))
    assert again["replayed"]

    def served(p: dict[str, Any]) -> dict[str, Any]:
        return {c["item"]: (c["score"], c["features"]) for c in p["slate"]}

    assert served(again) == served(first)
    assert [c["score"] for c in again["slate"]] == [c["score"] for c in first["slate"]]


def test_a_request_id_ranked_before_with_other_candidates_is_refused_naming_it(
    spec: PipelineSpec,
) -> None:
    """A second request under an id already ranked is not a replay of it: its pairs
    would point at the first one's. It goes to the dead letters; the batch goes on."""
    _, events = requests(6)
    scorer = scorer_of(spec)
    scorer.process(messages(events[:3]))
    reused = dict(events[4], request_id=events[2]["request_id"])
    out = scorer.process(messages([events[3], reused, events[5]]))
    [letter] = [orjson.loads(o.value) for o in out if o.topic.endswith(".dlq")]
    assert letter["error_kind"] == "wrong_value"
    assert f"request id {events[2]['request_id']!r} was ranked before" in letter["error"]
    assert orjson.loads(base64.b64decode(letter["payload_b64"])) == reused
    ranked = [p["event_id"] for p in predictions(out)]
    assert ranked == [events[3]["request_id"], events[5]["request_id"]]
    assert scorer.counters.dead_letters == 1


HOSTILE_VALUES: list[Any] = [None, True, 0, -1, 1e308, "", "x" * 5000, [], {}, [1, 2],
                             {"a": 1}, 2**70, "\u0000", 1.5, "NaN"]  # fmt: skip


def hostile(event: dict[str, Any], rng: random.Random) -> bytes:
    """``event`` broken one way: a request's or a candidate's field given a hostile
    value or taken away, bytes flipped, the message cut short, a slate of an odd size,
    an absurd time, or the id of another request."""
    e = orjson.loads(orjson.dumps(event))
    items = e["items"]
    how = rng.randrange(8)
    target = rng.choice([e, rng.choice(items)])
    if how == 0:
        target[rng.choice(list(target))] = rng.choice(HOSTILE_VALUES)
    elif how == 1:
        del target[rng.choice(list(target))]
    elif how == 2:
        raw = bytearray(orjson.dumps(e))
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    elif how == 3:
        raw = orjson.dumps(e)
        return raw[: rng.randrange(len(raw))]
    elif how == 4:
        size = rng.choice([0, 1, 100, 101, 500])
        e["items"] = [{**items[n % len(items)], "item_id": f"x{n}"} for n in range(size)]
    elif how == 5:
        e["ts"] = rng.choice([0, -1, 1e12, 1e18, float(2**53)])
    elif how == 6:  # the id of a request ranked before
        e["request_id"] = f"r3-{rng.randrange(int(e['request_id'][3:]) or 1):08d}"
    else:
        return json.dumps(e).replace('"quality": ', '"quality": NaN, "q": ', 1).encode()
    return json.dumps(e).encode()


@pytest.mark.parametrize("seed", range(3))
def test_hostile_requests_never_stop_the_slate_scorer_nor_cost_a_valid_request(
    spec: PipelineSpec, seed: int
) -> None:
    """Batches of valid requests with hostile ones among them (each before the request
    it was made from): every valid request is ranked, every message is ranked or refused
    with a reason, and none raises."""
    rng = random.Random(seed)
    _, events = requests(400)
    scorer = scorer_of(spec)
    refused = 0
    for start in range(0, len(events), 20):
        batch = []
        for event in events[start : start + 20]:
            if rng.random() < 0.5:
                batch.append(hostile(event, rng))
            batch.append(orjson.dumps(event))
        msgs = [Message("recsys.events", 0, i, b"", raw) for i, raw in enumerate(batch)]
        out = scorer.process(msgs)
        letters = [orjson.loads(o.value) for o in out if o.topic.endswith(".dlq")]
        assert all(d["error"] and d["error_kind"] != "internal_error" for d in letters)
        assert len(predictions(out)) + len(letters) == len(batch)
        ranked = {p["event_id"] for p in predictions(out)}
        assert {e["request_id"] for e in events[start : start + 20]} <= ranked
        refused += len(letters)
    assert refused > 100  # the hostile ones were refused, not all let through


def tampered(event: dict[str, Any], how: str) -> Any:
    e = orjson.loads(orjson.dumps(event))
    items = e["items"]
    if how == "duplicate":
        items.append(dict(items[3]))
    elif how == "missing":
        del items[2]["category"]
    elif how == "wrong_type":
        items[4]["quality"] = "high"
    elif how == "nan":
        return orjson.dumps(e).replace(b'"quality":' + orjson.dumps(items[1]["quality"]),
                                       b'"quality":NaN', 1)  # fmt: skip
    elif how == "too_many":
        e["items"] = [{**items[0], "item_id": f"x{n}"} for n in range(101)]
    elif how == "empty":
        e["items"] = []
    elif how == "not_a_list":
        e["items"] = {"item_id": "i1"}
    elif how == "absent":
        del e["items"]
    elif how == "not_an_object":
        items[0] = "i00001"
    return orjson.dumps(e)


@pytest.mark.parametrize(
    ("how", "named"),
    [
        ("duplicate", "items[20].item_id"),
        ("missing", "items[2].category"),
        ("wrong_type", "items[4].quality"),
        ("nan", "items[1].quality"),
        ("too_many", "101 candidates"),
        ("empty", "0 candidates"),
        ("not_a_list", "expected a list of candidates"),
        ("absent", "items: the request has no candidates"),
        ("not_an_object", "items[0]"),
    ],
)
def test_a_tampered_request_goes_to_the_dead_letters_naming_its_candidate(
    spec: PipelineSpec, how: str, named: str
) -> None:
    _, events = requests(3)
    bad = tampered(events[1], how)
    scorer = scorer_of(spec)
    hostile = Message("recsys.events", 0, 9, b"", bad)
    out = scorer.process([*messages(events[:1]), hostile, *messages(events[2:])])
    dead = [orjson.loads(o.value) for o in out if o.topic.endswith(".dlq")]
    assert len(dead) == 1 and named in dead[0]["error"], dead
    kept = predictions(out)
    assert [p["event_id"] for p in kept] == [events[0]["request_id"], events[2]["request_id"]]


def test_the_shown_items_are_indexed_for_the_label_join(spec: PipelineSpec) -> None:
    world, events = requests(20)
    out = scorer_of(spec).process(messages(events))
    records, bad = scored_records(
        [Message("recsys.predictions", 0, i, b"", o.value) for i, o in enumerate(out)]
    )
    assert bad == 0 and len(records) == 20 * 5  # shown only: the user saw nothing else
    p = predictions(out)[7]
    for c in p["slate"][:5]:
        pid = pair_id(p["event_id"], c["item"])
        scored = ScoredEvent.unpack(pid, records[pid])
        assert scored.inputs == {**p["inputs"], **c["inputs"]}
        assert scored.features == c["features"]
        assert scored.served.probability == c["score"] and scored.served.model == p["model"]
        assert scored.slot == {"request": p["event_id"], "position": c["position"], "shown": 5,
                               "propensity": 1.0}  # fmt: skip
    assert pair_id(p["event_id"], p["slate"][5]["item"]) not in records
    # the world's clicks on it are label messages the join reads
    clicks = world.click_labels(p, random.Random(4))
    for click in clicks:
        assert pair_id(click["request_id"], click["item_id"]) in records


def broken(spec: PipelineSpec, change: Any) -> str:
    data = spec.model_dump(mode="json", exclude_none=True)
    change(data)
    with pytest.raises(SpecError) as err:
        parse_spec(yaml.safe_load(yaml.safe_dump(data)))
    return str(err.value)


def test_a_broken_slate_spec_is_refused_naming_the_field(spec: PipelineSpec) -> None:
    def drop_item(d: dict[str, Any]) -> None:
        del d["label"]["item"]

    assert "label.item: a slate's label names its item" in broken(spec, drop_item)

    def clash(d: dict[str, Any]) -> None:
        d["events"]["slate"]["fields"]["device"] = "str"

    assert "slate.fields.device: also a request field" in broken(spec, clash)

    def no_id(d: dict[str, Any]) -> None:
        d["events"]["slate"]["item_id"] = "sku"

    assert "item_id: 'sku' is not one of the slate's fields" in broken(spec, no_id)

    def unknown_input(d: dict[str, Any]) -> None:
        d["models"]["candidates"][1]["crosses"] = [["user_id", "colour"]]

    assert "crosses.0: 'colour' is not selected" in broken(spec, unknown_input)

    def fraud_with_item(d: dict[str, Any]) -> None:
        del d["events"]["slate"]

    assert "label.item: only a slate pipeline" in broken(spec, fraud_with_item)


def test_exploration_serves_some_requests_in_a_random_order_and_logs_propensities(
    spec: PipelineSpec,
) -> None:
    slate = spec.events.slate
    assert slate is not None
    exploring = spec.model_copy(
        update={"events": spec.events.model_copy(
            update={"slate": slate.model_copy(update={"epsilon": 0.3})})}
    )  # fmt: skip
    _, events = requests(400)
    scorer = scorer_of(exploring)
    out = predictions(scorer.process(messages(events)))
    n = 20
    explored = 0
    for p in out:
        scores = [c["score"] for c in p["slate"]]
        by_score = sorted(scores, reverse=True)
        if scores != by_score:
            explored += 1
        for c in p["slate"]:  # the chance of its position under the policy
            greedy = c["score"] == by_score[c["position"]]
            assert c["propensity"] == pytest.approx(0.7 * greedy + 0.3 / n)
    # 400 requests at 0.3 (a shuffle is in score order with chance 1/20!): 120 +- 3 sd
    assert 90 <= explored <= 150, explored
    again = predictions(scorer.process(messages(events[:50])))
    assert [q["slate"] for q in again] == [p["slate"] for p in out[:50]]  # replays: same order


def exploring_spec(spec: PipelineSpec, epsilon: float) -> PipelineSpec:
    slate = spec.events.slate
    assert slate is not None
    return spec.model_copy(
        update={"events": spec.events.model_copy(
            update={"slate": slate.model_copy(update={"epsilon": epsilon})})}
    )  # fmt: skip


def test_the_timeouts_default_exactly_the_pairs_the_join_indexes(spec: PipelineSpec) -> None:
    """Whatever the slate (served in a random order, fewer candidates than are shown,
    a replay), the shown items a timeout labels negative are the pairs the learner
    holds records for, served order and positions included."""
    _, events = requests(120)
    for e in events[::4]:  # fewer candidates than the 5 shown
        e["items"] = e["items"][: 1 + len(e["request_id"]) % 4]
    scorer = scorer_of(exploring_spec(spec, 0.5))
    out = predictions(scorer.process(messages(events)))
    out += predictions(scorer.process(messages(events[30:60])))  # replays
    explored = short = replayed = 0
    for p in out:
        raw = orjson.dumps(p)
        records, bad = scored_records([Message("recsys.predictions", 0, 0, b"", raw)])
        ids = defaulted_ids(orjson.loads(raw))
        assert bad == 0 and ids == list(records)
        served = p["slate"][: min(5, len(p["slate"]))]
        assert ids == [pair_id(p["event_id"], c["item"]) for c in served]
        assert [ScoredEvent.unpack(i, records[i]).slot["position"] for i in ids] == list(
            range(len(ids))
        )
        scores = [c["score"] for c in p["slate"]]
        explored += scores != sorted(scores, reverse=True)
        short += len(p["slate"]) < 5
        replayed += p["replayed"]
    assert explored > 10 and short == 30 + 7 and replayed == 30  # 7 short ones replayed


@pytest.mark.parametrize(
    "forge",
    [
        lambda p: p["slate"][6].update(shown=True),  # a flag the count disagrees with
        lambda p: p["slate"][1].update(shown=False),
        lambda p: p.update(shown=7),
        lambda p: p["slate"][2].update(position=0),
        lambda p: p["slate"][3].update(item=p["slate"][0]["item"]),  # an item shown twice
        lambda p: p["slate"].__setitem__(4, "i00004"),
    ],
)
def test_a_forged_slate_shows_nothing_to_the_join_and_the_timeouts_alike(
    spec: PipelineSpec, forge: Any
) -> None:
    _, events = requests(1)
    p = predictions(scorer_of(spec).process(messages(events)))[0]
    forge(p)
    records, bad = scored_records([Message("recsys.predictions", 0, 0, b"", orjson.dumps(p))])
    assert (records, bad) == ({}, 1)
    assert defaulted_ids(p) == []
