"""The site's privacy policy is validated naming the field, and a site releases only listed fields,
each with its treatment."""

from __future__ import annotations

import pytest
from nvflare.apis.dxo import MetaKey

from clinfed.errors import ConfigError
from clinfed.privacy.policy import parse_policy
from clinfed.privacy.release import RELEASED_FIELDS, WITHHELD, ReleasePolicy, UnlistedRelease, release_meta


@pytest.mark.parametrize("section, message", [
    ({"studies": {"s": {"dp_sgd": {"epsilon": -1}}}}, "privacy.studies.s.dp_sgd: field 'epsilon' must be a number >= "),
    ({"studies": {"s": {"dp_sgd": {"unit": "site"}}}}, "field 'unit' must be 'patient'"),
    ({"studies": {"s": {"update_dp": {"unit": "patient", "epsilon": 1, "noise_multiplier": 1, "clip_norm": 1}}}},
     "field 'unit' must be 'site'"),
    ({"studies": {"s": {"update_dp": {"epsilon": 1, "noise_multiplier": 1}}}}, "field 'clip_norm' is missing"),
    ({"studies": {"s": {"dp_sgd": {"delta": 1.5}}}}, "field 'delta' must be a number"),
    ({"studies": {"s": {"laplace": {}}}}, "unknown field(s) laplace"),
    ({"secure_aggregation": {"min_participants": 1}}, "field 'min_participants' must be an integer >= 2"),
    ({"release": {"count_bucket": 0}}, "privacy.release: field 'count_bucket' must be an integer >= 1"),
])
def test_a_bad_policy_is_refused_naming_the_field(section, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_policy(section, "site-1/local/clinfed_site.json")


def test_the_defaults_are_conservative():
    policy = parse_policy(None, "defaults")
    assert policy.secagg.min_participants == 3 and policy.secagg.min_threshold(5) == 3
    dp_sgd = policy.dp_sgd_for("any-study")
    assert dp_sgd.epsilon == 8.0 and dp_sgd.delta_for(16) == 1e-5 and dp_sgd.delta_for(50_000) == 2e-6
    assert policy.update_dp == {}


def test_a_field_nobody_listed_is_not_released():
    with pytest.raises(UnlistedRelease, match=r"\['patient_age'\] are not listed"):
        release_meta({"n_samples": 16, "patient_age": 71}, ReleasePolicy())


def test_counts_and_scores_are_coarsened_and_the_loss_withheld():
    meta = {"n_samples": 16, MetaKey.NUM_STEPS_CURRENT_ROUND: 16, "train_loss": 0.3141,
            MetaKey.INITIAL_METRICS: {"dice": 0.81234, "auc": 0.6666, "n_val": 4},
            "clinfed_cohort": {"n_train": 16, "n_validation": 4, "n_excluded": 1}, "train_seconds": 12.345,
            "dp_sgd_epsilon_total": 2.5, "dp_sgd_sample_rate": 0.125, "clinfed_round": 3}
    released = release_meta(meta, ReleasePolicy(count_bucket=5, metric_decimals=2))
    assert released == {"n_samples": 20, MetaKey.NUM_STEPS_CURRENT_ROUND: 20,
                        MetaKey.INITIAL_METRICS: {"dice": 0.81, "auc": 0.67, "n_val": 5},
                        "clinfed_cohort": {"n_train": 20, "n_validation": 5, "n_excluded": 5},
                        "train_seconds": 12.3, "dp_sgd_epsilon_total": 2.5, "clinfed_round": 3}
    assert release_meta(released, ReleasePolicy()) == released  # applying it twice changes nothing


def test_every_field_is_listed_once_and_nothing_withheld_is_released():
    assert not set(WITHHELD) & RELEASED_FIELDS
