"""End to end through real FLARE simulator processes: tiny volumes, 2 sites, 2 rounds."""

import json

import pytest

from clinfed.demo import SERVER_MODEL_KEY, DemoConfig, run_demo

TINY = DemoConfig(sites=2, patients=10, shape=(32, 32, 16), seed=3, rounds=2, local_epochs=3)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = run_demo(out, TINY, log=lambda message: None)
    return out, results


def test_results_json_has_the_documented_schema(demo_run):
    out, results = demo_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk) >= {"config", "central", "local", "federated", "cross_site"}
    for arm in (on_disk["central"], on_disk["federated"], *on_disk["local"].values()):
        assert isinstance(arm["dice"], float) and 0.0 <= arm["dice"] <= 1.0
        assert arm["auc"] is None or 0.0 <= arm["auc"] <= 1.0
    assert sorted(on_disk["local"]) == ["site-1", "site-2"]
    rounds = on_disk["federated"]["per_round"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert set(r) >= {"round", "dice", "auc", "seconds"} and r["seconds"] > 0
    assert (out / "dice_per_round.png").stat().st_size > 1000
    assert (out / "final_scores.png").stat().st_size > 1000


def test_global_model_improves_on_the_initial_one(demo_run):
    _, results = demo_run
    federated = results["federated"]
    assert federated["initial_dice"] is not None
    assert federated["dice"] > federated["initial_dice"] + 0.05, federated


def test_cross_site_evaluation_scores_every_model_at_every_site(demo_run):
    _, results = demo_run
    cross_site = results["cross_site"]
    assert sorted(cross_site) == ["site-1", "site-2"]
    for site, scores in cross_site.items():
        assert {SERVER_MODEL_KEY, "site-1", "site-2"} <= set(scores), (site, scores)
        assert 0.0 <= scores[SERVER_MODEL_KEY]["dice"] <= 1.0
