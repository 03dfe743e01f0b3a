"""The layout the docs promise: one namespace, every package installed, imports one way.

docs/architecture.md draws the direction: the composition root (``riverflow``: the
stages, the runtimes, the tools) imports everything; ``streams`` is transport and
imports nothing of ours but the root exception; ``features`` and ``models`` import
only themselves and the shared record contracts; ``monitors`` may read ``models``.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

MAPPED = {"streams", "features", "models", "monitors", "examples"}

# package -> what its modules may import of ours (besides themselves)
MAY_IMPORT = {
    "streams": {"riverflow.errors"},
    "features": {"riverflow.errors", "riverflow.streams.contracts"},
    "models": {"riverflow.errors", "riverflow.streams.contracts"},
    "monitors": {"riverflow.errors", "riverflow.streams.contracts", "riverflow.models"},
}


def pyproject() -> dict:  # type: ignore[type-arg]
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def package_of(folder: Path) -> str:
    rel = folder.relative_to(REPO_ROOT)
    head, *rest = rel.parts
    return ".".join(["riverflow", *rest] if head == "riverflow" else ["riverflow", head, *rest])


def test_every_package_folder_is_installed() -> None:
    setuptools = pyproject()["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = {
        package_of(init.parent)
        for top in ("riverflow", *sorted(MAPPED))
        for init in (REPO_ROOT / top).rglob("__init__.py")
    }
    # the folders of data files only, each with its files named in package-data
    data = listed - on_disk
    assert on_disk <= listed
    assert data <= set(setuptools["package-data"])
    for name in data:
        parts = name.split(".")[1:]
        folder = REPO_ROOT.joinpath(*(parts if parts[0] in MAPPED else ["riverflow", *parts]))
        assert folder.is_dir() and not list(folder.glob("*.py")), name
    mapping = pyproject()["tool"]["setuptools"]["package-dir"]
    assert {k: v for k, v in mapping.items() if k != "riverflow"} == {
        f"riverflow.{name}": name for name in MAPPED
    }


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in {"riverflow", *MAPPED}}


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_imports_run_one_way(package: str) -> None:
    own = f"riverflow.{package}"
    allowed = {own, *MAY_IMPORT[package]}
    wrong = {
        f"{path.relative_to(REPO_ROOT)}: {name}"
        for path in (REPO_ROOT / package).rglob("*.py")
        for name in imports_of(path)
        if not any(name == a or name.startswith(f"{a}.") for a in allowed)
    }
    assert wrong == set()


def test_the_runtime_imports_no_tool() -> None:
    """Tools (demo, stack, bench, probes) sit beside the runtime: the stages and what
    hosts them import none of them; only the CLI, which runs both, does."""
    root = REPO_ROOT / "riverflow"
    runtime = [
        *(root / "stages").glob("*.py"),
        *(p for p in root.glob("*.py") if p.name != "cli.py"),
    ]
    wrong = {
        f"{path.relative_to(REPO_ROOT)}: {name}"
        for path in runtime
        for name in imports_of(path)
        if name.startswith("riverflow.tools")
    }
    assert wrong == set()
