"""The status page: one self-contained HTML document drawn from a ``MonitorView``.

The template, CSS and JS ship as package data in ``page/`` and are read with
``importlib.resources``, so an installed wheel renders the page without a checkout.
CSS and JS are inlined and the page makes no request but its own ``/status.json``:
the view is embedded as JSON and the script draws the chart (SVG) and the tables
from it, with text set through ``textContent`` only, so names from user specs
cannot inject markup. Served live by the monitor (the script re-fetches
``/status.json`` every 2 s and redraws) and written static by ``riverflow report``.
"""

from __future__ import annotations

import html
import re
import time
from functools import cache
from importlib.resources import files
from typing import get_args

import orjson

from riverflow.monitors.view import MarkerKind, MonitorView

MARKER_COLOURS: dict[MarkerKind, str] = {
    "drift": "#d62728",
    "feature_drift": "#9467bd",
    "challenger": "#1f77b4",
    "promote": "#2ca02c",
    "rollback": "#ff7f0e",
    "retire": "#7f7f7f",
    "search": "#17becf",
    "prune": "#bcbd22",
}
# Candidates are drawn solid in these, markers dashed in the ones above.
CANDIDATE_COLOURS = ("#0b5563", "#c2185b", "#8d6e00", "#4e342e", "#00897b", "#3949ab")
# Metrics in this order first in the candidates table, any others after them.
METRIC_ORDER = ("accuracy", "precision", "recall", "f1", "macro_f1", "roc_auc", "log_loss",
                "mae", "rmse", "r2")  # fmt: skip
REFRESH_MS = 2000

assert set(MARKER_COLOURS) == set(get_args(MarkerKind)), "a marker kind without a colour"


@cache
def _asset(name: str) -> str:
    return (files("riverflow.monitors") / "page" / name).read_text(encoding="utf-8")


def champion_text(view: MonitorView) -> str:
    """``name vN`` of the champion: the registry's pointer, else the candidate in that role."""
    if view.champion:
        return f"{view.champion.get('model', '?')} v{view.champion.get('version', '?')}"
    for cand in view.candidates:
        if cand.role == "champion":
            return f"{cand.name} v{cand.version}"
    return "none yet"


def _script_json(data: object) -> str:
    # Inside <script> only "</" could end the element early; escaping every <, > and &
    # keeps the JSON valid and the HTML parser blind to it.
    text = orjson.dumps(data).decode()
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(view: MonitorView, live: bool) -> str:
    """The whole page for ``view``; ``live`` makes it refresh itself from ``/status.json``."""
    config = {
        "live": live,
        "refresh_ms": REFRESH_MS,
        "markers": MARKER_COLOURS,
        "candidates": CANDIDATE_COLOURS,
        "metric_order": METRIC_ORDER,
    }
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(view.updated))
    parts = {
        "TITLE": html.escape(view.pipeline),
        "CHAMPION": html.escape(champion_text(view)),
        "MODE": "live" if live else "report",
        "UPDATED": html.escape(when),
        "CSS": _asset("status.css"),
        "JS": _asset("status.js"),
        "CONFIG": _script_json(config),
        "VIEW": _script_json(view.model_dump(mode="json")),
    }
    # one pass over the template: what is substituted is never searched again
    return re.sub(r"%([A-Z]+)%", lambda m: parts[m.group(1)], _asset("status.html"))
