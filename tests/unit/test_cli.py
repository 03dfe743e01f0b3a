"""The CLI as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def riverflow(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "riverflow.cli", *args],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip


def test_demo_prints_the_summary() -> None:
    done = riverflow("demo", "--events", "4000")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for row in ("events", "predictions", "dead letters (DLQ)", "labels learned",
                "prequential roc_auc"):  # fmt: skip
        assert row in out
    # 4000 events, one in 500 corrupted: 8 in the DLQ, the rest predicted
    assert "3,992" in out and " 8 " in out


def test_a_broken_spec_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nevents: {}\n")
    done = riverflow("demo", "--spec", str(spec))
    assert done.returncode == 2
    assert "events.fields: Field required" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_without_servers_says_how_to_get_them(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "RIVERFLOW_CACHE_DIR": str(tmp_path)}
    env.pop("RIVERFLOW_KAFKA_BOOTSTRAP", None)
    env.pop("RIVERFLOW_REDIS_URL", None)
    for command in (("run", "scorer"), ("models", "list")):
        done = riverflow(*command, env=env)
        assert done.returncode == 2
        assert "riverflow stack up" in done.stderr
