"""Stages SIGKILLed under a paced stream, on the real broker and Redis.

The scorer is killed three times and the learner twice while events flow at 250/s
with their labels 400 events behind; each is restarted at once. Nothing may be
lost: every event gets a prediction (exactly one as a ``read_committed`` reader
sees it under ``exactly_once``; extras are consistent replays otherwise), every
label whose event was scored is in the final models exactly once, and the scorer
serves again within 10 s of its start-up (the new process's metrics server answering:
imports done, Kafka and Redis reached): it takes its partitions back at once (static
membership) rather than waiting out the killed member's session, set to 40 s here so
that a scorer that waited could not pass. How long the start-up itself takes
depends on how busy the machine is (1.4-3.0 s quiet, 4.2-6.7 s beside three CPU
burners) and is reported, not bounded.

Run with ``-s`` to see the figures per kill (they are in the failure message too).
"""

from __future__ import annotations

import time

import pytest

from riverflow.spec import PipelineSpec
from riverflow.streams.kafka_io import ensure_topics
from riverflow.tools.stack import Endpoints
from tests.integration.chaos import (
    Kill,
    PacedStream,
    PredictionAudit,
    by_event,
    dead,
    label_audit,
    learner_kill_report,
    resumed,
    scorer_kill_report,
    sigkill_and_restart,
    stop_cleanly,
    tails,
    wait_drained,
    where_lost,
)
from tests.integration.conftest import StageFactory, StageProcess

RATE = 250  # events/s
LABEL_DELAY = 400  # events between an event and its label
KILLS = ("scorer", "learner", "scorer", "learner", "scorer")
RECOVERY_S = 10.0  # the scorer serves again within this of its start-up being done
SESSION_S = 40.0  # the scorer's session: the killed member's partitions wait this long
WAIT_CAP_S = 30.0  # how long the test waits for a recovery before it kills again
GAP_S = 3.0  # steady stream between kills


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_sigkilled_scorer_and_learner_lose_nothing(
    stack: Endpoints, spec: PipelineSpec, start_stage: StageFactory, guarantee: str
) -> None:
    topics = spec.topics
    ensure_topics(stack.kafka_bootstrap, topics.all(), partitions=3)
    predictions, evaluations, letters = tails(stack.kafka_bootstrap, topics)
    settings: dict[str, object] = {"partitions": 3}
    if guarantee == "exactly_once":  # at least once is the default
        settings["processing_guarantee"] = guarantee

    def scorer() -> StageProcess:
        # a stable instance id: a restarted scorer takes its place in the group at once;
        # the long session makes one that did not (waiting out the killed member) plain
        return start_stage(
            "scorer", instance_id="scorer-1", session_timeout_s=SESSION_S, **settings
        )

    def learner() -> StageProcess:
        return start_stage("learner", **settings)

    stages = {"scorer": scorer(), "learner": learner()}
    stream = PacedStream(stack.kafka_bootstrap, topics, RATE, LABEL_DELAY).start()
    kills: list[Kill] = []
    try:
        assert predictions.first(lambda s: True, 60), f"never scored; {dead(stages)}"
        assert evaluations.first(lambda s: True, 60), f"never learned; {dead(stages)}"
        time.sleep(GAP_S)
        for stage in KILLS:
            tail, produced = (
                (predictions, stream.events) if stage == "scorer" else (evaluations, stream.labels)
            )
            since = len(tail.seen)
            stages[stage], kill = sigkill_and_restart(
                stage, stages[stage], scorer if stage == "scorer" else learner
            )
            kills.append(kill)
            resumed(tail, produced, kill.killed_at, WAIT_CAP_S, since, stages[stage])
            time.sleep(GAP_S)
    except BaseException:
        stream.abort()
        raise
    stream.finish()
    events, labels = stream.events, stream.labels

    # drain: every event predicted, every label evaluated or orphaned, then a clean stop
    wait_drained((predictions, evaluations, letters), stages, events, labels, (90, 75))
    failures = dead(stages)
    failures += stop_cleanly(stages["scorer"], stages["learner"])
    audit = PredictionAudit(events, by_event(predictions.close(2.0)))
    labelled = label_audit(
        stack.kafka_bootstrap, stack.redis_url, spec.name, labels, audit.predictions,
        evaluations.close(0.0), letters.close(0.0),
    )  # fmt: skip

    scorer_kills = [k for k in kills if k.stage == "scorer"]
    lines, rows = scorer_kill_report(audit, scorer_kills)
    lines += learner_kill_report(
        labels, labelled.evaluations, [k for k in kills if k.stage != "scorer"]
    )
    extras = audit.extras
    lines.append(
        f"{guarantee}: {len(events)} events at {RATE}/s, {len(audit.predictions)} predicted, "
        f"lost {len(audit.lost)}, {len({f.record.event_id for f, _ in extras})} event ids "
        f"with {len(extras)} extra predictions"
    )
    lines.append(labelled.summary())
    kinds = sorted({(s.record.stage, s.record.error_kind) for s in letters.seen})
    lines.append(f"DLQ: {len(letters.seen)} records {kinds}")
    report = "\n".join(lines)
    print(f"\n{report}")

    failures += [f"{k.stage} had exited before kill {i + 1}" for i, k in
                 enumerate(kills) if not k.was_alive]  # fmt: skip
    if audit.lost:
        failures.append(f"{len(audit.lost)} events never predicted, e.g. {audit.lost[:3]}")
        failures.append(where_lost(stack.kafka_bootstrap, spec.topics, audit.lost,
                                   stages["scorer"].log.parent))  # fmt: skip
    if guarantee == "exactly_once" and extras:
        failures.append(
            f"exactly_once: a read_committed reader sees {len(extras)} extra predictions "
            f"of {len({f.record.event_id for f, _ in extras})} event ids"
        )
    bad = audit.bad_replays
    if guarantee == "at_least_once" and bad:
        failures.append(f"{len(bad)} extra predictions are not consistent replays: {bad[:3]}")
    for i, row in enumerate(rows):
        took = row["after_up_s"]
        if took is None or took > RECOVERY_S:
            shown = "never" if took is None else f"{took:.1f} s"
            failures.append(
                f"scorer kill {i + 1}: predictions not resumed within {RECOVERY_S} s of the "
                f"restarted scorer's start-up ({shown})"
            )
    failures += labelled.failures()
    others = [s.record for s in letters.seen if s.record.error_kind != "orphan_label"]
    if others:
        failures.append(f"{len(others)} DLQ records of no bad input: {others[:2]}")
    failures += predictions.errors + evaluations.errors + letters.errors
    assert not failures, "\n".join(failures) + "\n\n" + report
