"""Budget accounting: same numbers as Opacus, persisted, never forgetting a reservation."""

from __future__ import annotations

import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from clinfed.privacy.accounting import PrivacyBudget, compose_epsilon, gaussian_epsilon, noise_multiplier_for
from clinfed.privacy.errors import PrivacyBudgetExceeded, PrivacyStateError


def opacus_epsilon(accountant_class, sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = accountant_class()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize("name,accountant_class", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_epsilon_for_sigma_q_steps_equals_opacus_accountant(name, accountant_class):
    sigma, q, steps, delta = 1.1, 0.05, 120, 1e-5
    ours = compose_epsilon([(sigma, q, 50), (sigma, q, 70)], delta, name)
    assert ours == pytest.approx(opacus_epsilon(accountant_class, sigma, q, steps, delta), rel=1e-9)


def test_gaussian_accountant_is_exact_for_unsubsampled_releases():
    # Ten Gaussian releases at sigma 2 are one at sigma 2/sqrt(10): mu = sqrt(10)/2.
    exact = gaussian_epsilon(math.sqrt(10) / 2, 1e-5)
    assert compose_epsilon([(2.0, 1.0, 10)], 1e-5, "gaussian") == pytest.approx(exact, rel=1e-9)
    # PRV is an upper bound within its eps_error (0.01); RDP is looser still.
    assert exact <= compose_epsilon([(2.0, 1.0, 10)], 1e-5, "prv") <= exact + 0.011
    assert compose_epsilon([(2.0, 1.0, 10)], 1e-5, "rdp") > exact
    with pytest.raises(ValueError, match="without subsampling"):
        compose_epsilon([(1.0, 0.1, 10)], 1e-5, "gaussian")


def test_noise_multiplier_fits_the_whole_plan_into_what_is_left():
    history = [(1.5, 0.01, 1000)]
    sigma = noise_multiplier_for(target_epsilon=6.0, delta=1e-4, sample_rate=0.01, steps=2000, accountant="rdp",
                                 history=history)
    after = compose_epsilon(history + [(sigma, 0.01, 2000)], 1e-4, "rdp")
    assert 6.0 - 0.01 <= after <= 6.0


def test_budget_persists_and_reloads(tmp_path):
    path = tmp_path / "study" / "site-1.update_dp.json"
    budget = PrivacyBudget(path, target_epsilon=5.0, delta=1e-5, accountant="gaussian", mechanism="update_dp")
    total = budget.commit([(3.0, 1.0, 1)], job_id="j", round_=0)
    reloaded = PrivacyBudget(path, target_epsilon=5.0, delta=1e-5, accountant="gaussian", mechanism="update_dp")
    assert reloaded.history == [(3.0, 1.0, 1)]
    assert reloaded.epsilon() == pytest.approx(total)
    assert json.loads(path.read_text())["rounds"][0]["epsilon_total"] == pytest.approx(total)


def test_reservation_of_a_round_that_never_finished_stays_spent(tmp_path):
    path = tmp_path / "b.json"
    budget = PrivacyBudget(path, target_epsilon=50.0, delta=1e-5, accountant="rdp", mechanism="dp_sgd")
    budget.reserve([(1.0, 0.2, 10)], what="round 0", job_id="j", round_=0)  # the client dies here
    restarted = PrivacyBudget(path, target_epsilon=50.0, delta=1e-5, accountant="rdp", mechanism="dp_sgd")
    token = restarted.reserve([(1.0, 0.2, 10)], what="round 0", job_id="j", round_=0)
    restarted.commit([(1.0, 0.2, 10)], job_id="j", round_=0, reservation=token)
    assert restarted.history == [(1.0, 0.2, 20)]


def test_budget_refuses_a_file_written_with_another_delta(tmp_path):
    path = tmp_path / "b.json"
    PrivacyBudget(path, target_epsilon=5.0, delta=1e-5, accountant="rdp", mechanism="dp_sgd").commit(
        [(1.0, 0.1, 5)], job_id="j", round_=0)
    with pytest.raises(PrivacyStateError, match="delta"):
        PrivacyBudget(path, target_epsilon=5.0, delta=1e-3, accountant="rdp", mechanism="dp_sgd")


def test_check_names_site_study_and_file_when_over_budget(tmp_path):
    budget = PrivacyBudget(tmp_path / "b.json", target_epsilon=1.0, delta=1e-5, accountant="gaussian",
                           mechanism="update_dp", site="site-2", study="study-x")
    with pytest.raises(PrivacyBudgetExceeded, match=r"site site-2 declines .* study study-x .*/b\.json"):
        budget.check([(1.0, 1.0, 1)], what="the update")
