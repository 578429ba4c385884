"""Confidence intervals for comparing training runs: means and paired differences, by bootstrap.

A study scores every run (a stage, or its control, trained with one seed) on the same held-out items, so its
scores are an array `[seeds, items]`. Two sources of noise move a mean: which items were held out, and which seed
trained the model. [`bootstrap_ci`] resamples both (seeds, then items, each with replacement: a two-level
bootstrap), so an interval is as wide as the seed-to-seed spread makes it. With one seed it is the ordinary
percentile bootstrap over items, the one `scipy.stats.bootstrap(method="percentile")` computes (the tests check
the two agree). A paired difference resamples the same seeds and items in both arms: seed `s` of a stage and
seed `s` of its control share their start, data order and held-out items.

Items may be `NaN` where a metric does not apply (e.g. left/right agreement of a one-object layout); means skip
them.
"""

from __future__ import annotations

import numpy as np


def _as_scores(values, name: str) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[None, :]
    if scores.ndim != 2 or scores.shape[0] < 1 or scores.shape[1] < 1:
        raise ValueError(f"{name}: expected scores of shape [seeds, items], got {scores.shape}")
    if np.isinf(scores).any():
        raise ValueError(f"{name}: scores hold inf")
    if np.isnan(scores).all():
        raise ValueError(f"{name}: every score is NaN")
    return scores


def bootstrap_ci(
    scores, n_resamples: int = 4000, confidence: float = 0.95, seed: int = 0, max_cells: int = 2**24
) -> dict[str, float]:
    """The mean of `scores` and its percentile bootstrap confidence interval, resampling seeds and items.

    Args:
        scores (array-like): `[seeds, items]` (or `[items]`, one seed); `NaN` marks an item the metric skips.
        n_resamples (`int`, *optional*, defaults to `4000`): bootstrap resamples.
        confidence (`float`, *optional*, defaults to `0.95`): the interval's coverage.
        seed (`int`, *optional*, defaults to `0`): seeds the resampling, so a report is reproducible.
        max_cells (`int`, *optional*): resamples are drawn in chunks of at most this many scores.

    Returns:
        `dict`: `mean`, `ci_low`, `ci_high`, `seeds` and `items` (the items with a score in some seed).
    """
    scores = _as_scores(scores, "bootstrap_ci")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 100:
        raise ValueError(f"n_resamples must be >= 100, got {n_resamples}")
    # Items with no score in any seed carry no information; dropping them keeps resamples from coming out empty.
    scores = scores[:, ~np.isnan(scores).all(axis=0)]
    n_seeds, n_items = scores.shape
    rng = np.random.default_rng(seed)
    chunk = max(1, max_cells // (n_seeds * n_items))
    means = []
    for start in range(0, n_resamples, chunk):
        k = min(chunk, n_resamples - start)
        seeds = rng.integers(0, n_seeds, size=(k, n_seeds)) if n_seeds > 1 else np.zeros((k, 1), dtype=int)
        items = rng.integers(0, n_items, size=(k, 1, n_items))
        sample = scores[seeds[:, :, None], items]  # [k, seeds, items]
        valid = ~np.isnan(sample)
        total = np.where(valid, sample, 0.0).sum(axis=(1, 2))
        count = valid.sum(axis=(1, 2))
        means.append(np.divide(total, count, out=np.full(k, np.nan), where=count > 0))
    means = np.concatenate(means)
    means = means[~np.isnan(means)]  # a resample of NaN-only items (possible only when most items are NaN)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {
        "mean": float(np.nanmean(scores)),
        "ci_low": float(low),
        "ci_high": float(high),
        "seeds": int(n_seeds),
        "items": int(n_items),
    }


def paired_difference(treatment, control, **kwargs) -> dict[str, float]:
    """`mean(treatment - control)` with its bootstrap interval; seed `s`, item `i` of one arm pairs with the other's.

    Args:
        treatment, control (array-like): `[seeds, items]` scores of the same shape; `kwargs` go to [`bootstrap_ci`].

    Returns:
        `dict`: `diff`, `ci_low`, `ci_high`, `seeds`, `items`.
    """
    treatment, control = _as_scores(treatment, "treatment"), _as_scores(control, "control")
    if treatment.shape != control.shape:
        raise ValueError(f"paired scores differ in shape: treatment {treatment.shape}, control {control.shape}")
    result = bootstrap_ci(treatment - control, **kwargs)
    return {"diff": result.pop("mean"), **result}
