"""The install a user makes: the wheel into a fresh virtualenv, run from outside the checkout.

Slow (a wheel build and a virtualenv with every dependency), so it is marked
``install``: ``-m "not integration and not install"`` is the fast suite.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.install

OUR_FOLDERS = ("features", "models", "monitors", "streams", "examples")


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out),
                 str(REPO_ROOT)], cwd=out)  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = out.glob("riverflow-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    assert run([sys.executable, "-m", "venv", str(root)], cwd=root).returncode == 0
    installed = run([str(root / "bin" / "pip"), "install", "-q", str(wheel)], cwd=root)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return root


def test_the_wheel_holds_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"riverflow", f"{wheel.name.split('-py3')[0]}.dist-info"}, top
    for data in ("riverflow/examples/fraud.yaml", "riverflow/examples/fraud-bench.yaml",
                 "riverflow/tools/kafka/pom.xml", "riverflow/streams/topics.py",
                 "riverflow/monitors/page/status.html", "riverflow/monitors/page/status.css",
                 "riverflow/monitors/page/status.js",
                 "riverflow/features/store/lua/prelude.lua"):  # fmt: skip
        assert data in names, data


def test_site_packages_has_no_top_level_models_or_features(venv: Path) -> None:
    python = str(venv / "bin" / "python")
    where = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv)
    site = Path(where.stdout.strip())
    assert (site / "riverflow" / "models").is_dir()
    assert [f for f in OUR_FOLDERS if (site / f).exists()] == []
    for name in ("models", "features", "monitors", "streams"):
        imported = run([python, "-c", f"import {name}"], cwd=venv)
        assert imported.returncode != 0 and f"No module named '{name}'" in imported.stderr


def test_the_demo_runs_from_any_directory(venv: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    demo = run([str(venv / "bin" / "riverflow"), "demo", "--events", "2000"], cwd=elsewhere)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "labels learned" in demo.stdout and "champion at the end" in demo.stdout
    # a shipped example by the name the docs use, from a directory without examples/
    spec = run([str(venv / "bin" / "python"), "-c",
                "from riverflow.spec import load_spec; "
                "print(load_spec('examples/fraud-bench.yaml').name)"], cwd=elsewhere)  # fmt: skip
    assert spec.returncode == 0 and spec.stdout.strip() == "fraudbench", spec.stderr
