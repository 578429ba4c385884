import numpy as np
import pytest
from scipy import stats

from echogen_rl.eval.stats import bootstrap_ci, paired_difference


def test_one_seed_interval_agrees_with_scipy_percentile_bootstrap():
    rng = np.random.default_rng(7)
    scores = rng.beta(2, 5, size=256)  # skewed, like IoUs
    ours = bootstrap_ci(scores, n_resamples=20000, seed=1)
    ref = stats.bootstrap(
        (scores,), np.mean, n_resamples=20000, method="percentile", confidence_level=0.95, random_state=2
    ).confidence_interval
    assert ours["mean"] == pytest.approx(scores.mean())
    # Two independent Monte Carlo runs of the same bootstrap: the endpoints agree to well under the interval width.
    width = ref.high - ref.low
    assert ours["ci_low"] == pytest.approx(ref.low, abs=0.03 * width)
    assert ours["ci_high"] == pytest.approx(ref.high, abs=0.03 * width)


def test_paired_difference_agrees_with_scipy_paired_bootstrap():
    rng = np.random.default_rng(3)
    control = rng.uniform(size=300)
    treatment = np.clip(control + rng.normal(0.03, 0.1, size=300), 0, 1)
    ours = paired_difference(treatment, control, n_resamples=20000, seed=4)
    ref = stats.bootstrap(
        (treatment, control),
        lambda t, c: np.mean(t - c),
        paired=True,
        n_resamples=20000,
        method="percentile",
        random_state=5,
    ).confidence_interval
    width = ref.high - ref.low
    assert ours["diff"] == pytest.approx(np.mean(treatment - control))
    assert ours["ci_low"] == pytest.approx(ref.low, abs=0.03 * width)
    assert ours["ci_high"] == pytest.approx(ref.high, abs=0.03 * width)
    assert ours["ci_low"] > 0  # a shift of 0.03 with noise 0.1 over 300 items is detected


def test_seed_spread_widens_the_interval():
    """Three seeds that disagree by a constant offset: resampling seeds must widen the interval over items alone."""
    rng = np.random.default_rng(0)
    items = rng.uniform(size=200)
    agreeing = np.stack([items, items, items])
    spread = np.stack([items - 0.1, items, items + 0.1])
    narrow, wide = bootstrap_ci(agreeing, seed=0), bootstrap_ci(spread, seed=0)
    assert wide["mean"] == pytest.approx(narrow["mean"])
    assert (wide["ci_high"] - wide["ci_low"]) > 1.5 * (narrow["ci_high"] - narrow["ci_low"])


def test_nan_items_are_skipped_not_counted_as_zero():
    scores = np.array([[1.0, np.nan, 1.0, np.nan], [1.0, 1.0, np.nan, np.nan]])
    result = bootstrap_ci(scores, n_resamples=500)
    assert result["mean"] == 1.0 and result["ci_low"] == 1.0 and result["ci_high"] == 1.0
    assert result["items"] == 3  # the all-NaN item is dropped


def test_identical_arms_give_a_zero_difference():
    scores = np.random.default_rng(1).uniform(size=(3, 50))
    result = paired_difference(scores, scores.copy())
    assert result == {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "seeds": 3, "items": 50}


@pytest.mark.parametrize(
    "treatment,control,match",
    [
        (np.zeros((2, 5)), np.zeros((3, 5)), "differ in shape"),
        (np.full((1, 3), np.nan), np.zeros((1, 3)), "treatment: every score is NaN"),
        (np.array([[0.0, np.inf]]), np.zeros((1, 2)), "treatment: scores hold inf"),
        (np.zeros((1, 1, 3)), np.zeros((1, 1, 3)), r"treatment: expected scores of shape \[seeds, items\]"),
    ],
)
def test_bad_scores_get_a_clear_error(treatment, control, match):
    with pytest.raises(ValueError, match=match):
        paired_difference(treatment, control)
