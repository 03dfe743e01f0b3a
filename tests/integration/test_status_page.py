"""The status page in a real browser: Debian's Chromium, headless, after its script ran.

The chart is made only by the page's script (the served HTML has no SVG), so these
tests fail when the script breaks. The monitor here is a view callable; a test
driving the real monitor stage comes with it.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from riverflow.monitors.exporter import StageMetrics, serve
from riverflow.monitors.status import render_html
from riverflow.monitors.view import MonitorView
from riverflow.tools.stack import free_port
from tests.monitor_views import empty_view, ranking_view, realistic_view

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # without these Chromium calls Google's hosts at start; the machine refuses them
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium(*args: str) -> str:
    """Run headless Chromium with a fresh profile; its stdout."""
    exe = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(exe).exists(), "scripts/test installs Debian's chromium package"
    with tempfile.TemporaryDirectory(prefix="rf-chromium-") as profile:
        done = subprocess.run(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    text: str = ""


class Dom(HTMLParser):
    """Every element of a dumped DOM with its attributes and the text inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[Element] = []
        self.open: list[Element] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs})
        self.elements.append(element)
        if tag not in ("br", "meta", "img", "input", "link", "hr"):
            self.open.append(element)

    def handle_endtag(self, tag: str) -> None:
        while self.open:
            if self.open.pop().tag == tag:
                break

    def handle_data(self, data: str) -> None:
        for element in self.open:
            element.text += data

    def find(self, tag: str, **attrs: str) -> list[Element]:
        return [
            e for e in self.elements
            if e.tag == tag and all(e.attrs.get(k.replace("_", "-")) == v
                                    for k, v in attrs.items())
        ]  # fmt: skip

    def one(self, tag: str, **attrs: str) -> Element:
        found = self.find(tag, **attrs)
        assert len(found) == 1, (tag, attrs, len(found))
        return found[0]


def rendered(url: str, *args: str) -> Dom:
    dom = Dom()
    dom.feed(chromium("--dump-dom", *args, url))
    return dom


@pytest.fixture
def monitor() -> Iterator[Callable[[Callable[[], MonitorView]], str]]:
    """Serve a view callable like the monitor does; the page's URL."""
    servers = []

    def start(view: Callable[[], MonitorView]) -> str:
        server = serve(StageMetrics("monitor"), free_port(), view=view)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def assert_draws(dom: Dom, view: MonitorView) -> None:
    """The chart, the markers, the champion and the tables as a user sees them."""
    assert len(dom.find("svg", **{"class": "chart"})) == 1
    lines = dom.find("polyline", **{"class": "series"})
    assert sorted(line.attrs["data-model"] for line in lines) == sorted(view.series)
    for line in lines:
        points = line.attrs["points"].split()
        assert len(points) == len(view.series[line.attrs["data-model"]]) > 100
        xs = [float(p.split(",")[0]) for p in points]
        assert xs == sorted(xs) and xs[-1] - xs[0] > 200  # spread across the chart
    markers = dom.find("g", **{"class": "marker"})
    assert [m.attrs["data-kind"] for m in markers] == [m.kind for m in view.markers]
    for shown, marker in zip(markers, view.markers, strict=True):
        assert marker.text in shown.text  # the tooltip (<title>) carries the evidence
    assert dom.one("h2", id="champion").text == "Champion: hoeffding v16"
    champion = dom.one("tr", data_role="champion")
    assert champion.attrs["data-model"] == "hoeffding" and "champion" in champion.text
    shown = [r.attrs["data-model"] for r in dom.find("tr") if "data-role" in r.attrs]
    assert shown == [c.name for c in view.candidates]
    for metric in ("accuracy", "roc_auc", "log_loss"):
        assert metric in dom.one("table", id="candidates").text
    assert "atm" in dom.one("table", id="segments").text
    assert "0.0700" in dom.one("p", id="gap").text
    assert "amount_mean_1h" in dom.one("table", id="distributions").text
    assert "p99" in dom.one("table", id="anomaly").text
    quality = dom.one("table", id="data-quality")
    amount = dom.one("tr", data_field="amount")
    assert "channel" in quality.text and "0.2500" in amount.text  # missing and imputed
    assert "max 2.5000 s" in dom.one("p", id="freshness").text
    (search,) = dom.find("table", **{"class": "search"})
    assert search.attrs["data-base"] == "logreg" and "pruned" in search.text
    if view.ranking is None:  # a fraud pipeline has no ranking panel
        assert not dom.find("table", id="ranking") and "Ranking" not in dom.one("main").text


