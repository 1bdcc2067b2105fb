"""Sample-level DP-SGD on the product model, with a job-wide budget that survives restarts."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from privacy_helpers import EHR_SIZE, ROI, synthetic_batch

from clinfed.models.fusion_seg import FusionSegNet
from clinfed.privacy.dp_sgd import SiteDPSGD, trainable_parameters
from clinfed.privacy.errors import PrivacyBudgetExceeded
from clinfed.training import TrainConfig, train_epochs

N, BATCH = 4, 2
CONFIG = TrainConfig(epochs=1, batch_size=BATCH, lr=1e-3, roi=ROI)


def make_dp(budget_file, **overrides) -> SiteDPSGD:
    args = dict(budget_file=budget_file, n_samples=N, batch_size=BATCH, num_rounds=2, local_epochs=1,
                target_epsilon=10.0, accountant="rdp", job_id="job-1", site="site-1", study="s")
    args.update(overrides)
    return SiteDPSGD(**args)


def private_round(dp: SiteDPSGD, model: torch.nn.Module, round_: int) -> dict:
    loader = torch.utils.data.DataLoader(synthetic_batch(N, seed=round_), batch_size=BATCH)
    with dp.private_round(model, torch.optim.Adam(model.parameters(), lr=1e-3), loader, round_=round_) as private:
        return train_epochs(private.model, private.data_loader, CONFIG, optimizer=private.optimizer)


def opacus_rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def test_dp_step_on_fusion_model_runs_and_leaves_its_state_dict_keys(tmp_path):
    torch.manual_seed(0)
    model = FusionSegNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp = make_dp(tmp_path / "dp.json")  # default per-sample gradients: ExpandedWeights
    stats = private_round(dp, model, 0)
    assert stats["steps"] == dp.steps_per_round == 2
    assert list(model.state_dict()) == list(before)  # hooks gone, no "_module." prefix
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert dp.delta == min(1e-5, 1 / (10 * N))  # the default: at most 1e-5 and at most 1/(10 n)


def test_epsilon_equals_opacus_accountant_continues_after_restart_and_stops_at_budget(tmp_path):
    torch.manual_seed(1)
    model = FusionSegNet()
    dp = make_dp(tmp_path / "dp.json")
    private_round(dp, model, 0)
    after_one = dp.epsilon()
    assert after_one == pytest.approx(
        opacus_rdp_epsilon(dp.noise_multiplier, dp.sample_rate, dp.steps_per_round, dp.delta), rel=1e-9)

    restarted = make_dp(tmp_path / "dp.json")  # a client restart: same job, state from the file
    assert restarted.noise_multiplier == dp.noise_multiplier
    assert restarted.epsilon() == pytest.approx(after_one)
    private_round(restarted, model, 1)
    after_two = restarted.epsilon()
    assert after_two > after_one
    assert after_two == pytest.approx(
        opacus_rdp_epsilon(dp.noise_multiplier, dp.sample_rate, 2 * dp.steps_per_round, dp.delta), rel=1e-9)
    # The noise was planned for the whole job (2 rounds): its last round lands on the target...
    assert 10.0 - 0.011 <= after_two <= 10.0
    # ... so a third round is declined before anything is trained.
    assert restarted.would_exceed()
    assert not restarted.would_exceed(next_round_steps=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrivacyBudgetExceeded, match="site-1 declines DP-SGD round 2"):
        private_round(restarted, model, 2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert restarted.epsilon() == pytest.approx(after_two)


def test_empty_poisson_first_batch_of_dict_samples_keeps_the_batch_structure():
    from opacus.data_loader import DPDataLoader

    from clinfed.privacy.dp_sgd import _seed_empty_batch_structure

    loader = torch.utils.data.DataLoader(synthetic_batch(3, seed=0), batch_size=1)
    dp_loader = DPDataLoader.from_data_loader(loader)
    _seed_empty_batch_structure(dp_loader, loader)
    empty = dp_loader.collate_fn([])  # what Opacus collates when Poisson sampling picks no one
    assert set(empty) == {"image", "label", "ehr", "outcome", "has_outcome"}
    assert empty["image"].shape == (0, 1, *ROI)


def test_empty_poisson_batch_is_a_noise_only_step_in_expanded_weights_mode(tmp_path):
    model = FusionSegNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp = make_dp(tmp_path / "dp.json", grad_sample_mode="ew")
    loader = torch.utils.data.DataLoader(synthetic_batch(N, seed=0), batch_size=BATCH)
    with dp.private_round(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, round_=0) as private:
        private.optimizer.zero_grad(set_to_none=True)
        seg_logits, outcome = private.model(torch.zeros(0, 1, *ROI), torch.zeros(0, EHR_SIZE))
        assert seg_logits.shape == (0, 2, *ROI) and outcome.shape == (0,)
        (seg_logits.sum() + outcome.sum()).backward()
        private.optimizer.step()
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the noise moved it


def test_an_empty_poisson_batch_steps_but_does_not_turn_the_reported_loss_into_nan(tmp_path):
    model = FusionSegNet()
    dp = make_dp(tmp_path / "dp.json", grad_sample_mode="ew")
    loader = torch.utils.data.DataLoader(synthetic_batch(N, seed=0), batch_size=BATCH)
    full = next(iter(loader))
    empty = {"image": torch.zeros(0, 1, *ROI), "label": torch.zeros(0, 1, *ROI), "ehr": torch.zeros(0, EHR_SIZE),
             "outcome": torch.zeros(0), "has_outcome": torch.zeros(0)}
    with dp.private_round(model, torch.optim.Adam(model.parameters(), lr=1e-3), loader, round_=0) as private:
        stats = train_epochs(private.model, [full, empty, full], CONFIG, optimizer=private.optimizer)
    assert stats["steps"] == 3 and math.isfinite(stats["loss"]) and stats["loss"] > 0


def test_expanded_weights_per_sample_gradients_equal_the_hooks_ones():
    from opacus import PrivacyEngine

    torch.manual_seed(3)
    batch = next(iter(torch.utils.data.DataLoader(synthetic_batch(2, seed=5), batch_size=2)))
    reference = FusionSegNet().state_dict()
    per_sample = {}
    for mode, wrap in (("hooks", False), ("ew", True)):
        model = FusionSegNet()
        model.load_state_dict(reference)
        hooked, _, _ = PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            data_loader=torch.utils.data.DataLoader(synthetic_batch(2, seed=5), batch_size=2), noise_multiplier=0.0,
            max_grad_norm=1e9, poisson_sampling=False, grad_sample_mode=mode, wrap_model=wrap)
        seg_logits, outcome = (hooked if wrap else model)(batch["image"], batch["ehr"])
        (torch.nn.functional.cross_entropy(seg_logits, batch["label"][:, 0].long())
         + torch.nn.functional.binary_cross_entropy_with_logits(outcome, batch["outcome"])).backward()
        per_sample[mode] = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()}
    for name, hooks_grad in per_sample["hooks"].items():
        assert torch.allclose(per_sample["ew"][name], hooks_grad, rtol=1e-4, atol=1e-7), name


def _one_patient_private_step(dp: SiteDPSGD, model: torch.nn.Module):
    """One DP step on a batch of one patient: the per-sample row counts the clipping saw and the
    clipped sums (``summed_grad``) per parameter, i.e. that patient's clipped gradient."""
    loader = torch.utils.data.DataLoader(synthetic_batch(N, seed=7), batch_size=dp.batch_size)
    full = next(iter(torch.utils.data.DataLoader(synthetic_batch(1, seed=7), batch_size=1)))
    with dp.private_round(model, torch.optim.SGD(model.parameters(), lr=0.0), loader, round_=0) as private:
        views = private.data_loader.__class__.__name__ == "_AugmentedViews"
        batch = next(iter(type(private.data_loader)([full], dp.augmentation_multiplicity))) if views else full
        private.optimizer.zero_grad(set_to_none=True)
        seg_logits, outcome = private.model(batch["image"], batch["ehr"])
        # A large loss so that every per-sample gradient is far above the clipping bound.
        (1e4 * (torch.nn.functional.cross_entropy(seg_logits, batch["label"][:, 0].long())
                + torch.nn.functional.binary_cross_entropy_with_logits(outcome, batch["outcome"]))).backward()
        optimizer = getattr(private.optimizer, "dp_optimizer", private.optimizer)
        private.optimizer.step()
        rows = {p.grad_sample.shape[0] for p in optimizer.params}
        summed = [p.summed_grad.detach().clone() for p in optimizer.params]
    return rows, summed


