"""The status page's HTML, its serving next to /metrics, and the report's PNG.

What the page looks like once its script ran is checked in headless Chromium
(tests/integration/test_status_page.py); here: what the HTML carries.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from riverflow.monitors.errors import ViewError
from riverflow.monitors.exporter import StageMetrics, serve
from riverflow.monitors.plot import render_png
from riverflow.monitors.status import CANDIDATE_COLOURS, MARKER_COLOURS, render_html
from riverflow.monitors.view import MonitorView, parse_view
from riverflow.tools.stack import free_port
from tests.monitor_views import empty_view, ranking_view, realistic_view

HOSTILE = "<script>alert(1)</script>"


def embedded(page: str, element_id: str) -> object:
    match = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', page)
    assert match, f"no #{element_id} in the page"
    return json.loads(match.group(1))


def test_page_names_the_champion_and_carries_every_candidate() -> None:
    view = realistic_view()
    page = render_html(view, live=False)
    assert '<h2 id="champion">Champion: hoeffding v16</h2>' in page
    assert embedded(page, "view") == view.model_dump(mode="json")
    for cand in view.candidates:
        assert f'"name":"{cand.name}"' in page


def test_hostile_names_cannot_inject_markup() -> None:
    view = realistic_view()
    view.pipeline = HOSTILE
    view.candidates[0].name = HOSTILE
    view.champion = {"model": HOSTILE, "version": 3}
    view.markers[0].text = '</script><img src=x onerror="alert(2)">'
    view.series[HOSTILE] = view.series.pop("hoeffding")
    page = render_html(view, live=True)
    assert "alert(1)</script>" not in page and "<img" not in page
    # only our three script elements: the view, the config, the code
    assert page.count("<script") == 3 and page.count("</script>") == 3
    assert "Champion: &lt;script&gt;alert(1)&lt;/script&gt; v3" in page
    assert embedded(page, "view") == view.model_dump(mode="json")  # the names survive intact


def test_page_requests_nothing_but_its_own_status_json() -> None:
    page = render_html(realistic_view(), live=True)
    assert not re.search(r"\b(src|href)\s*=", page)
    assert re.findall(r"https?://[^\s\"')]+", page) == ["http://www.w3.org/2000/svg"]
    assert 'fetch("/status.json"' in page


def test_only_the_live_page_refreshes() -> None:
    config_of = lambda live: embedded(render_html(realistic_view(), live=live), "config")  # noqa: E731
    assert config_of(True)["live"] is True  # type: ignore[index]
    assert config_of(False)["live"] is False  # type: ignore[index]


def test_only_a_slate_pipelines_page_carries_a_ranking_panel() -> None:
    fraud = embedded(render_html(realistic_view(), live=True), "view")
    assert fraud["ranking"] is None  # type: ignore[index]
    view = ranking_view()
    page = render_html(view, live=False)
    assert embedded(page, "view") == view.model_dump(mode="json")
    assert parse_view(view.model_dump_json()) == view  # a saved slate view reports too


def test_an_empty_view_renders() -> None:
    page = render_html(empty_view(), live=True)
    assert "Champion: none yet" in page
    assert embedded(page, "view") == empty_view().model_dump(mode="json")


def test_a_view_that_is_not_one_is_refused_naming_the_problem() -> None:
    with pytest.raises(ViewError, match=r"state.json is not a monitor view:\n  \(top level\): "):
        parse_view(b"{not json", source="state.json")
    data = realistic_view().model_dump(mode="json")
    data["candidates"][1]["role"] = "boss"
    del data["pipeline"]
    with pytest.raises(ViewError) as err:
        parse_view(json.dumps(data))
    assert "  pipeline: Field required" in str(err.value)
    assert "  candidates.1.role: Input should be 'champion' or 'challenger'" in str(err.value)


@pytest.fixture
def served() -> Iterator[tuple[str, MonitorView]]:
    view = realistic_view()
    server = serve(StageMetrics("monitor"), free_port(), view=lambda: view)
    yield f"http://127.0.0.1:{server.server_port}", view
    server.shutdown()
    server.server_close()


def get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.headers["Content-Type"], r.read()


def test_the_monitor_serves_page_and_view_beside_metrics(served: tuple[str, MonitorView]) -> None:
    base, view = served
    for path in ("/", "/status"):
        kind, body = get(base + path)
        assert kind.startswith("text/html")
        assert embedded(body.decode(), "config")["live"] is True  # type: ignore[index]
    kind, body = get(base + "/status.json")
    assert kind == "application/json"
    assert parse_view(body) == view
    kind, body = get(base + "/metrics")
    assert b"riverflow_consumed_messages_total" in body
    assert get(base + "/healthz")[1] == b"ok\n"


def test_a_stage_without_a_view_serves_no_page() -> None:
    server = serve(StageMetrics("scorer"), free_port())
    try:
        _, body = get(f"http://127.0.0.1:{server.server_port}/status.json")
        assert b"riverflow_consumed_messages_total" in body  # the Prometheus app, as before
    finally:
        server.shutdown()
        server.server_close()


def near(pixels: np.ndarray, colour: str, tolerance: float = 0.08) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(pixels[..., :3] - rgb).max(axis=-1) < tolerance).sum())


def test_png_draws_every_series_and_marker(tmp_path: Path) -> None:
    view = realistic_view()
    path = tmp_path / "report.png"
    render_png(view, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000
    pixels = imread(path)
    for colour in CANDIDATE_COLOURS[: len(view.series)]:
        assert near(pixels, colour) > 1000, colour  # a line across the plot
    # against the same plot without markers: grey text and axes look like "retire"
    render_png(view.model_copy(update={"markers": []}), tmp_path / "bare.png")
    bare = imread(tmp_path / "bare.png")
    for kind in {m.kind for m in view.markers}:
        colour = MARKER_COLOURS[kind]
        assert near(pixels, colour) - near(bare, colour) > 20, kind  # its line and legend


def test_png_of_an_empty_view(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    render_png(empty_view(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
