"""What an operator's signals do to a running stage."""

from __future__ import annotations

import time

from riverflow.spec import PipelineSpec
from riverflow.streams.kafka_io import ensure_topics
from riverflow.tools.stack import Endpoints
from tests.integration.conftest import StageFactory


def test_sigusr1_writes_every_threads_stack_to_the_log_and_the_stage_goes_on(
    stack: Endpoints, spec: PipelineSpec, start_stage: StageFactory
) -> None:
    ensure_topics(stack.kafka_bootstrap, spec.topics.all(), partitions=1)
    scorer = start_stage("scorer", partitions=1)
    deadline = time.monotonic() + 60
    while True:  # its metrics server answers once the stage is up
        try:
            status, _ = scorer.get("/healthz")
            break
        except OSError:
            assert scorer.proc.poll() is None, "the scorer exited"
            assert time.monotonic() < deadline, "the scorer's metrics server never answered"
            time.sleep(0.2)
    # the metrics server answers while the stage may still be starting (freezing its
    # startup heap, joining the group): its loop shows in a dump soon after
    while True:
        dump = scorer.stacks()
        assert "Thread 0x" in dump and "most recent call first" in dump, dump
        if "confluent_host.py" in dump:  # the host's loop, where it waits for events
            break
        assert scorer.proc.poll() is None, "SIGUSR1 stopped the stage"
        assert time.monotonic() < deadline, f"the host's loop never showed:\n{dump}"
    time.sleep(0.5)
    assert scorer.proc.poll() is None, "SIGUSR1 stopped the stage"
    assert scorer.get("/healthz")[0] == status