def test_served_page_draws_chart_markers_and_champion(monitor: Callable[..., str]) -> None:
    view = realistic_view()
    url = monitor(lambda: view)
    with urllib.request.urlopen(url, timeout=10) as r:
        source = r.read().decode()
    # nothing of the chart in what the server sends: the script draws all of it
    assert "<svg" not in source and "<polyline" not in source and "<table" not in source
    assert_draws(rendered(url), view)


def test_hostile_names_stay_text_in_the_browser(monitor: Callable[..., str]) -> None:
    view = realistic_view()
    hostile = '<img src=x id="injected"><script>document.title="pwned"</script>'
    view.candidates[1].name = hostile
    view.series[hostile] = view.series.pop("logreg")
    view.markers[0].text = hostile
    dom = rendered(monitor(lambda: view))
    assert not dom.find("img") and dom.find("title")[0].text == "riverflow status: fraud"
    assert hostile in dom.one("tr", data_model=hostile).text
    assert len(dom.find("polyline", data_model=hostile)) == 1


def test_live_page_follows_the_monitor(monitor: Callable[..., str]) -> None:
    first, later = realistic_view(), realistic_view(points=400)
    later.champion = {"model": "hoeffding-fresh", "version": 4}
    served = iter([first])  # the page's HTML embeds the first view, every fetch gets the later
    dom = rendered(monitor(lambda: next(served, later)), "--virtual-time-budget=5000")
    assert dom.one("h2", id="champion").text == "Champion: hoeffding-fresh v4"
    line = dom.one("polyline", data_model="hoeffding")
    assert len(line.attrs["points"].split()) == 400


def test_waiting_for_labels(monitor: Callable[..., str]) -> None:
    dom = rendered(monitor(empty_view))
    assert "Waiting for labels" in dom.one("p", id="waiting").text
    assert dom.one("h2", id="champion").text == "Champion: none yet"
    assert not dom.find("svg")


def test_report_file_renders_the_same_offline(tmp_path: Path) -> None:
    view = realistic_view()
    report = tmp_path / "report.html"
    report.write_text(render_html(view, live=False))
    dom = rendered(report.as_uri())
    assert_draws(dom, view)
    assert "report" in dom.one("p", id="updated").text


def test_a_slate_pipeline_shows_its_ranking_panel(tmp_path: Path) -> None:
    view = ranking_view()
    assert view.ranking is not None
    report = tmp_path / "report.html"
    report.write_text(render_html(view, live=False))
    dom = rendered(report.as_uri())
    assert_draws(dom, view)  # and everything else as ever
    table = dom.one("table", id="ranking")
    for heading in ("CTR@5", "NDCG@5 served", "NDCG@5 own order", "coverage", "ROC AUC"):
        assert heading in table.text
    rows = [r for r in dom.find("tr") if "data-ranking-model" in r.attrs]
    assert [r.attrs["data-ranking-model"] for r in rows] == [m.name for m in view.ranking.models]
    champion = next(m for m in view.ranking.models if m.role == "champion")
    shown = dom.one("tr", data_ranking_role="champion")
    # its CTR@k, and its ROC AUC over the shown items from the candidates' quality
    assert f"{champion.metrics['ctr_at_k']:.4f}" in shown.text and "0.8800" in shown.text
    challenger = dom.one("tr", data_ranking_model="logreg")
    offpolicy = view.ranking.models[1].metrics
    assert offpolicy["offpolicy_ctr_low"] < offpolicy["offpolicy_ctr_at_k"]
    high = f"{offpolicy['offpolicy_ctr_high']:.4f}]"
    assert f"{offpolicy['offpolicy_ctr_at_k']:.4f} [" in challenger.text and high in challenger.text
    requests = dom.one("p", id="ranking-requests").text
    assert f"awaiting labels: {view.ranking.requests['open']} of 200" in requests
    # a chart of each model's NDCG in its own order, a point per sample
    assert dom.one("svg", id="ranking-chart").attrs["class"] == "chart ranking"
    lines = {e.attrs["data-model"]: e for e in dom.find("polyline", **{"class": "ranking"})}
    assert set(lines) == set(view.ranking.series) == {"hoeffding", "logreg"}
    for name, line in lines.items():
        assert len(line.attrs["points"].split()) == len(view.ranking.series[name]) > 5


def test_screenshot_shows_the_page(tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    report.write_text(render_html(realistic_view(), live=False))
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,900", report.as_uri())
    pixels = imread(shot)
    assert pixels.shape[:2] == (900, 1200)
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200  # text, lines, anti-aliasing: not a blank or one-colour page
    white = (pixels[..., :3] > 0.98).all(axis=-1).mean()
    assert 0.3 < white < 0.97
