"""Update-level DP filter: clipping, noise scale, spend across rounds, clean refusal."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.app_common.app_constant import AppConstants
from privacy_helpers import make_fl_ctx

from clinfed.filters.update_dp import DECLINE_HEADER, DP_DELTA, DP_EPSILON_ROUND, DP_EPSILON_TOTAL, UpdateDPFilter
from clinfed.privacy.accounting import gaussian_epsilon


def result_shareable(update: dict, round_: int = 0, n_samples: int = 20):
    shareable = DXO(DataKind.WEIGHT_DIFF, data=update, meta={"n_samples": n_samples}).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, round_)
    return shareable


def test_noise_std_matches_sigma_times_clip_norm(tmp_path):
    sigma, clip = 0.7, 0.05
    dp = UpdateDPFilter(noise_multiplier=sigma, clip_norm=clip, target_epsilon=100.0, delta=1e-5,
                        state_dir=str(tmp_path))
    zeros = {"a": np.zeros((300, 300), np.float32), "b": np.zeros(60_000, np.float32)}
    out = from_shareable(dp.process(result_shareable(zeros), make_fl_ctx()))
    noise = np.concatenate([out.data["a"].ravel(), out.data["b"].ravel()]).astype(np.float64)
    # 150k draws: the sample std is within 1% of sigma*C with overwhelming probability (se ~0.18%).
    assert np.std(noise) == pytest.approx(sigma * clip, rel=0.01)
    assert abs(np.mean(noise)) < 5 * sigma * clip / math.sqrt(noise.size)
    assert out.data["a"].dtype == np.float32


def test_update_is_clipped_to_the_global_l2_norm(tmp_path):
    # Tiny noise (norm ~0.005 here), so an astronomical epsilon: this test is about the clipping.
    dp = UpdateDPFilter(noise_multiplier=1e-4, clip_norm=1.0, target_epsilon=1e12, delta=1e-5, state_dir=str(tmp_path))
    rng = np.random.default_rng(0)
    big = {"a": rng.normal(size=(50, 40)).astype(np.float32), "b": rng.normal(size=500).astype(np.float32)}
    out = from_shareable(dp.process(result_shareable(big), make_fl_ctx())).data
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in out.values()))
    assert norm == pytest.approx(1.0, abs=0.02)
    total = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in big.values()))
    assert np.allclose(out["a"], big["a"] / total, atol=1e-3)  # scaled as a whole, not per tensor
    assert np.allclose(out["b"], big["b"] / total, atol=1e-3)
    small = {"a": np.full(4, 0.1, np.float32)}
    assert np.allclose(from_shareable(dp.process(result_shareable(small), make_fl_ctx())).data["a"], 0.1, atol=1e-3)


def test_spend_accumulates_across_rounds_and_instances_in_the_meta(tmp_path):
    def run(round_):  # a fresh filter each time: the spend comes from the file
        dp = UpdateDPFilter(noise_multiplier=2.0, clip_norm=0.1, target_epsilon=50.0, delta=1e-5,
                            state_dir=str(tmp_path))
        return from_shareable(dp.process(result_shareable({"w": np.zeros(10, np.float32)}, round_), make_fl_ctx())).meta

    first, second = run(0), run(1)
    assert first[DP_EPSILON_ROUND] == pytest.approx(gaussian_epsilon(1 / 2.0, 1e-5), rel=1e-9)
    assert first[DP_EPSILON_TOTAL] == pytest.approx(first[DP_EPSILON_ROUND])
    assert second[DP_EPSILON_TOTAL] == pytest.approx(gaussian_epsilon(math.sqrt(2) / 2.0, 1e-5), rel=1e-9)
    assert second[DP_DELTA] == 1e-5
    assert (tmp_path / "clinfed-tumour-seg" / "site-1.update_dp.json").is_file()


def test_budget_exhaustion_declines_with_an_error_reply_and_no_update(tmp_path):
    dp = UpdateDPFilter(noise_multiplier=1.0, clip_norm=0.1, target_epsilon=6.0, delta=1e-5, state_dir=str(tmp_path))
    replies = [dp.process(result_shareable({"w": np.ones(10, np.float32)}, r), make_fl_ctx()) for r in range(3)]
    assert replies[0].get_return_code() == ReturnCode.OK
    declined = replies[-1]
    assert declined.get_return_code() == ReturnCode.EXECUTION_RESULT_ERROR
    assert "declines the update of round 2" in declined.get_header(DECLINE_HEADER)
    assert "over the budget of 6" in declined.get_header(DECLINE_HEADER)
    with pytest.raises(ValueError):
        from_shareable(declined)  # nothing of the update is in it


def test_filter_does_not_mutate_its_input(tmp_path):
    dp = UpdateDPFilter(noise_multiplier=1.0, clip_norm=0.01, target_epsilon=100.0, delta=1e-5, state_dir=str(tmp_path))
    update = {"a": np.linspace(-1, 1, 1000, dtype=np.float32).reshape(10, 100), "b": np.ones(7, np.float32)}
    dxo = DXO(DataKind.WEIGHT_DIFF, data=update, meta={"n_samples": 20, MetaKey.FILTER_HISTORY: ["Earlier"]})
    snapshot_data, snapshot_meta = copy.deepcopy(update), copy.deepcopy(dxo.meta)
    result = dp.process_dxo(dxo, dxo.to_shareable(), make_fl_ctx())
    assert result is not dxo and result.data is not dxo.data
    for name in update:
        assert np.array_equal(dxo.data[name], snapshot_data[name])
        assert dxo.data[name] is update[name]
    assert dxo.meta == snapshot_meta


def test_constructor_rejects_bad_policy_values():
    with pytest.raises(ValueError, match="noise_multiplier"):
        UpdateDPFilter(noise_multiplier=0)
    with pytest.raises(ValueError, match="delta"):
        UpdateDPFilter(delta=2.0)
    with pytest.raises(ValueError, match="accountant"):
        UpdateDPFilter(accountant="gdp")
