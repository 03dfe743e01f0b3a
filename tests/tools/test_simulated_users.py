"""``riverflow produce``'s simulated users, when they stop reading the predictions
before every request is answered: ``wait`` says so at once, and ``stopped`` says why
(the command prints it instead of asking whether the scorer is running). Once a CI
run saw the users answer 1,499 of 2,400 requests and then nothing, with no reason
on record. The predictions topic is a fake here: what is tested is the report."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from riverflow.spec import load_spec, shipped_example
from riverflow.tools import recsys
from riverflow.tools.recsys import RecsysConfig, RecsysWorld, SimulatedUsers

NOWHERE = "127.0.0.1:1"  # no broker: the users' click producer never connects


class Prediction:
    def __init__(self, value: bytes) -> None:
        self._value = value

    def value(self) -> bytes:
        return self._value


WORLD = RecsysWorld(RecsysConfig(users=5, items=30))
REQUESTS = [WORLD.event(r) for r in WORLD.requests(2)]


def ranked(request: dict[str, Any]) -> Prediction:
    """A prediction of ``request`` as the scorer writes it (what the users read of it)."""
    slate = [{"item": c["item_id"], "position": k} for k, c in enumerate(request["items"])]
    value = {"event_id": request["request_id"], "entity": request["user_id"], "slate": slate}
    return Prediction(orjson.dumps(value))


def users_reading(
    monkeypatch: pytest.MonkeyPatch, messages: list[Any], then: str
) -> SimulatedUsers:
    """Simulated users expecting the two requests, whose predictions reader gives
    ``messages`` (once both are expected, as predictions come after their requests),
    then ``then``: "ends" (the generator returns) or "raises"."""
    expected = threading.Event()

    def reader(*args: Any, **kwargs: Any) -> Iterator[Any]:
        expected.wait(10)
        yield from messages
        if then == "raises":
            raise RuntimeError("reading it.predictions: Broker: Unknown topic or partition")

    monkeypatch.setattr(recsys, "read_topic", reader)
    spec = load_spec(shipped_example("recsys"))
    users = SimulatedUsers(NOWHERE, spec, WORLD, seed=1)
    for request in REQUESTS:
        users.expect(request["request_id"])
    expected.set()
    return users


@pytest.mark.parametrize("then", ["ends", "raises"])
def test_users_that_stop_reading_say_why_and_stop_waiting(
    monkeypatch: pytest.MonkeyPatch, then: str
) -> None:
    users = users_reading(monkeypatch, [Prediction(b"not json"), ranked(REQUESTS[0])], then)
    started = time.monotonic()
    assert not users.wait(30)
    assert time.monotonic() - started < 10  # not the whole 30 s
    # the first answered, the message that is no prediction skipped
    assert users.answered == 1 and users.waiting == {REQUESTS[1]["request_id"]}
    if then == "raises":
        assert users.stopped == (
            "RuntimeError: reading it.predictions: Broker: Unknown topic or partition"
        )
    else:
        assert users.stopped == "the predictions topic's reader ended"
    assert users.close()
