"""Shared fixtures: the fraud spec, settings, and server log tails on failure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from riverflow.settings import DEFAULT_SPEC, Settings
from riverflow.spec import PipelineSpec, load_spec, parse_spec

# Logs registered here are printed under a failing test's report.
LOGS: list[Path] = []
# The checkout the tests run in (for files that are not package data: deploy/, compose).
REPO_ROOT = Path(__file__).resolve().parent.parent
INTEGRATION = REPO_ROOT / "tests" / "integration"
# The CLI's messages wrap at the terminal's width (80 columns without one): a message
# naming a long temporary path (an xdist worker's is one folder deeper) would be split
# across lines where a test looks for it. Stage and CLI processes inherit this.
os.environ.setdefault("COLUMNS", "200")
# The files whose tests assert a wall-clock bound (a recovery, a pause, a rollback within
# N s, a stream delivered across a server restart): with pytest-xdist (scripts/test) one
# worker runs them one after another, so no two of them share the cores at the same time.
WALL_CLOCK = frozenset(
    f"tests/integration/{name}.py"
    for name in (
        "test_chaos",
        "test_failover",
        "test_scaling",
        "test_soak",
        "test_monitor_stage",
        "test_server_restarts",
        "test_redis_restart",
    )
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration/ is marked ``integration``, so
    ``-m "not integration"`` runs the fast suite (a ``pytestmark`` in a conftest is
    ignored by pytest)."""
    for item in items:
        if INTEGRATION in item.path.parents:
            item.add_marker(pytest.mark.integration)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` with the ``WALL_CLOCK`` files as one unit: each worker has a
    Kafka broker and a redis-server of its own (the ``stack`` fixture), so a file's tests
    stay together (its module fixtures start once); units go out in the order collected."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class WallClockApart(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "wall-clock" if path in WALL_CLOCK else path

    return WallClockApart(config, log)


@pytest.fixture(scope="session")
def fraud_spec() -> PipelineSpec:
    return load_spec(DEFAULT_SPEC)


@pytest.fixture(scope="session")
def unmonitored_spec(fraud_spec: PipelineSpec) -> PipelineSpec:
    """The fraud spec with every monitor policy off: the pointer only follows the learner."""
    return without_policies(fraud_spec)


@pytest.fixture(scope="session")
def unmarked_spec(fraud_spec: PipelineSpec) -> PipelineSpec:
    """The fraud spec with no field marked personal: the dead letters keep the bytes."""
    data = fraud_spec.model_dump(mode="json", by_alias=True)
    return parse_spec({**data, "events": {**data["events"], "pii": {}}})


def without_policies(spec: PipelineSpec) -> PipelineSpec:
    off = {"promote": {"enabled": False}, "rollback": {"enabled": False},
           "challengers": {"on_drift": False}}  # fmt: skip
    return parse_spec({**spec.model_dump(mode="json", by_alias=True), "monitors": off})


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(label_wait_s=0.0, snapshot_every_labels=1000)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        from riverflow.tools.stack import tail

        for log in LOGS:
            text = tail(log, 60)
            if text:
                report.sections.append((f"tail of {log}", text))
