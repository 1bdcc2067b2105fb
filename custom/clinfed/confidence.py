"""95% bootstrap confidence intervals over test patients (SciPy's ``stats.bootstrap``,
percentile method), for the experiment's means, paired differences and ROC AUCs.

A figure is written as ``{"mean": m, "ci95": [low, high], "n": patients}`` (``report.py`` shows
that form); an interval that cannot be computed (too few patients, one outcome class) is None.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

RESAMPLES = 2000


def _interval(data: tuple, statistic, seed: int) -> list[float] | None:
    """Percentile interval of the bootstrap distribution, leaving out the resamples where the
    statistic is undefined (an AUC resample of one class: likely on a few dozen patients)."""
    if len(data[0]) < 2:
        return None
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(data, statistic, paired=True, vectorized=True, n_resamples=RESAMPLES,
                                 confidence_level=0.95, method="percentile", random_state=np.random.default_rng(seed))
    distribution = result.bootstrap_distribution
    distribution = distribution[np.isfinite(distribution)]
    if len(distribution) < RESAMPLES // 2:
        return None
    low, high = np.percentile(distribution, [2.5, 97.5])
    return [float(low), float(high)]


def mean_interval(values, seed: int = 0) -> dict:
    """The mean of per-patient ``values`` (a Dice, or a paired difference of two) and its interval."""
    values = np.asarray(values, dtype=float)
    if not len(values):
        return {"mean": None, "ci95": None, "n": 0}
    return {"mean": float(values.mean()), "ci95": _interval((values,), np.mean, seed), "n": len(values)}


def _auc(outcomes, scores, axis=-1):
    """ROC AUC as the Mann-Whitney statistic, vectorised over bootstrap resamples (scikit-learn's
    ``roc_auc_score`` takes one sample at a time: 2000 calls per interval); ties count one half
    through the average ranks. NaN where a resample holds one class only."""
    ranks = stats.rankdata(scores, axis=axis)
    positive = outcomes == 1
    n_positive = positive.sum(axis=axis)
    n_negative = outcomes.shape[axis] - n_positive
    rank_sum = (ranks * positive).sum(axis=axis)
    return (rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)


def auc_interval(outcomes, scores, seed: int = 0) -> dict:
    """ROC AUC of ``scores`` for the binary ``outcomes`` and its interval (None with one class)."""
    outcomes, scores = np.asarray(outcomes, dtype=float), np.asarray(scores, dtype=float)
    if len(set(outcomes.tolist())) < 2:
        return {"mean": None, "ci95": None, "n": len(outcomes)}
    return {"mean": float(_auc(outcomes, scores)), "ci95": _interval((outcomes, scores), _auc, seed),
            "n": len(outcomes)}
