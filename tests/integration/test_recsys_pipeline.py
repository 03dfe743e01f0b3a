"""The recommendation example (``examples/recsys.yaml``) end to end on the real broker
and Redis: 5,000 ranking requests with slates of 20 through the scorer and the
learner as processes, the simulated users clicking what they were shown (in two
phases: ``riverflow produce --skip`` resumes the stream once the first's labels are in).

- exactly one ranked prediction per request;
- every shown item labelled exactly once: by its click, or by the timeout as a
  negative (``label.after``), never both;
- the features of a sample of pairs equal a recount of the requests before them,
  and the label-fed ones (click-through rates, recency) a recount of the labels the
  learner had learned when the request was scored;
- a tampered request goes to the DLQ naming its candidate, and costs nothing else;
- through SIGKILLs of the scorer and the learner, and a restart of Redis, every
  request is ranked and every shown item learned exactly once.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import yaml

from riverflow.assembly import label_feature_store
from riverflow.assembly import redis_client as connect
from riverflow.cli import main
from riverflow.features.labelled import LearnedLabel
from riverflow.settings import Settings
from riverflow.spec import PipelineSpec, shipped_example
from riverflow.streams.contracts import DeadLetter, Evaluation, pair_id
from riverflow.streams.kafka_io import ensure_topics, produce_all, producer, read_topic
from riverflow.tools.recsys import RecsysConfig, RecsysWorld, SimulatedUsers
from riverflow.tools.stack import Endpoints
from tests.helpers import slate_recount
from tests.integration.chaos import (
    PrivateStack,
    by_event,
    dead,
    final_models,
    sigkill_and_restart,
    stop_cleanly,
    tails,
)
from tests.integration.conftest import StageFactory, StageProcess, collect
from tests.label_streams import matching_prefix

N = 5_000
SHOWN = 5
RATE = 400  # requests/s
# the stream in two phases: the first FIRST requests, then (once the learner has learned
# and written every label of them) the rest, whose label-fed features are checked: each
# is produced after FIRST * SHOWN labels were learned, however slow the machine
FIRST = 2_000


# what a failure's report shows of a stage's metrics
WATCHED = ("riverflow_stage_status", "riverflow_consumer_lag", "riverflow_consumed_messages",
           "riverflow_produced_messages", "riverflow_stage_degraded")  # fmt: skip


def status(stage: StageProcess) -> str:
    """The stage's status gauges (labels waiting, held, learned...), or why not."""
    try:
        _, body = stage.get("/metrics")
    except OSError as exc:
        return f"(no metrics: {exc})"
    return "\n".join(line for line in body.splitlines() if line.startswith(WATCHED))


