"""End to end through real FLARE simulator processes: tiny volumes, 3 sites, 4 rounds."""

import hashlib
import json

import pytest

from clinfed.demo import run_demo
from clinfed.experiment import LEDGER_FILE, SERVER_MODEL_KEY, DemoConfig
from clinfed.ledger import LocalLedger

# Three tiny non-IID sites (two CT scanners, one T1 MR; different scale, noise, spacing and lesion
# size), four rounds of two epochs at lr 2e-3.
TINY = DemoConfig(sites=3, patients=10, shape=(32, 32, 16), seed=3, rounds=4, local_epochs=2, lr=2e-3)
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


def test_results_json_has_the_documented_schema(demo_run):
    out, results = demo_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk) >= {"config", "central", "local", "federated", "cross_site", "ledger"}
    for arm in (on_disk["central"], on_disk["federated"], *on_disk["local"].values()):
        assert isinstance(arm["dice"], float) and 0.0 <= arm["dice"] <= 1.0
        assert arm["auc"] is None or 0.0 <= arm["auc"] <= 1.0
    assert sorted(on_disk["local"]) == SITES
    rounds = on_disk["federated"]["per_round"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    for r in rounds:
        assert set(r) >= {"round", "dice", "auc", "seconds"} and r["seconds"] > 0
    assert (out / "dice_per_round.png").stat().st_size > 1000
    assert (out / "final_scores.png").stat().st_size > 1000


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
