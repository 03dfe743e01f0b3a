"""The bench rows share bench.py's helpers through its public names only, and the
spec a row's stage processes load is the example under the row's own name."""

from __future__ import annotations

import ast
from pathlib import Path

from riverflow.spec import load_spec
from riverflow.tools.bench import renamed_spec_file

TOOLS = Path(__file__).resolve().parents[2] / "riverflow" / "tools"


def test_a_bench_row_imports_no_private_name_of_another_module() -> None:
    private = []
    for module in sorted(TOOLS.glob("bench*.py")):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("riverflow"):
                private += [f"{module.name}: {node.module}.{a.name}"
                            for a in node.names if a.name.startswith("_")]  # fmt: skip
    assert len(list(TOOLS.glob("bench*.py"))) >= 3 and private == []


def test_a_rows_spec_file_is_the_spec_under_the_rows_name(tmp_path: Path) -> None:
    spec = load_spec("recsys")
    path = renamed_spec_file(spec, tmp_path, "bench-slates-0a1b2c")
    assert path == tmp_path / "bench-slates-0a1b2c.yaml"
    loaded = load_spec(str(path))
    assert loaded.name == "bench-slates-0a1b2c"
    assert loaded.model_dump(exclude={"name"}) == spec.model_dump(exclude={"name"})
