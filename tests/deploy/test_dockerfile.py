"""The Dockerfile builds the image the deployment files run (there is no Docker engine
here: the file is read, as docker-compose.yml is in test_compose.py)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from riverflow.kafka_runtime import METRICS_PORTS
from riverflow.monitors.exporter import StageMetrics, serve
from riverflow.tools.stack import free_port
from tests.conftest import REPO_ROOT


@dataclass
class Stage:
    """One build stage: ``FROM base AS name`` and its instructions, in order."""

    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    @property
    def user(self) -> str:
        """The user the image runs as (the last USER; root without one)."""
        return (self.args("USER") or ["root"])[-1].split(":")[0]

    def uid(self, user: str) -> int:
        """The fixed uid ``useradd --uid N user`` gives ``user``."""
        for run in self.args("RUN"):
            for command in run.split("&&"):
                words = shlex.split(command)
                if words[:1] == ["useradd"] and words[-1] == user:
                    return int(words[words.index("--uid") + 1])
        raise AssertionError(f"no `useradd --uid N {user}` in stage {self.name}")

    def owner_of(self, path: PurePosixPath | Path) -> str | None:
        """Who a ``chown`` in this stage gives ``path`` to."""
        for run in self.args("RUN"):
            for command in run.split("&&"):
                words = shlex.split(command)
                if words[:1] == ["chown"] and str(path) in words[2:]:
                    return words[1].split(":")[0]
        return None


@dataclass
class Dockerfile:
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        [found] = [s for s in self.stages if s.name == name]
        return found


def dockerfile(path: Path = REPO_ROOT / "Dockerfile") -> Dockerfile:
    """The stages of a Dockerfile: comments dropped, continued lines joined."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    stages: list[Stage] = []
    for text in logical:
        keyword, _, arg = text.partition(" ")
        keyword, arg = keyword.upper(), " ".join(arg.split())
        if keyword == "FROM":
            words = arg.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(words[0], name))
        else:
            stages[-1].instructions.append((keyword, arg))
    return Dockerfile(stages)


def test_a_build_stage_makes_the_wheel_and_the_runtime_installs_only_it() -> None:
    image = dockerfile()
    assert len(image.stages) >= 2, "multi-stage: build, then runtime"
    [build] = [s for s in image.stages[:-1] if any(re.search(r"pip wheel|-m build", r)
                                                   for r in s.args("RUN"))]  # fmt: skip
    runtime = image.final
    copied = [c for c in runtime.args("COPY") if c.startswith(f"--from={build.name} ")]
    assert copied, "the runtime takes the wheel from the build stage"
    assert not [c for c in runtime.args("COPY") if not c.startswith("--from=")], (
        "the runtime stage copies nothing from the checkout: it installs the wheel only"
    )
    installs = [r for r in runtime.args("RUN") if "pip install" in r]
    assert installs and all(".whl" in r for r in installs)
    assert not any(re.search(r"(^|\s)(-e|--editable)\s", r) for r in installs)
    assert runtime.base == build.base  # the wheel's Python is the one that runs it


def test_the_image_runs_riverflow_as_a_named_non_root_user() -> None:
    image = dockerfile().final
    assert image.user not in ("root", "0") and not image.user.isdigit()
    assert image.uid(image.user) >= 1000
    [entrypoint] = image.args("ENTRYPOINT")
    assert json.loads(entrypoint) == ["riverflow"]
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "riverflow" in scripts  # the console script the wheel installs
    # the learner's index (RIVERFLOW_SCORED_DIR) sits on a volume mounted there
    assert image.owner_of(PurePosixPath("/var/lib/riverflow")) == image.user


def healthcheck_command() -> str:
    [check] = dockerfile().final.args("HEALTHCHECK")
    assert " CMD " in f" {check}", check
    return check.split(" CMD ", 1)[1] if not check.startswith("CMD ") else check[4:]


def test_the_healthcheck_asks_the_stages_healthz() -> None:
    command = healthcheck_command()
    metrics = StageMetrics("learner")
    port = free_port()
    server = serve(metrics, port)
    try:
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # our python
        env = {**os.environ, "RIVERFLOW_METRICS_PORT": str(port), "PATH": path}
        healthy = subprocess.run(["sh", "-c", command], env=env, capture_output=True)
        assert healthy.returncode == 0, healthy.stderr
        metrics.set_degraded("Redis: connection refused")  # /healthz answers 503
        degraded = subprocess.run(["sh", "-c", command], env=env, capture_output=True)
        assert degraded.returncode != 0
    finally:
        server.shutdown()
        server.server_close()
    nobody = subprocess.run(["sh", "-c", command], env=env, capture_output=True)
    assert nobody.returncode != 0  # nothing listening: unhealthy
    # with the variable unset it asks the scorer's port
    assert f"'{METRICS_PORTS['scorer']}'" in command and "RIVERFLOW_METRICS_PORT" in command
