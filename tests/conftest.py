"""Shared fixtures: the fraud spec, settings, and server log tails on failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from riverflow.settings import DEFAULT_SPEC, Settings
from riverflow.spec import PipelineSpec, load_spec, parse_spec

# Logs registered here are printed under a failing test's report.
LOGS: list[Path] = []


@pytest.fixture(scope="session")
def fraud_spec() -> PipelineSpec:
    return load_spec(DEFAULT_SPEC)


@pytest.fixture(scope="session")
def unmonitored_spec(fraud_spec: PipelineSpec) -> PipelineSpec:
    """The fraud spec with every monitor policy off: the pointer only follows the learner."""
    return without_policies(fraud_spec)


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
        from riverflow.stack import tail

        for log in LOGS:
            text = tail(log, 60)
            if text:
                report.sections.append((f"tail of {log}", text))