def answers(stage: StageProcess) -> bool:
    try:
        return stage.get("/healthz")[0] in (200, 503)
    except OSError:
        return False


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    """The recsys spec under a unique name, its negatives after 3 s."""
    example = shipped_example("recsys")
    assert example is not None
    data = yaml.safe_load(example.read_text())
    data["name"] = f"it-{uuid.uuid4().hex[:10]}"
    data["label"]["after"] = "3s"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_recsys_example_ranks_every_request_and_labels_every_shown_item_once(
    stack: Endpoints, spec: PipelineSpec, spec_file: Path, start_stage: StageFactory
) -> None:
    t = spec.topics
    # one partition: the scorer sees the requests in the order the recount does
    ensure_topics(stack.kafka_bootstrap, t.all(), partitions=1, replication=1)
    stages = [start_stage("scorer"), start_stage("learner", snapshot_every_labels=2_000,
                                                 label_wait_s=2)]  # fmt: skip
    deadline = time.monotonic() + 60
    while not all(answers(s) for s in stages):  # up (a loaded machine takes seconds)
        assert time.monotonic() < deadline, "the stages never answered /healthz"
        time.sleep(0.2)
    # the users' side as a user runs it: requests of the simulated world, and its
    # users clicking what the pipeline shows them
    env = {**os.environ, "RIVERFLOW_KAFKA_BOOTSTRAP": stack.kafka_bootstrap,
           "RIVERFLOW_REDIS_URL": stack.redis_url}  # fmt: skip
    world = RecsysWorld(RecsysConfig(seed=11, shown=SHOWN))
    events = [world.event(r) for r in world.requests(N)]
    tampered = dict(events[17], request_id="tampered")
    tampered["items"] = [*events[17]["items"], events[17]["items"][2]]  # an item twice
    produce_all(producer(stack.kafka_bootstrap), [(t.events, b"x", orjson.dumps(tampered))])

    def produce(events: int, skip: int) -> None:
        produced = subprocess.run(
            [sys.executable, "-m", "riverflow.cli", "produce", "--spec", str(spec_file),
             "--events", str(events), "--skip", str(skip), "--seed", "11",
             "--rate", str(RATE)],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert produced.returncode == 0, produced.stdout + produced.stderr
        assert f"produced {events - skip:,} requests" in produced.stdout
        assert f"saw {events - skip:,} rankings" in produced.stdout

    produce(FIRST, 0)
    # the first phase's labels learned (and written to the label-fed features, before
    # their evaluations), however long a loaded machine takes
    collect(stack.kafka_bootstrap, t.evaluations, FIRST * SHOWN, timeout_s=240, settle_s=0)
    produce(N, FIRST)

    found = collect(stack.kafka_bootstrap, t.predictions, N, timeout_s=60, settle_s=1.0)
    predictions = [orjson.loads(m.value()) for m in found]
    assert Counter(p["event_id"] for p in predictions) == {e["request_id"]: 1 for e in events}
    clicks = [orjson.loads(m.value()) for m in read_topic(stack.kafka_bootstrap, t.labels)]
    assert len(clicks) > 200  # users click: positives to learn from

    # every shown item, once: its click, or the timeout's negative
    evaluated = collect(stack.kafka_bootstrap, t.evaluations, N * SHOWN, timeout_s=240)
    evaluations = [Evaluation.decode(m.value()) for m in evaluated]
    shown = {pair_id(p["event_id"], c["item"]): (p, c) for p in predictions
             for c in p["slate"] if c["shown"]}  # fmt: skip
    assert len(shown) == N * SHOWN
    assert Counter(e.event_id for e in evaluations) == {pid: 1 for pid in shown}
    clicked = {pair_id(c["request_id"], c["item_id"]) for c in clicks}
    for e in evaluations:
        p, c = shown[e.event_id]
        assert e.label is (e.event_id in clicked)
        assert (e.request, e.position, e.shown) == (p["event_id"], c["position"], SHOWN)
        assert e.served is not None and e.served.probability == c["score"]
        assert set(e.predictions) == {"recsys-fm", "recsys-logreg"}

    letters = [DeadLetter.decode(m.value()) for m in collect(stack.kafka_bootstrap, t.dlq, 1)]
    assert [(d.stage, d.error_kind) for d in letters] == [("scorer", "wrong_value")]
    assert "items[20].item_id" in letters[0].error and "candidate twice" in letters[0].error

    # a sample of pairs' features against a recount of the requests before them
    served = {pair_id(p["event_id"], c["item"]): c["features"] for p in predictions
              for c in p["slate"]}  # fmt: skip
    sample = random.Random(2).sample(sorted(served), 400)
    recount = slate_recount(spec, events, set(sample))
    for pid in sample:
        assert {n: served[pid][n] for n in recount[pid]} == recount[pid], pid

    # label-fed: a sample of requests against the labels learned before each was scored.
    # The learner writes the labels of each call in one Lua call, in the order of its
    # evaluations (one partition), and produces those evaluations only after: a read saw
    # a prefix of them. Bounds that hold on any machine, with no margin of time:
    # - at least every label whose evaluation was stamped before the request was
    #   produced (it was in Redis before the scorer could read anything for it);
    # - none of a request scored no earlier than this one (learned after its prediction
    #   was out, which is after this request's read).
    # (The evaluations' stamps lag the writes by up to a learner call or two, seconds
    # on a loaded machine: no margin of time around ``scored_at`` bounds that.)
    at = {p["event_id"]: p["event_time"] for p in predictions}
    scored_at = {p["event_id"]: p["scored_at"] for p in predictions}
    labels = [LearnedLabel(e.event_id, e.inputs or {}, bool(e.label), at[e.request or ""])
              for e in evaluations]  # fmt: skip
    # stamped before t: the labels up to the first stamped at t or later (running max)
    stamped = list(itertools.accumulate((m.timestamp()[1] / 1000 for m in evaluated), max))
    learned_after = [scored_at[e.request or ""] for e in evaluations]
    produced_at = {orjson.loads(m.value())["request_id"]: m.timestamp()[1] / 1000
                   for m in read_topic(stack.kafka_bootstrap, t.events)}  # fmt: skip
    labelled = spec.label_features
    plan = spec.label_plan(2.0)  # the learner's label_wait_s
    assert plan is not None
    later = {e["request_id"] for e in events[FIRST:]}
    second = [p for p in predictions if p["event_id"] in later]
    for p in random.Random(3).sample(second, 40):
        pairs = [{**p["inputs"], **c["inputs"]} for c in p["slate"]]
        values = [{f.name: c["features"][f.name] for f in labelled} for c in p["slate"]]
        lo = bisect.bisect_left(stamped, produced_at[p["event_id"]])
        hi = next((i for i, s in enumerate(learned_after) if s >= p["scored_at"]), len(labels))
        assert lo >= FIRST * SHOWN  # the first phase's labels: the check is not vacuous
        k = matching_prefix(labels, pairs, p["event_time"], values, labelled, "user_id",
                            (lo, hi), plan.tiles.lateness_s)  # fmt: skip
        assert k is not None, (p["event_id"], lo, hi)


Stages = dict[str, StageProcess]


def test_sigkilled_slate_scorer_and_learner_label_every_shown_item_once(
    stack: Endpoints, spec: PipelineSpec, spec_file: Path, start_stage: StageFactory
) -> None:
    """Requests and their users' clicks flowing, the learner SIGKILLed twice and the
    scorer once, each restarted at once: see ``disrupted``."""

    def kill(stages: Stages, restart: dict[str, Callable[[], StageProcess]]) -> None:
        for stage in ("learner", "scorer", "learner"):
            stages[stage], killed = sigkill_and_restart(stage, stages[stage], restart[stage])
            assert killed.was_alive, f"{stage} had exited before it was killed"
            time.sleep(4)

    disrupted(stack, spec, spec_file, start_stage, kill)


def test_a_redis_and_a_broker_restart_under_slates_label_every_shown_item_once(
    private_stack: PrivateStack, spec: PipelineSpec, spec_file: Path,
    start_private_stage: StageFactory,
) -> None:  # fmt: skip
    """Requests and their users' clicks flowing, Redis restarted (its entities, the
    label-fed counts, the registry and the checkpoint on its disk), down 2 s, and then
    the broker, down 3 s: see ``disrupted``."""

    def restart(stages: Stages, _: dict[str, Callable[[], StageProcess]]) -> None:
        private_stack.restart_redis(down_s=2.0)
        time.sleep(2)
        private_stack.restart_kafka(down_s=3.0)
        time.sleep(4)

    disrupted(private_stack, spec, spec_file, start_private_stage, restart)


def disrupted(
    servers: Endpoints | PrivateStack,
    spec: PipelineSpec,
    spec_file: Path,
    start_stage: StageFactory,
    disrupt: Callable[[Stages, dict[str, Callable[[], StageProcess]]], None],
) -> None:
    """2,400 requests at 150/s, their simulated users clicking, ``disrupt`` called once
    the learner has learned (given the stages and how to start each again): every
    request ranked (a request ranked again is the same ranking), every shown item
    learned into the final models exactly once, as its click or as the timeout's
    negative, whichever the users gave, and nothing in the DLQ."""
    t = spec.topics
    n, rate = 2_400, 150  # requests, requests/s: a 16-second stream
    bootstrap, redis_url = servers.kafka_bootstrap, servers.redis_url
    ensure_topics(bootstrap, t.all(), partitions=3)
    predictions, evaluations, letters = tails(bootstrap, t)
    restart: dict[str, Callable[[], StageProcess]] = {
        # a stable instance id: a restarted scorer takes its place at once
        "scorer": lambda: start_stage("scorer", instance_id="slates-1"),
        "learner": lambda: start_stage("learner", snapshot_every_labels=1_000, label_wait_s=2),
    }
    stages = {name: start() for name, start in restart.items()}
    env = {**os.environ, "RIVERFLOW_KAFKA_BOOTSTRAP": bootstrap, "RIVERFLOW_REDIS_URL": redis_url}
    users = subprocess.Popen(
        [sys.executable, "-m", "riverflow.cli", "produce", "--spec", str(spec_file),
         "--events", str(n), "--seed", "11", "--rate", str(rate)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert evaluations.first(lambda s: True, 90), f"never learned; {dead(stages)}"
        disrupt(stages, restart)
        out, _ = users.communicate(timeout=240)
    finally:
        if users.poll() is None:
            users.kill()
    ranked = f"{len({s.record.event_id for s in predictions.seen}):,} requests ranked"
    assert users.returncode == 0, f"{out}\n{ranked}; {dead(stages)}"
    assert f"saw {n:,} rankings" in out, out

    # every request ranked; a request ranked again (the scorer's replay) ranked the same
    seen = by_event(predictions.close(0.0))
    assert len(seen) == n
    for request, ranked in seen.items():
        orders = {tuple((c["item"], c["score"]) for c in p.record.slate or []) for p in ranked}
        assert len(orders) == 1, (request, orders)
    shown = {pair_id(r, c["item"]) for r, ranked in seen.items()
             for c in ranked[0].record.slate or [] if c["shown"]}  # fmt: skip
    assert len(shown) == n * SHOWN

    # every shown item evaluated (at least once: a restarted learner learns again what
    # came after its last snapshot), with the users' label
    if not evaluations.wait(lambda s: shown <= {e.record.event_id for e in s}, 240):
        missing = len(shown - {e.record.event_id for e in evaluations.seen})
        # where each stage waits: a stage that stopped making progress says nothing else
        stacks = "\n".join(f"--- {name}:\n{status(stage)}\n{stage.stacks()}"
                           for name, stage in stages.items())  # fmt: skip
        raise AssertionError(f"{missing} shown items never evaluated; {dead(stages)}\n{stacks}")
    failures = dead(stages) + stop_cleanly(*stages.values())
    clicked = [orjson.loads(m.value()) for m in read_topic(bootstrap, t.labels)]
    clicks = {pair_id(c["request_id"], c["item_id"]) for c in clicked}
    assert clicks and clicks <= shown
    by_pair = by_event(evaluations.close(0.0))
    assert set(by_pair) == shown
    wrong = [p for p, es in by_pair.items() if {e.record.label for e in es} != {p in clicks}]
    assert not wrong, f"{len(wrong)} shown items learned with the wrong label: {wrong[:3]}"

    # ... and in the final models exactly once
    checkpoint, published = final_models(redis_url, spec.name)
    assert checkpoint is not None and not checkpoint.pending
    assert checkpoint.labels_seen == len(shown), (checkpoint.labels_seen, len(shown))
    assert set(published.values()) == {len(shown)}, published
    assert not letters.close(0.0)  # no click was an orphan, no request bad
    assert not failures, failures


def test_the_simulated_users_stop_when_closed_while_no_prediction_comes(
    stack: Endpoints, spec: PipelineSpec
) -> None:
    """``riverflow produce``'s users end when told, though they wait for a ranking that
    never comes (a scorer that is down), and their clicks so far are on the topic."""
    t = spec.topics
    ensure_topics(stack.kafka_bootstrap, [t.predictions, t.labels], partitions=1, replication=1)
    world = RecsysWorld(RecsysConfig(seed=3, shown=SHOWN))
    first, never = (world.event(r) for r in world.requests(2))
    users = SimulatedUsers(stack.kafka_bootstrap, spec, world, seed=3)
    users.expect(first["request_id"])
    ranked = {"event_id": first["request_id"], "entity": first["user_id"],
              "slate": [{"item": c["item_id"]} for c in first["items"]]}  # fmt: skip
    produce_all(producer(stack.kafka_bootstrap), [(t.predictions, b"u", orjson.dumps(ranked))])
    assert users.wait(30) and users.answered == 1  # it is following the topic
    users.expect(never["request_id"])  # ... now waiting for a prediction that never comes
    assert users.close(timeout_s=5)
    clicks = [orjson.loads(m.value()) for m in read_topic(stack.kafka_bootstrap, t.labels, 1.0)]
    assert len(clicks) == users.clicks
    assert all(c["request_id"] == first["request_id"] for c in clicks)


def test_features_get_shows_the_label_fed_features_of_the_entities_asked_about(
    stack: Endpoints,
    spec: PipelineSpec,
    spec_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``riverflow features get u1`` shows the user's click-through rate as the scorer
    reads it; a feature per (user, category) or per item only with that entity named
    (``--with``), never a new entity's prior in its place."""
    settings = Settings(redis_url=stack.redis_url)
    labels = label_feature_store(spec, settings, connect(settings, stack.redis_url))
    assert labels is not None
    t0 = 1_767_225_600.0
    rng = random.Random(5)
    learned = [
        LearnedLabel(f"r{n}/i{n % 7}",
                     {"user_id": f"u{n % 3}", "item_id": f"i{n % 7}", "category": f"c{n % 2}"},
                     rng.random() < (0.6 if n % 3 == 1 else 0.1), t0 + n)
        for n in range(300)
    ]  # fmt: skip
    labels.write(learned)
    at = t0 + 400
    monkeypatch.setenv("RIVERFLOW_REDIS_URL", stack.redis_url)

    def get(*args: str) -> dict[str, float]:
        asked = ["features", "get", "u1", "--at", str(at), "--spec", str(spec_file), *args]
        assert main(asked) == 0
        out, err = capsys.readouterr()
        shown: dict[str, float] = json.loads(out)
        # each left out names the --with it needs
        assert all(f"{n} (label-fed" in err for n in label_fed if n not in shown), err
        return shown

    pair = {"user_id": "u1", "item_id": "i3", "category": "c0"}
    truth = labels.read([pair], at)[0]
    new_user = labels.read([{**pair, "user_id": "u-new"}], at)[0]
    assert truth["user_ctr_24h"] > new_user["user_ctr_24h"]  # u1 clicks more than most
    label_fed = [f.name for f in spec.label_features]
    shown = get()
    assert {n: shown[n] for n in label_fed if n in shown} == {"user_ctr_24h": truth["user_ctr_24h"]}
    shown = get("--with", "category=c0")
    per_user_and_category = ("user_category_ctr_7d", "user_category_click_recency_7d")
    assert {n: shown[n] for n in label_fed if n in shown} == {
        n: truth[n] for n in ("user_ctr_24h", *per_user_and_category)
    }
    shown = get("--with", "category=c0", "--with", "item_id=i3")
    assert {n: shown[n] for n in label_fed} == {n: truth[n] for n in label_fed}
