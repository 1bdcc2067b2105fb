"""The site owns its DP-SGD budget: a job may ask for less than a site's policy allows, never more.

Three simulated sites run a DP job that asks for epsilon 3 on the study: site-1's policy allows 8
(it spends at most 3 of them), site-2's allows 2 (it declines every round, naming the policy
field, and the ledger records why it is absent), site-3 has no section (the default, 8)."""

from __future__ import annotations

import json

import pytest

from clinfed.data.profiles import STUDY_ID
from clinfed.data.synth import synthesise
from clinfed.demo import DemoConfig, new_job_id, prepare_ledger, run_federated
from clinfed.ledger.settings import COORDINATOR, ledger_settings
from clinfed.privacy.accounting import PrivacyBudget, budget_file
from clinfed.privacy.release import RELEASED_FIELDS
from clinfed.site_config import PRIVACY_DIR_NAME, SITE_CONFIG_FILE

JOB_EPSILON = 3.0
POLICY_EPSILON = {"site-1": 8.0, "site-2": 2.0}
CONFIG = DemoConfig(sites=3, patients=8, shape=(32, 32, 16), seed=5, rounds=2, local_epochs=1, lr=2e-3,
                    privacy="dp", dp_target_epsilon=JOB_EPSILON)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("site_budget")
    data = root / "data"
    synthesise(data, CONFIG.sites, CONFIG.patients, CONFIG.shape, CONFIG.seed)
    for site, epsilon in POLICY_EPSILON.items():
        policy = {"privacy": {"studies": {STUDY_ID: {"dp_sgd": {"unit": "patient", "epsilon": epsilon}}}}}
        (data / site / SITE_CONFIG_FILE).write_text(json.dumps(policy))
    ledger_path = root / "ledger.sqlite"
    prepare_ledger(ledger_path, data, ["site-1", "site-2", "site-3"], log=lambda message: None)
    job_id = new_job_id("site-budget")
    run_federated(data, root / "workspace", CONFIG, ledger_path=ledger_path, job_id=job_id)
    with ledger_settings(COORDINATOR, ledger=ledger_path).open(outbox=False) as ledger:
        return data, ledger.contributions(job_id), ledger.absences(job_id), ledger.global_models(job_id)


def _budget(data, site) -> PrivacyBudget:
    return PrivacyBudget(budget_file(data / site / PRIVACY_DIR_NAME, study=STUDY_ID, site=site, mechanism="dp_sgd"),
                         target_epsilon=8.0, delta=1e-5, accountant="prv", mechanism="dp_sgd")


def test_a_job_asking_more_than_the_site_allows_is_refused_there_and_the_ledger_says_why(run):
    data, contributions, absences, models = run
    assert "site-2" not in {c.site for c in contributions}
    reasons = {a.round: a.reason for a in absences if a.site == "site-2"}
    assert sorted(reasons) == [0, 1]
    for reason in reasons.values():
        # The policy field the site operator would change, its value, and what the job asked.
        assert f"declined: privacy.studies.{STUDY_ID}.dp_sgd.epsilon is 2 at site-2" in reason
        assert "the job asks dp_target_epsilon 3" in reason
    assert not budget_file(data / "site-2" / PRIVACY_DIR_NAME, study=STUDY_ID, site="site-2",
                           mechanism="dp_sgd").exists(), "a refused job spent nothing"
    assert all(sorted(m.participants) == ["site-1", "site-3"] for m in models)


def test_a_job_asking_less_runs_and_spends_it_against_the_sites_budget(run):
    data, contributions, _, _ = run
    for site in ("site-1", "site-3"):
        spent = max(c.patient_epsilon for c in contributions if c.site == site)
        assert 0.8 * JOB_EPSILON < spent <= JOB_EPSILON * (1 + 1e-6), (site, spent)
        # The budget file is the site's (8, from its policy or the default), the job used 3 of it.
        assert _budget(data, site).epsilon() == pytest.approx(spent, rel=1e-6)
        assert all(c.patient_delta <= 1e-5 for c in contributions if c.site == site)


def test_what_reaches_the_ledger_is_coarsened_and_the_loss_stays_at_the_site(run):
    _, contributions, _, _ = run
    for contribution in contributions:
        assert contribution.n_samples % 5 == 0
        assert "train_loss" not in contribution.metrics
        for name, value in contribution.metrics.items():
            if name.startswith("cohort_") or name == "consent_excluded":
                assert value % 5 == 0, (name, value)
            if name in ("received_dice", "received_auc"):
                assert round(value, 2) == value
    assert "train_loss" not in RELEASED_FIELDS
