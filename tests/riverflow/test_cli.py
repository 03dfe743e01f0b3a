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


def test_the_delivery_demo_prints_regression_metrics() -> None:
    done = riverflow("demo", "--spec", "examples/delivery.yaml", "--events", "3000")
    assert done.returncode == 0, done.stderr
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in done.stdout.splitlines() if line.count("│") == 3}  # fmt: skip
    mae, rmse, r2 = (float(rows[f"prequential {m}"]) for m in ("mae", "rmse", "r2"))
    assert 0 < mae < rmse < 15 and 0 < r2 < 1
    assert "candidate delivery-tree mae" in rows


def test_a_broken_spec_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nevents: {}\n")
    done = riverflow("demo", "--spec", str(spec))
    assert done.returncode == 2
    assert "events.fields: Field required" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_setting_is_named_not_a_traceback() -> None:
    import os

    env = {**os.environ, "RIVERFLOW_BATCH_SIZE": "0", "RIVERFLOW_KAFKA_JVM_OPTIONS": '-Xmx1g "x'}
    done = riverflow("stack", "status", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "RIVERFLOW_BATCH_SIZE: Input should be greater than or equal to 1" in done.stderr
    assert "RIVERFLOW_KAFKA_JVM_OPTIONS: Value error, not a list of JVM options" in done.stderr
    # a rule across settings: a batch waiting out an outage must not leave the group
    env = {**os.environ, "RIVERFLOW_OUTAGE_LIMIT_S": "400"}
    done = riverflow("stack", "status", env=env)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    said = " ".join(done.stderr.split())
    assert "settings: Value error, max_poll_interval_s (300) must exceed outage_limit_s" in said


def test_run_without_servers_says_how_to_get_them(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "RIVERFLOW_CACHE_DIR": str(tmp_path)}
    env.pop("RIVERFLOW_KAFKA_BOOTSTRAP", None)
    env.pop("RIVERFLOW_REDIS_URL", None)
    for command in (("run", "scorer"), ("models", "list")):
        done = riverflow(*command, env=env)
        assert done.returncode == 2
        assert "riverflow stack up" in done.stderr


def test_report_from_a_saved_view_writes_the_page_and_the_plot(tmp_path: Path) -> None:
    from tests.monitor_views import realistic_view

    state = tmp_path / "status.json"
    state.write_text(realistic_view().model_dump_json())
    html, png = tmp_path / "out" / "report.html", tmp_path / "report.png"
    html.parent.mkdir()
    done = riverflow("report", "--state", str(state), "--html", str(html), "--png", str(png))
    assert done.returncode == 0, done.stderr
    page = html.read_text()
    assert "Champion: hoeffding v16" in page and '"live":false' in page
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_from_a_broken_state_names_the_problem(tmp_path: Path) -> None:
    state = tmp_path / "status.json"
    state.write_text('{"pipeline": "fraud", "updated": 1.0, "window": "many"}')
    done = riverflow("report", "--state", str(state), "--html", str(tmp_path / "r.html"))
    assert done.returncode == 2
    err = " ".join(done.stderr.split())  # rich wraps long lines
    assert f"{state} is not a monitor view" in err
    assert "window: Input should be a valid integer" in err
    assert "champion: Field required" in err
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "r.html").exists()


def test_report_without_a_monitor_says_how_to_get_one(tmp_path: Path) -> None:
    from riverflow.tools.stack import free_port

    url = f"http://127.0.0.1:{free_port()}"
    done = riverflow("report", "--url", url, "--html", str(tmp_path / "r.html"))
    assert done.returncode == 2
    err = " ".join(done.stderr.split())
    assert f"no monitor at {url}" in err and "--state" in err
    assert "Traceback" not in done.stderr


