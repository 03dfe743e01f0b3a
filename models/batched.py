"""Many predictions of one model at once: a slate's pairs, scored together.

``positive_probabilities(model, xs)`` gives what ``positive_probability`` gives
for each ``x`` in turn. For a factorization machine (``river.facto.FMClassifier``,
alone or at the end of a pipeline of transformers) it computes them in one numpy
pass instead: River sums the pairwise interactions ``<v_i, v_j> x_i x_j`` pair
by pair (28 numpy dot products for 8 inputs, ~48 us per prediction), while

    sum_{i<j} <v_i, v_j> x_i x_j = 1/2 * (|sum_i v_i x_i|^2 - sum_i |v_i|^2 x_i^2)

is linear in the inputs (Rendle, 2010), and one stacked array serves the whole
batch (~5 us per prediction; ~2 behind a ``factory.Select`` whose inputs' one-hot
names cannot coincide: every prediction then has as many inputs, and its terms,
the linear one too, are rows of one array). The result equals River's up to rounding
(~1e-16), and the model is left as River's predictions leave it: a latent
vector is created for an input seen for the first time, in the same order
(``tests/models/test_batched.py``). Any other model is scored one by one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from river import compose, facto
from river.utils.math import dot, sigmoid

from riverflow.models.champion import positive_probability
from riverflow.models.factory import Select


def _fm_parts(model: Any) -> tuple[facto.FMClassifier, list[Any]] | None:
    """A factorization machine this module scores (alone, or at the end of a pipeline)
    and the transformers before it; None for any other model."""
    final, steps = model, []
    if isinstance(model, compose.Pipeline):
        *steps, final = model.steps.values()
    if type(final) is not facto.FMClassifier or final.sample_normalization:
        return None
    return final, steps


def fm_proba_one(model: Any, x: dict[str, Any]) -> dict[bool, float] | None:
    """``model.predict_proba_one(x)`` of a factorization machine, by the identity above
    (River's up to rounding, the model left as River's prediction leaves it): the
    learner's prequential prediction, ~28 against ~92 us for the recsys example's FM
    (docs/benchmarks.md). None for any other model."""
    if _fm_parts(model) is None:
        return None
    p = positive_probabilities(model, [x])[0]
    return {False: 1.0 - p, True: p}


def positive_probabilities(model: Any, xs: Sequence[dict[str, Any]]) -> list[float]:
    """P(label is true) of each of ``xs``, as ``positive_probability`` would say."""
    parts = _fm_parts(model)
    if parts is None or not xs:
        return [positive_probability(model, x) for x in xs]
    final, steps = parts
    order = None
    if len(steps) == 1 and type(steps[0]) is Select:  # the inputs taken as _fm reads them
        order, steps = steps[0].ordered, []
    if order is not None and _distinct_one_hot(order):
        try:
            return _fm_selected(final, xs, order)
        except _Unusual:
            pass
    for step in steps:  # the transformers, as the pipeline's predict applies them
        xs = [step.transform_one(x) for x in xs]
    return _fm(final, xs, order)


def _distinct(keys: list[Any]) -> tuple[list[Any], np.ndarray]:
    """The distinct inputs among ``keys``, in order of first use, and where each of
    ``keys`` is among them: a slate's pairs share most inputs (its user, page,
    categories), whose latent vectors are then taken once."""
    index = dict.fromkeys(keys)
    distinct = list(index)
    for n, j in enumerate(distinct):
        index[j] = n
    return distinct, np.fromiter(map(index.__getitem__, keys), dtype=np.intp, count=len(keys))


class _Unusual(Exception):
    """An input ``_fm_selected`` does not score as River would: ``_fm`` does."""


@functools.cache
def _distinct_one_hot(order: tuple[Any, ...]) -> bool:
    """Whether River's one-hot names of ``order``'s inputs (``name_value`` for a string,
    ``name`` for a number) can never coincide: they could only if a name began with
    another one and ``_``. Then every prediction has ``len(order)`` distinct inputs."""
    return len(order) > 1 and not any(
        isinstance(a, str) and isinstance(b, str) and a != b and a.startswith(f"{b}_")
        for a in order
        for b in order
    )


def _fm_selected(
    fm: facto.FMClassifier, xs: Sequence[dict[str, Any]], order: tuple[Any, ...]
) -> list[float]:
    """``_fm`` of ``order``'s inputs, which ``_distinct_one_hot`` allows: each
    prediction has the same number of inputs, so its terms are rows of one array (the
    linear one too). ``_Unusual`` for an input that is neither a string nor a number
    (River would refuse it)."""
    weights, latents = fm.weights, fm.latents
    keys: list[Any] = []
    values: list[Any] = []
    key, value = keys.append, values.append
    for x in xs:
        for j in order:
            v = x[j]
            if isinstance(v, str):
                key(f"{j}_{v}")
                value(1)
            else:
                key(j)
                value(v)
    if None in values:
        raise _Unusual
    distinct, at = _distinct(keys)
    rows = [latents[j] for j in distinct]  # created as River creates them: by first use
    known = [j in weights for j in distinct]  # (River's dot skips an input without a weight)
    linear = [weights[j] if k else 0.0 for j, k in zip(distinct, known, strict=True)]
    try:
        vals = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise _Unusual from None
    shape = (len(xs), len(order))
    lin = np.where(np.asarray(known)[at], np.asarray(linear)[at] * vals, 0.0).reshape(shape)
    weighted = (np.asarray(rows, dtype=float)[at] * vals[:, None]).reshape(*shape, -1)
    sums = weighted.sum(axis=1)
    squares = np.einsum("pnk,pnk->p", weighted, weighted)
    raw = fm.intercept + lin.sum(axis=1) + 0.5 * (np.einsum("pk,pk->p", sums, sums) - squares)
    return [sigmoid(r) for r in raw.tolist()]


def _fm(
    fm: facto.FMClassifier, xs: Sequence[dict[str, Any]], order: tuple[Any, ...] | None = None
) -> list[float]:
    """``positive_probabilities`` of a factorization machine, on ``order``'s inputs of
    each of ``xs`` in that order (as ``factory.Select`` takes them), or on all."""
    weights, latents = fm.weights, fm.latents
    raw: list[float] = []
    keys: list[Any] = []  # every pairwise-interacting input, prediction after prediction
    values: list[float] = []
    starts: list[int] = []  # where each such prediction's inputs start
    which: list[int] = []  # ...and which prediction it is
    for i, x in enumerate(xs):
        # River's one-hot encoding of strings (FMClassifier._ohe_cat_features)
        ohe: dict[Any, Any] = {}
        for j in x if order is None else order:
            v = x[j]
            if isinstance(v, str):
                ohe[f"{j}_{v}"] = 1
            else:
                ohe[j] = v
        raw.append(fm.intercept + dot(ohe, weights))
        if len(ohe) > 1:  # (River touches no latent vector for fewer than two inputs)
            starts.append(len(keys))
            which.append(i)
            keys += ohe
            values += ohe.values()
    if keys:
        distinct, at = _distinct(keys)
        rows = [latents[j] for j in distinct]  # created as River creates them: by first use
        weighted = np.asarray(rows, dtype=float)[at] * np.asarray(values, dtype=float)[:, None]
        starts_at = np.asarray(starts)
        sums = np.add.reduceat(weighted, starts_at, axis=0)
        squares = np.add.reduceat(np.einsum("ij,ij->i", weighted, weighted), starts_at)
        pairwise = 0.5 * (np.einsum("ij,ij->i", sums, sums) - squares)
        for i, value in zip(which, pairwise.tolist(), strict=True):
            raw[i] += value
    return [sigmoid(r) for r in raw]
