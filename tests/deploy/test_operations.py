"""docs/operations.md explains every alert an operator can receive, and is found."""

from __future__ import annotations

import re

import yaml

from tests.conftest import REPO_ROOT

OPERATIONS = REPO_ROOT / "docs" / "operations.md"


def test_every_alert_has_a_row_saying_what_to_do() -> None:
    rules = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `(\w+)` \|(.+)\|$", OPERATIONS.read_text(), re.MULTILINE)
    }
    assert alerts and alerts <= set(rows), alerts - set(rows)
    for alert in alerts:  # what it means, and what to do
        meaning, action = rows[alert].split(" | ")
        assert meaning.strip() and action.strip(), alert


def test_the_operations_guide_is_linked_and_its_files_exist() -> None:
    for doc in ("README.md", "docs/architecture.md"):
        assert "operations.md" in (REPO_ROOT / doc).read_text(), doc
    text = OPERATIONS.read_text()
    for path in set(re.findall(r"`((?:deploy|tests|docs|scripts)/[\w./-]+)`", text)):
        assert (REPO_ROOT / path.rstrip("/")).exists(), path
