"""The training path shared by the executor and the baselines repeats exactly under one seed:
MONAI's DataLoader seeds the random flip from torch's generator (a plain torch DataLoader would not)."""

from __future__ import annotations

import numpy as np
import torch

from clinfed.data.ingest import Case
from clinfed.training import DEFAULT_EHR_SIZE, TrainConfig, make_loader, new_model, state_to_numpy, train_epochs

ROI = (16, 16, 16)  # the smallest the UNet's four poolings take


def _cases(n: int = 6) -> list[Case]:
    rng = np.random.default_rng(0)
    cases = []
    for i in range(n):
        label = np.zeros(ROI, dtype=np.uint8)
        label[: 4 + i, 4:10, 2:5] = 1  # asymmetric along the flipped axis: a flip shows
        image = (rng.normal(size=ROI) + 3.0 * label).astype(np.float32)
        cases.append(Case(f"p-{i:032x}", image, label, (1.0, 1.0, 1.0),
                          rng.normal(size=DEFAULT_EHR_SIZE).astype(np.float32), i % 2))
    return cases


def _train(seed: int) -> dict[str, np.ndarray]:
    config = TrainConfig(epochs=2, batch_size=2, roi=ROI)
    torch.manual_seed(seed)
    model = new_model()
    train_epochs(model, make_loader(_cases(), config, train=True), config)
    return state_to_numpy(model)


def test_same_seed_same_model_and_another_seed_another():
    first, again, other = _train(1), _train(1), _train(2)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)


def test_the_random_flip_follows_the_torch_seed():
    config = TrainConfig(epochs=1, batch_size=1, roi=ROI)

    def first_label(seed: int) -> torch.Tensor:  # one case: only the flip is random
        torch.manual_seed(seed)
        return next(iter(make_loader(_cases(1), config, train=True)))["label"]

    draws = [first_label(seed) for seed in range(8)]
    assert all(torch.equal(draws[seed], first_label(seed)) for seed in range(8))
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # flipped for some seeds, not for others
