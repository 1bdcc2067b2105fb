"""The private job (DP-SGD + secure aggregation) end to end in real FLARE simulator processes.

Four sites; site-3 spent its DP budget for the study in an earlier job, so it declines every
train task after taking part in setup. Each round opens from the other three (the SecAgg dropout
path: site-3's masks are removed from its shares, nobody trains or uploads twice), and the job
ends with a model the ledger verifies.
"""

from __future__ import annotations

import re

import pytest

from clinfed import audit
from clinfed.data.profiles import STUDY_ID
from clinfed.data.synth import synthesise
from clinfed.demo import DemoConfig, new_job_id, prepare_ledger, run_federated
from clinfed.ledger.settings import COORDINATOR, ledger_settings
from clinfed.privacy.accounting import PrivacyBudget, budget_file
from clinfed.site_config import PRIVACY_DIR_NAME

SITES = ["site-1", "site-2", "site-3", "site-4"]
SURVIVORS = ["site-1", "site-2", "site-4"]
TARGET_EPSILON = 8.0
CONFIG = DemoConfig(sites=4, patients=8, shape=(32, 32, 16), seed=3, rounds=2, local_epochs=1, lr=2e-3,
                    privacy="dp+mask", dp_target_epsilon=TARGET_EPSILON)


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("private")
    data = root / "data"
    synthesise(data, CONFIG.sites, CONFIG.patients, CONFIG.shape, CONFIG.seed)
    # An earlier job spent more than this job's budget at site-3.
    spent = PrivacyBudget(budget_file(data / "site-3" / PRIVACY_DIR_NAME, study=STUDY_ID, site="site-3",
                                      mechanism="dp_sgd"),
                          target_epsilon=100.0, delta=1e-3, accountant="prv", mechanism="dp_sgd", site="site-3",
                          study=STUDY_ID)
    spent.spend([(0.6, 1.0, 10)], what="an earlier job", job_id="earlier-job", round_=0)
    assert spent.epsilon() > TARGET_EPSILON

    ledger_path = root / "ledger.sqlite"
    prepare_ledger(ledger_path, data, SITES, log=lambda message: None, masking_keys=True)
    job_id = new_job_id("private-e2e")
    server_dir = run_federated(data, root / "workspace", CONFIG, ledger_path=ledger_path, job_id=job_id)
    return root, ledger_path, job_id, server_dir


def _logs(root, participant: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (root / "workspace").rglob("log.txt")
                     if participant in p.parts)


def test_declining_site_drops_out_and_each_round_opens_from_the_others(private_run):
    root, ledger_path, job_id, server_dir = private_run
    assert "declining the train task" in _logs(root, "site-3")
    assert "already spent" in _logs(root, "site-3")
    server_log = _logs(root, "server")
    for round_ in (0, 1):
        assert f"round {round_}: sum of {SURVIVORS} opened (dropped: ['site-3'])" in server_log
    with ledger_settings(COORDINATOR, ledger=ledger_path).open(outbox=False) as ledger:
        contributions = ledger.contributions(job_id)
        models = ledger.global_models(job_id)
        absences = ledger.absences(job_id)
        result = audit.verify(ledger, job_id, next(server_dir.rglob("FL_global_model.pt")))
    assert sorted((c.round, c.site) for c in contributions) == [(r, s) for r in (0, 1) for s in SURVIVORS]
    assert [sorted(m.participants) for m in sorted(models, key=lambda m: m.round)] == [SURVIVORS] * 2
    assert {(a.round, a.site) for a in absences} >= {(0, "site-3"), (1, "site-3")}
    assert all("declined" in a.reason for a in absences if a.site == "site-3")
    assert result.ok, result


def test_contributions_are_masked_and_report_the_dp_spend_within_budget(private_run):
    _, ledger_path, job_id, _ = private_run
    with ledger_settings(COORDINATOR, ledger=ledger_path).open(outbox=False) as ledger:
        contributions = sorted(ledger.contributions(job_id), key=lambda c: (c.site, c.round))
    for contribution in contributions:
        assert 0 < contribution.patient_epsilon <= TARGET_EPSILON
        assert contribution.site_epsilon is None  # no update-level DP in this job: units never merged
        assert 0 < contribution.patient_delta < 1
    # The spend grows round by round and the job's plan ends within the budget.
    by_site = {}
    for contribution in contributions:
        by_site.setdefault(contribution.site, []).append(contribution.patient_epsilon)
    for site, epsilons in by_site.items():
        assert epsilons == sorted(epsilons) and epsilons[0] < epsilons[-1], (site, epsilons)
        assert epsilons[-1] > 0.9 * TARGET_EPSILON, (site, epsilons)


def test_the_server_only_received_masked_inputs_and_each_site_trained_once_a_round(private_run):
    root, ledger_path, job_id, _ = private_run
    for site in SURVIVORS:
        site_log = _logs(root, site)
        for round_ in (0, 1):
            assert site_log.count(f"round {round_}: masked input sent (masked against 3 peers and a self-mask)") == 1
            assert f"round {round_}: unmask answered for 3 survivors, dropped ['site-3']" in site_log
    with ledger_settings(COORDINATOR, ledger=ledger_path).open(outbox=False) as ledger:
        contributions = ledger.contributions(job_id)
    server_log = _logs(root, "server")
    for contribution in contributions:
        # The record is of exactly the bytes the site sent: its masked input, uniform in the ring
        # alone; the server received those very bytes.
        assert contribution.hash_stage == "after_masking"
        received = re.search(rf"round {contribution.round}: update of {contribution.site} received, sha256 (\w+)",
                             server_log)
        assert received, f"no update of {contribution.site} in round {contribution.round} reached the server"
        assert received.group(1) == contribution.update_sha256