def test_report_from_a_running_monitor(tmp_path: Path) -> None:
    from riverflow.monitors.exporter import StageMetrics, serve
    from riverflow.tools.stack import free_port
    from tests.monitor_views import realistic_view

    view = realistic_view()
    server = serve(StageMetrics("monitor"), free_port(), view=lambda: view)
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        html, png = tmp_path / "r.html", tmp_path / "r.png"
        done = riverflow("report", "--url", url, "--html", str(html), "--png", str(png))
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    assert "Champion: hoeffding v16" in html.read_text()
    assert png.stat().st_size > 20_000


def test_the_join_bench_says_what_a_waiting_event_costs_on_disk() -> None:
    spec = str(Path(__file__).parents[2] / "examples" / "fraud-bench.yaml")
    done = riverflow("features", "join-bench", "--spec", spec, "--events", "3000")
    assert done.returncode == 0, done.stderr
    assert "3,000 scored events" in done.stdout
    assert "on the learner's disk" in done.stdout and "lookup" in done.stdout


def test_acls_print_what_each_stage_may_do() -> None:
    kafka = riverflow("acls", "scorer")
    assert kafka.returncode == 0, kafka.stderr
    lines = kafka.stdout.splitlines()
    assert any("User:scorer --operation Read --topic 'fraud.events'" in x for x in lines)
    assert any("--operation Write --topic 'fraud.predictions'" in x for x in lines)
    assert not any("Write --topic 'fraud.model-events'" in x for x in lines)  # not the scorer's
    redis_user = riverflow("acls", "scorer", "--redis")
    assert redis_user.returncode == 0, redis_user.stderr
    rules = redis_user.stdout.split()
    assert "'%R~rf:fraud:champion'" in rules and "'~rf:fraud:champion'" not in rules
    assert "'-@dangerous'" in rules


def test_the_cli_starts_without_the_drift_statistics() -> None:
    """`riverflow tail`, `--help` and the commands that read no spec start without
    SciPy's statistics (River's KSWIN drift detector, ~0.8 s of a 1.5 s start): they
    load where a detector is built (a stage; a spec's check of its monitor)."""
    code = "import sys, riverflow.cli; print('scipy.stats' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]


def test_a_count_of_zero_or_less_is_refused_with_a_clear_error() -> None:
    """``--events 0`` ran the default 20,000 (30,000 requests of the recsys example: ~2
    minutes), and ``--events -5`` an empty run with a summary of nothing."""
    for command in (["demo"], ["demo", "--example", "recsys"], ["generate"], ["produce"]):
        for value, why in (("0", "0: at least 1"), ("-5", "-5: at least 1"),
                           ("many", "'many' is not a whole number")):  # fmt: skip
            done = riverflow(*command, "--events", value)
            assert done.returncode == 2, (command, value, done.stdout)
            assert f"argument --events: {why}" in done.stderr, done.stderr
            assert "summary" not in done.stdout


def test_the_bench_refuses_bad_rates_durations_and_hosts_before_it_starts() -> None:
    """``--rates 1000,abc`` raised a ValueError traceback after the limit's run; ``--rates
    0``, ``--rate-seconds 0`` and an unknown host were taken as given."""
    for args, why in (
        (["--rates", "1000,abc"], "argument --rates: 'abc' is not a whole number"),
        (["--rates", "0"], "argument --rates: 0: at least 1"),
        (["--rates", ","], "argument --rates: ',': no rate (e.g. 1000,5000)"),
        (["--rate-seconds", "0"], "argument --rate-seconds: 0: more than 0 seconds"),
        (["--hold-seconds", "nan"], "argument --hold-seconds: nan: more than 0 seconds"),
        (["--hosts", "kafka"], "argument --hosts: kafka: hosts are faust, confluent"),
        (["--search-steps", "-1"], "argument --search-steps: -1: at least 0"),
        (["--textbook-events", "0"], "argument --textbook-events: 0: at least 1"),
    ):
        done = riverflow("bench", *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert why in done.stderr, done.stderr
        assert "limit" not in done.stdout + done.stderr
