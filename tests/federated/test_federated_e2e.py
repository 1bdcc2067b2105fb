"""End to end through real FLARE simulator processes: tiny volumes, 3 sites, 4 rounds."""

import hashlib
import json

import pytest
import torch

from clinfed.demo import run_demo
from clinfed.experiment import (FLARE_WORKSPACE, INITIAL_MODEL_FILE, LEDGER_FILE, SERVER_MODEL_KEY, DemoConfig,
                                initial_model)
from clinfed.ledger import LocalLedger

# Three tiny non-IID sites (two CT scanners, one T1 MR; different scale, noise, spacing and lesion
# size), four rounds of two epochs at lr 2e-3.
TINY = DemoConfig(sites=3, patients=10, test_patients=6, shape=(32, 32, 16), seed=3, rounds=4, local_epochs=2,
                  lr=2e-3)
SITES = ["site-1", "site-2", "site-3"]
# A site's pseudonymisation key is a random secret, and the train/validation split goes by keyed
# pseudonym; fixed keys make the split the same on every run (two or three validation patients per site
# with this seed), so no site ends up with nothing to validate on.
SITE_KEYS = {"site-1": "clinfed-e2e-site-1-1", "site-2": "clinfed-e2e-site-2-0", "site-3": "clinfed-e2e-site-3-2"}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    for site, seed in SITE_KEYS.items():
        (out / "data" / site).mkdir(parents=True)
        (out / "data" / site / "site_secret.key").write_text(hashlib.sha256(seed.encode()).hexdigest() + "\n")
    results = run_demo(out, TINY)
    return out, results


def _is_score(score, low=0.0, high=1.0) -> bool:
    """A mean with its 95% interval around it, within [low, high]."""
    lo, hi = score["ci95"]
    return low <= lo <= score["mean"] <= hi <= high and score["n"] > 0


def test_results_json_has_the_documented_schema(demo_run):
    out, results = demo_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk) >= {"config", "comparison", "site_profiles", "central", "local", "federated", "site_arm",
                            "federated_minus_local", "cross_site", "ledger"}
    assert sorted(on_disk["local"]) == SITES
    rounds = on_disk["federated"]["per_round"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    for r in rounds:
        assert set(r) >= {"round", "dice", "auc", "seconds"} and r["seconds"] > 0
    assert (out / "dice_per_round.png").stat().st_size > 1000
    assert (out / "final_scores.png").stat().st_size > 1000


def test_every_arm_is_scored_on_every_sites_held_out_test_set_with_intervals(demo_run):
    out, results = demo_run
    comparison = results["comparison"]
    assert "same epoch budget" in comparison["rule"] and comparison["epochs_per_arm"] == TINY.total_epochs
    tested = comparison["test_patients"]
    assert sorted(tested) == SITES and all(0 < n <= TINY.test_patients for n in tested.values())
    # The test patients are their own: generated apart, outside the data root the sites train from.
    assert (out / "test_data").is_dir() and not (out / "data" / "test_data").exists()
    arms = ["central", "federated", *(f"local-only {site}" for site in SITES)]
    assert sorted(results["site_arm"]["arms"]) == sorted(arms) and results["site_arm"]["test_sets"] == SITES
    for arm in arms:
        for site in SITES:
            score = results["site_arm"]["arms"][arm][site]["dice"]
            assert _is_score(score) and score["n"] == tested[site], (arm, site, score)
    union = sum(tested.values())
    for scores in (results["central"], results["federated"], *results["local"].values()):
        assert _is_score(scores["dice"]) and scores["dice"]["n"] == union
        for key in ("auc", "auc_ehr_zeroed", "auc_image_zeroed"):
            assert _is_score(scores[key]), (key, scores[key])
    # The union's Dice is the patient-weighted mean of the per-site Dice.
    per_site = results["site_arm"]["arms"]["federated"]
    weighted = sum(per_site[s]["dice"]["mean"] * tested[s] for s in SITES) / union
    assert abs(results["federated"]["dice"]["mean"] - weighted) < 1e-9
    for site, difference in results["federated_minus_local"].items():
        local = results["local"][site]["dice"]["mean"]
        assert abs(difference["union"]["mean"] - (results["federated"]["dice"]["mean"] - local)) < 1e-9
        assert _is_score(difference["union"], -1.0, 1.0) and _is_score(difference["own_site"], -1.0, 1.0)
    assert results["site_profiles"]["site-3"]["protocol"]


def test_federated_job_starts_from_the_initialisation_of_the_other_arms(demo_run):
    out, _ = demo_run
    saved = torch.load(out / INITIAL_MODEL_FILE, weights_only=True)
    expected = initial_model(TINY).state_dict()
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in expected)
    server_log = (out / FLARE_WORKSPACE / TINY.job_name / "server" / "log.txt").read_text()
    assert f"Loading checkpoint from {(out / INITIAL_MODEL_FILE).resolve()}" in server_log


def test_global_model_improves_on_the_initial_one(demo_run):
    _, results = demo_run
    federated = results["federated"]
    assert federated["initial_dice"] is not None
    # On tiny data the average can still dip for a round; the job keeps its best global model
    # (best_FL_global_model.pt, by validation Dice), and that one must beat the initial model.
    best = max(r["dice"] for r in federated["per_round"] if r["dice"] is not None)
    assert best > federated["initial_dice"] + 0.05, federated


def test_cross_site_evaluation_scores_every_model_at_every_site(demo_run):
    _, results = demo_run
    cross_site = results["cross_site"]
    assert sorted(cross_site) == SITES
    for site, scores in cross_site.items():
        assert {SERVER_MODEL_KEY, *SITES} <= set(scores), (site, scores)
        assert 0.0 <= scores[SERVER_MODEL_KEY]["dice"] <= 1.0


def test_demo_records_to_the_local_ledger_and_verifies_its_final_model(demo_run):
    out, results = demo_run
    ledger = results["ledger"]
    assert ledger["backend"] == "local" and ledger["verified"] is True, ledger
    assert ledger["path"] == str(out / LEDGER_FILE) and ledger["problems"] == []
    # every round: one contribution per site and the global model; nobody was absent
    assert ledger["records"] == TINY.rounds * (TINY.sites + 1)
    assert ledger["model_round"] == TINY.rounds - 1 and ledger["consents"] > 0
    job = LocalLedger(out / LEDGER_FILE, "CoordinatorMSP").job(ledger["job_id"])
    assert sorted((c.round, c.site) for c in job.contributions) == [
        (r, s) for r in range(TINY.rounds) for s in SITES]
    assert [m.model_sha256 for m in job.global_models][-1] == ledger["model_sha256"]
