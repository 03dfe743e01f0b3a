"""Why a model gave its score: the top contributing features of one prediction.

Linear models: weight x value of each input after the pipeline's preprocessing,
largest magnitude first. Trees: the decision path (``debug_one``), root first.
Other models are not explained (``None``).
"""

from __future__ import annotations

from typing import Any

from river import compose


def explain(model: Any, x: dict[str, Any], top: int) -> list[dict[str, Any]] | None:
    """At most ``top`` reasons for ``model``'s prediction on ``x``."""
    estimator, xt = model, x
    if isinstance(model, compose.Pipeline):
        estimator = list(model.steps.values())[-1]
        xt = model.transform_one(x)  # every step but the estimator
    weights = getattr(estimator, "weights", None)
    if weights is not None:
        terms = [
            {"feature": f, "value": v, "weight": weights.get(f, 0.0),
             "contribution": weights.get(f, 0.0) * v}
            for f, v in xt.items() if isinstance(v, int | float)
        ]  # fmt: skip
        terms.sort(key=lambda t: -abs(t["contribution"]))
        return terms[:top]
    if hasattr(estimator, "debug_one"):
        text = estimator.debug_one(xt) or ""
        # the lines before "Class ..." are the tests taken from the root to the leaf
        path = []
        for line in text.splitlines():
            if line.startswith("Class"):
                break
            path.append({"rule": line.strip()})
        return path[:top]
    return None
