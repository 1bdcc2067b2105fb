"""The intervals every demo score carries (clinfed.confidence): the AUC is scikit-learn's, an
interval surrounds its figure and narrows with more patients, and an undefined figure is None."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from clinfed.confidence import auc_interval, mean_interval


def test_auc_is_scikit_learns_with_ties_and_its_interval_surrounds_it():
    rng = np.random.default_rng(0)
    outcomes = rng.integers(0, 2, 60)
    scores = np.round(outcomes + rng.normal(size=60), 1)  # rounded: tied scores occur
    auc = auc_interval(outcomes, scores, seed=1)
    assert abs(auc["mean"] - roc_auc_score(outcomes, scores)) < 1e-12
    assert auc["ci95"][0] < auc["mean"] < auc["ci95"][1] and auc["n"] == 60


def test_a_mean_interval_surrounds_the_mean_and_narrows_with_more_patients():
    rng = np.random.default_rng(0)
    few, many = mean_interval(rng.normal(0.7, 0.1, 20)), mean_interval(rng.normal(0.7, 0.1, 500))
    for score in (few, many):
        assert score["ci95"][0] < score["mean"] < score["ci95"][1]
    assert np.diff(many["ci95"])[0] < np.diff(few["ci95"])[0] / 3


def test_a_paired_difference_of_equal_scores_is_exactly_zero():
    dice = np.random.default_rng(0).uniform(size=30)
    assert mean_interval(dice - dice) == {"mean": 0.0, "ci95": [0.0, 0.0], "n": 30}


def test_an_undefined_figure_is_none_not_a_number():
    assert auc_interval([1, 1, 1], [0.2, 0.5, 0.9]) == {"mean": None, "ci95": None, "n": 3}
    assert mean_interval([]) == {"mean": None, "ci95": None, "n": 0}
    assert mean_interval([0.5])["ci95"] is None