def test_training_only_norms_and_head_leaves_every_other_parameter_as_received(tmp_path):
    torch.manual_seed(4)
    model = FusionSegNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dp = make_dp(tmp_path / "dp.json", trainable="norm+head")
    private_round(dp, model, 0)
    trained = set(trainable_parameters(model, "norm+head"))
    assert 0 < sum(p.numel() for n, p in model.named_parameters() if n in trained) < 3000
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and changed <= trained
    assert all(p.requires_grad for p in model.parameters())  # frozen for the round only


def test_augmentation_multiplicity_clips_each_patient_once_not_each_view(tmp_path):
    """With k views a patient's rows are averaged before clipping, so the patient moves the sum by
    exactly C; clipping each view would let one patient move it by up to k x C."""
    torch.manual_seed(5)
    dp = make_dp(tmp_path / "dp.json", augmentation_multiplicity=4, max_grad_norm=0.5, target_epsilon=1e4)
    rows, summed = _one_patient_private_step(dp, FusionSegNet())
    assert rows == {1}  # one patient, not 4 views, reaches the clipping
    assert torch.sqrt(sum((s ** 2).sum() for s in summed)) == pytest.approx(0.5, rel=1e-4)


def test_augmented_views_are_flips_of_the_same_patient_with_their_labels():
    from clinfed.privacy.dp_sgd import _AugmentedViews

    batch = next(iter(torch.utils.data.DataLoader(synthetic_batch(2, seed=1), batch_size=2)))
    views = next(iter(_AugmentedViews([batch], 3)))
    assert views["image"].shape[0] == 6
    assert torch.equal(views["image"][0], batch["image"][0]) and torch.equal(views["image"][3], batch["image"][1])
    assert torch.equal(views["image"][1], batch["image"][0].flip(1))  # (C, X, Y, Z): X flipped
    assert torch.equal(views["label"][2], batch["label"][0].flip(2))  # label flipped with its image
    assert torch.equal(views["ehr"][4], batch["ehr"][1])


def test_per_layer_clipping_bounds_each_tensor_and_the_whole_gradient_by_c(tmp_path):
    torch.manual_seed(6)
    model = FusionSegNet()
    dp = make_dp(tmp_path / "dp.json", clipping="per_layer", max_grad_norm=1.0, target_epsilon=1e4)
    _, summed = _one_patient_private_step(dp, model)
    bound = 1.0 / math.sqrt(len(summed))
    norms = torch.stack([s.norm() for s in summed])
    assert (norms <= bound + 1e-5).all()
    assert (norms > 0.99 * bound).float().mean() > 0.8  # most tensors' gradients were large enough to be clipped
    assert torch.sqrt((norms ** 2).sum()) <= 1.0 + 1e-4


@pytest.mark.parametrize("field, value", [("trainable", "encoder"), ("augmentation_multiplicity", 0),
                                          ("augmentation_multiplicity", 9), ("clipping", "adaptive")])
def test_a_lever_out_of_range_is_refused_naming_it(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        make_dp(tmp_path / "dp.json", **{field: value})


def test_a_parameter_set_that_names_no_parameter_of_the_model_is_refused():
    with pytest.raises(ValueError, match="norm\\+head"):
        trainable_parameters(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.GroupNorm(1, 2)), "norm+head")
