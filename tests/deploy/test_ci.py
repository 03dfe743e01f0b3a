"""The CI workflow a fork runs is the project's own test command, set up as it expects."""

from __future__ import annotations

import re
import shlex
from typing import Any

import yaml

from tests.conftest import REPO_ROOT

WORKFLOW = REPO_ROOT / ".github" / "workflows" / "ci.yml"


def ci_command() -> list[str]:
    """What .ci/run runs: the command its ``exec`` line hands over to."""
    [line] = [ln for ln in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
              if ln.startswith("exec ")]  # fmt: skip
    return shlex.split(line)[1:]


def workflow() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return data


def runs(job: dict[str, Any]) -> list[str]:
    return [step["run"] for step in job["steps"] if "run" in step]


def calls(step: dict[str, Any], command: list[str]) -> bool:
    """The step runs ``command`` and nothing else."""
    return str(step.get("run", "")).strip() == shlex.join(command)


def test_the_workflow_runs_what_ci_runs_on_both_pythons() -> None:
    command = ci_command()
    assert command == ["./scripts/test"]
    readme = (REPO_ROOT / "README.md").read_text()
    assert f"{' '.join(command)}   # everything" in readme  # the README's test command
    jobs = workflow()["jobs"]
    [test] = [job for job in jobs.values() if any(calls(s, command) for s in job["steps"])]
    assert test["strategy"]["matrix"]["python-version"] == ["3.11", "3.12"]
    [python] = [s for s in test["steps"] if s.get("uses", "").startswith("actions/setup-python@")]
    assert python["with"]["python-version"] == "${{ matrix.python-version }}"
    # scripts/bootstrap.sh makes the virtualenv with $PYTHON: the matrix's interpreter
    assert test["env"]["PYTHON"] == "python"
    assert {"push", "pull_request"} <= set(workflow()[True])  # `on:` parses as True


def test_what_scripts_test_would_apt_get_is_installed_before_it_runs() -> None:
    """scripts/test apt-gets a missing tool only as root; a CI runner is not root."""
    script = (REPO_ROOT / "scripts" / "test").read_text()
    needed = dict(re.findall(r"command -v (\S+) >/dev/null \|\| apt_install (\S+)", script))
    assert {"redis-server", "java", "mvn"} <= set(needed)
    [test] = [job for job in workflow()["jobs"].values() if "matrix" in job.get("strategy", {})]
    steps = test["steps"]
    before = steps[: next(i for i, s in enumerate(steps) if calls(s, ci_command()))]
    setup = "\n".join(s.get("run", "") for s in before)
    installed = {w for line in setup.splitlines() if "apt-get install" in line
                 for w in line.split()}  # fmt: skip
    [java] = [s for s in before if s.get("uses", "").startswith("actions/setup-java@")]
    assert java["with"]["java-version"] == "17"
    for command, package in needed.items():
        if command == "java":
            continue
        linked = f"/usr/local/bin/{command}" in setup  # a binary the runner has, renamed
        assert package in installed or linked, f"{command} ({package}) is not set up"


def test_a_job_builds_the_wheel_and_the_image() -> None:
    commands = [r for job in workflow()["jobs"].values() for r in runs(job)]
    assert any(re.search(r"pip wheel .*--no-deps|-m build", r) for r in commands)
    assert any(re.search(r"docker build .*\.$", line.strip()) for r in commands
               for line in r.splitlines())  # fmt: skip
