"""The membership-inference audit has teeth: on the same small cohorts, LiRA tells the federated
model's training patients from held-out ones when the sites train without DP, and finds nothing
measurable when they train with DP-SGD at epsilon 8.

Three sites of about 10 patients (5 members each per model), eight federations per arm trained on
random halves (each model the target, the other seven its shadows): about 240 decisions per arm.
(With six, online LiRA's IN and OUT fits rest on about three shadows each, and on whole volumes at
the study's spacing its leak fell to p = 0.03.)
What so few decisions can show: leakage clearly above chance without DP (advantage at least 0.10 above
its chance level, p <= 0.01); and with DP an advantage not measurably above 2% (the lower end of
its 95% interval at or below 0.02). Pinning a DP advantage *point* below 2% takes thousands of
decisions (the estimate's noise is about 0.26 x sqrt(1/n_in + 1/n_out)): ``benchmarks/mia.py``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from clinfed.cli import main
from clinfed.evaluation.cohorts import synthetic_sites
from clinfed.evaluation.federation import Recipe
from clinfed.evaluation.membership import ATTACKS, attack_figures, audit_pool, train_pool

ROI = (16, 16, 16)
# The product's training code in settings that let a model remember its patients: few patients,
# 32 epochs, a high learning rate. The DP arm differs only by dp_epsilon.
RECIPE = Recipe(rounds=2, local_epochs=16, batch_size=2, lr=1e-2, roi=ROI)
MODELS = 8
# The first test using ``audits`` trains its 16 federations (about 12 minutes on 2 busy cores).
TRAINS_THE_AUDITS = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    return synthetic_sites(tmp_path_factory.mktemp("sites"), n_sites=3, n_patients=12, shape=ROI, seed=0)


@pytest.fixture(scope="module")
def audits(pools):
    sites = sorted(pools)
    plain = train_pool(pools, RECIPE, sites=sites, n_models=MODELS, seed=0)
    private = train_pool(pools, replace(RECIPE, dp_epsilon=8.0), sites=sites, n_models=MODELS, seed=0)
    return plain, private


def strongest_lira(figures: dict) -> dict:
    """The attacker's pick of LiRA's two variants: online (IN and OUT shadows) or offline (OUT only).
    Which is stronger depends on the model (since the outcome head reads detached features,
    offline, whose OUT fits use every shadow, is)."""
    return max((figures["lira_online"], figures["lira_offline"]), key=lambda f: f["advantage_over_chance"])


@TRAINS_THE_AUDITS
def test_without_dp_lira_tells_training_patients_from_held_out_ones(audits):
    plain, _ = audits
    lira = strongest_lira(audit_pool(plain))
    assert lira["decisions"] >= 150
    assert lira["advantage_over_chance"] >= 0.10
    assert lira["p_value"] <= 0.01
    assert lira["auc_ci95"][0] > 0.5


@TRAINS_THE_AUDITS
def test_with_dp_at_epsilon_8_the_same_attacks_on_the_same_data_find_nothing_measurable(audits):
    plain, private = audits
    assert np.array_equal(plain.member, private.member)  # the same patients in and out, model by model
    assert all(0 < eps <= 8.0 for spent in private.epsilon for eps in spent.values())
    leaky = strongest_lira(audit_pool(plain))
    for attack, figures in audit_pool(private).items():
        assert figures["advantage_over_chance_ci95"][0] <= 0.02, attack
        assert figures["advantage_over_chance"] < leaky["advantage_over_chance"] - 0.05, attack


def test_figures_of_a_perfect_and_of_a_blind_attack():
    rng = np.random.default_rng(0)
    member = np.tile([True, False], 200)
    patients, targets = np.arange(400) // 2, np.zeros(400, int)
    perfect = attack_figures(member.astype(float), member, patients, targets, rng=rng, n_bootstrap=50,
                             n_permutations=20)
    assert perfect["auc"] == 1.0 and perfect["advantage"] == 1.0 and perfect["tpr_at_1pct_fpr"] == 1.0
    blind = attack_figures(rng.normal(size=400), member, patients, targets, rng=rng, n_bootstrap=50,
                           n_permutations=50)
    assert abs(blind["auc"] - 0.5) < 0.1 and blind["advantage_over_chance"] < 0.08 and blind["p_value"] > 0.01
    assert blind["advantage_chance"] > 0.03  # the best threshold finds a gap even in noise


def test_eval_privacy_attacks_a_saved_global_model_and_refuses_an_unknown_site(tmp_path, capsys):
    from clinfed.data.synth import synthesise
    from clinfed.training import new_model

    synthesise(tmp_path / "data", 2, 8, ROI, seed=3)
    # The site's key is a random secret and picks the validation patients (the non-members); this one
    # gives site-1 four training and two validation patients with this seed.
    _set_site_key(tmp_path / "data" / "site-1", "clinfed-mia-site-1-0")
    model_file = tmp_path / "FL_global_model.pt"
    torch.save({"model": new_model().state_dict()}, model_file)
    common = ["eval", "privacy", "--data", str(tmp_path / "data"), "--models", "2", "--rounds", "1",
              "--local-epochs", "1", "--json"]
    assert main([*common, "--model", str(model_file)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["attacks"]) == set(ATTACKS) and report["sites"] == ["site-1"]
    assert report["attacks"]["lira_online"]["decisions"] > 0

    assert main([*common, "--site", "site-9"]) == 2
    assert "--site site-9: not among the sites" in capsys.readouterr().err
    (tmp_path / "broken.pt").write_bytes(b"not a model")
    assert main([*common, "--model", str(tmp_path / "broken.pt")]) == 2
    assert "broken.pt: not a FusionSegNet state dict" in capsys.readouterr().err
    # A key that puts all six of site-1's patients in training leaves nobody to compare them with.
    _set_site_key(tmp_path / "data" / "site-1", "clinfed-mia-site-1-6")
    assert main([*common, "--model", str(model_file)]) == 2
    assert "--site site-1: 6 training and 0 validation patient(s)" in capsys.readouterr().err


def _set_site_key(site_dir, seed: str) -> None:
    (site_dir / "site_secret.key").write_text(hashlib.sha256(seed.encode()).hexdigest() + "\n")
