"""The report's PNG: the status page's chart (series and markers) drawn by matplotlib."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from riverflow.monitors.status import CANDIDATE_COLOURS, MARKER_COLOURS, champion_text
from riverflow.monitors.view import MonitorView


def render_png(view: MonitorView, path: Path) -> None:
    """Write the chart of ``view`` (each candidate's metric, a line per marker) to ``path``."""
    # A bare Figure draws with Agg and touches no pyplot state: no display, thread-safe.
    fig = Figure(figsize=(11, 4.5), dpi=100, layout="constrained")
    ax = fig.subplots()
    title = (f"{view.pipeline}: {view.metric} over windows of {view.window} labels"
             f"  (champion: {champion_text(view)})")  # fmt: skip
    ax.set_title(_plain(title), loc="left", fontsize=11)
    ax.set_xlabel("labelled events")
    ax.set_ylabel(view.metric)
    ax.grid(True, color="#eeeeee")
    handles: list[Line2D] = []
    names = list(view.series) + [c.name for c in view.candidates if c.name not in view.series]
    for i, name in enumerate(names):
        points = [p for p in view.series.get(name, []) if p.value == p.value]  # drop NaN
        if points:
            (line,) = ax.plot(
                [p.labels for p in points], [p.value for p in points], linewidth=1.6,
                color=CANDIDATE_COLOURS[i % len(CANDIDATE_COLOURS)], label=_plain(name),
            )  # fmt: skip
            handles.append(line)
    kinds_seen = []
    for m in view.markers:
        ax.axvline(m.labels, color=MARKER_COLOURS[m.kind], linestyle="--", linewidth=1.1)
        if m.kind not in kinds_seen:
            kinds_seen.append(m.kind)
    handles += [
        Line2D([], [], color=MARKER_COLOURS[k], linestyle="--", label=k) for k in kinds_seen
    ]
    if handles:
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5),
                  frameon=False, fontsize=9)  # fmt: skip
    else:
        ax.text(0.5, 0.5, "waiting for labels", transform=ax.transAxes, ha="center",
                va="center", fontsize=14, color="#777777")  # fmt: skip
    fig.savefig(path, format="png")


def _plain(text: str) -> str:
    # names come from user specs: a "$" must not switch matplotlib into mathtext
    return text.replace("$", r"\$")
