"""The epsilon our accounting reports for DP-SGD agrees with an independent implementation:
Google's ``dp-accounting`` privacy-loss-distribution (PLD) accountant, within 5%.

Our accounting composes with Opacus's PRV accountant (``clinfed.privacy.accounting``); PLD and
PRV are both numerically tight for the Poisson-subsampled Gaussian, so a disagreement beyond
discretisation error means one of them was fed the wrong sigma, sample rate, step count or delta.
"""

from __future__ import annotations

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from clinfed.privacy.accounting import compose_epsilon, noise_multiplier_for


def pld_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("sigma, sample_rate, steps, delta", [
    (1.1, 0.01, 1000, 1e-5),    # a large cohort: small batches, many steps
    (0.8, 0.2, 40, 1e-5),       # the benchmarks' large Poisson batches (64 of 300), few epochs
    (2.0, 0.5, 16, 1e-5),       # a small site: half its patients per step
    (1.0, 0.05, 200, 1e-3),     # the old default delta (1 / (10 n))
])
def test_epsilon_for_sigma_q_steps_delta_agrees_with_google_pld_within_5_percent(sigma, sample_rate, steps, delta):
    ours = compose_epsilon([(sigma, sample_rate, steps)], delta, "prv")
    theirs = pld_epsilon(sigma, sample_rate, steps, delta)
    assert ours == pytest.approx(theirs, rel=0.05)


def test_a_history_of_rounds_is_accounted_as_their_composition():
    # Two rounds at different noise (a site's second job after a budget change) = one PLD composition.
    rounds = [(1.2, 0.1, 50), (0.9, 0.1, 30)]
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, q, steps in rounds:
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    assert compose_epsilon(rounds, 1e-5, "prv") == pytest.approx(accountant.get_epsilon(1e-5), rel=0.05)


def test_the_noise_planned_for_a_budget_spends_it_by_google_pld_too():
    # The plan SiteDPSGD makes: the sigma that fits the whole job into epsilon 8 at delta 1e-5.
    sigma = noise_multiplier_for(target_epsilon=8.0, delta=1e-5, sample_rate=64 / 300, steps=40)
    spent = pld_epsilon(sigma, 64 / 300, 40, 1e-5)
    assert spent == pytest.approx(8.0, rel=0.05)
    assert pld_epsilon(sigma * 0.8, 64 / 300, 40, 1e-5) > 8.0 * 1.05  # less noise would overspend
