"""The Kafka jars are fetched once, whole: several processes starting a broker at once
on a fresh machine (the test session's two workers) share one fetch, and a fetch that
failed leaves nothing a later start would take for the cache.

Maven is a stand-in script here (the real fetch needs the network): it counts its runs
and copies its "jars" slowly, one file at a time, as Maven does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from riverflow.settings import Settings
from riverflow.tools.stack import StackError, kafka_libs

FAKE_MVN = """#!/bin/sh
echo run >> "{runs}"
for arg in "$@"; do
  case "$arg" in -DoutputDirectory=*) out="${{arg#-DoutputDirectory=}}";; esac
done
mkdir -p "$out"
for jar in kafka_2.13-4.1.1.jar kafka-clients-4.1.1.jar snappy-java-1.1.10.7.jar; do
  printf 'half' > "$out/$jar"
  sleep 0.3
  printf ' and whole' >> "$out/$jar"
done
exit {status}
"""


def fake_tools(tmp_path: Path, status: int = 0) -> Path:
    """A folder holding a stand-in ``mvn`` (exiting with ``status``) and ``java``."""
    bin_dir = tmp_path / f"bin-{status}"
    bin_dir.mkdir()
    mvn = bin_dir / "mvn"
    mvn.write_text(FAKE_MVN.format(runs=tmp_path / "runs", status=status))
    java = bin_dir / "java"
    java.write_text("#!/bin/sh\nexit 0\n")
    for tool in (mvn, java):
        tool.chmod(0o755)
    return bin_dir


def start_fetch(cache: Path, bin_dir: Path) -> subprocess.Popen[str]:
    code = (
        "from pathlib import Path; from riverflow.settings import Settings; "
        "from riverflow.tools.stack import kafka_libs; "
        f"print(kafka_libs(Settings(cache_dir=Path({str(cache)!r}))))"
    )
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True
    )


def test_processes_starting_at_once_fetch_the_jars_once_and_all_find_them_whole(
    tmp_path: Path,
) -> None:
    bin_dir, cache = fake_tools(tmp_path), tmp_path / "cache"
    fetches = [start_fetch(cache, bin_dir) for _ in range(3)]
    outs = [p.communicate(timeout=60)[0].strip() for p in fetches]
    assert [p.returncode for p in fetches] == [0, 0, 0]
    libs = cache / "kafka-4.1.1" / "libs"
    assert outs == [str(libs)] * 3
    assert (tmp_path / "runs").read_text().splitlines() == ["run"]  # Maven ran once
    jars = sorted(p.name for p in libs.glob("*.jar"))
    assert jars == ["kafka-clients-4.1.1.jar", "kafka_2.13-4.1.1.jar", "snappy-java-1.1.10.7.jar"]
    assert {p.read_text() for p in libs.glob("*.jar")} == {"half and whole"}


def test_a_failed_fetch_leaves_no_jar_for_the_next_start_to_take_as_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(cache_dir=tmp_path / "cache")
    monkeypatch.setenv("PATH", f"{fake_tools(tmp_path, status=1)}:/usr/bin:/bin")
    with pytest.raises(StackError, match="fetching Kafka jars failed"):
        kafka_libs(settings)
    root = tmp_path / "cache" / "kafka-4.1.1"
    assert not (root / "libs").exists() and not (root / "libs.partial").exists()
    # a fetch killed half way through (an older release kept its copies in libs/):
    # the next fetch replaces them with whole ones
    (root / "libs").mkdir()
    (root / "libs" / "kafka_2.13-4.1.1.jar").write_text("half")
    monkeypatch.setenv("PATH", f"{fake_tools(tmp_path, status=0)}:/usr/bin:/bin")
    libs = kafka_libs(settings)
    assert (libs / ".complete").exists()
    assert (libs / "kafka_2.13-4.1.1.jar").read_text() == "half and whole"
    assert (tmp_path / "runs").read_text().splitlines() == ["run", "run"]
