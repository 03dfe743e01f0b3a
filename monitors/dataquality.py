"""The status page's data-quality panel, from the predictions the monitor reads.

A prediction carries the model inputs as the event held them (None: missing) and
what the spec's cleaning changed (``cleaned``: field -> impute, clip or bucket),
its event time and when it was scored. Over the last ``window`` predictions this
keeps, per input field, the share missing and the share each rule changed, and
the freshness (scored minus event time: mean and max). The scorer's ``/metrics``
has the same per field over every event, plus type errors and per-partition
freshness (``riverflow.stages.quality``); this panel is what one page can show.
Memory: one flag per field and rule per prediction in the window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

COLUMNS = ("missing", "impute", "clip", "bucket")


class FieldQualityWatch:
    """Windowed data-quality rates over predictions (see the module docstring)."""

    def __init__(self, window: int = 1_000) -> None:
        self.window = window
        # per prediction: the fields missing, the (field, rule) cleaned, its freshness
        self._rows: deque[tuple[tuple[str, ...], tuple[tuple[str, str], ...], float]] = deque(
            maxlen=window
        )
        self._fields: dict[str, None] = {}  # input names seen, in order (bounded by the spec)

    def observe(
        self, inputs: Mapping[str, Any], cleaned: Mapping[str, str], freshness_s: float
    ) -> None:
        if len(self._fields) < 1_000:
            for name in inputs:
                self._fields.setdefault(name)
        missing = tuple(name for name, value in inputs.items() if value is None)
        self._rows.append((missing, tuple(cleaned.items()), freshness_s))

    def view(self) -> dict[str, Any]:
        """``{"fields": {name: {missing, impute, clip, bucket}}, "freshness_s": {...},
        "window": n}``; empty before any prediction."""
        n = len(self._rows)
        if not n:
            return {}
        counts = {name: dict.fromkeys(COLUMNS, 0) for name in self._fields}
        lags = []
        for missing, cleaned, lag in self._rows:
            for name in missing:
                counts.setdefault(name, dict.fromkeys(COLUMNS, 0))["missing"] += 1
            for name, rule in cleaned:
                counts.setdefault(name, dict.fromkeys(COLUMNS, 0))[rule] = (
                    counts[name].get(rule, 0) + 1
                )
            lags.append(lag)
        return {
            "window": n,
            "fields": {name: {k: v / n for k, v in c.items()} for name, c in counts.items()},
            "freshness_s": {"mean": sum(lags) / n, "max": max(lags)},
        }
