"""Shared fixtures: FusionSegNet-shaped updates of three sites, their masking keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from privacy_helpers import ROI, SITES, synthetic_batch

from clinfed.models.fusion_seg import FusionSegNet
from clinfed.privacy.masking import generate_private_key_file, write_key_directory


@pytest.fixture(scope="session")
def fusion_updates() -> dict[str, dict[str, np.ndarray]]:
    """Real FusionSegNet weight differences: each site takes an Adam step on its own data."""
    from clinfed.training import TrainConfig, train_epochs

    torch.manual_seed(0)
    start = FusionSegNet()
    initial = {k: v.detach().clone() for k, v in start.state_dict().items()}
    updates = {}
    for i, site in enumerate(SITES):
        model = FusionSegNet()
        model.load_state_dict(initial)
        loader = torch.utils.data.DataLoader(synthetic_batch(2, seed=i), batch_size=2)
        train_epochs(model, loader, TrainConfig(epochs=1, batch_size=2, lr=3e-3, roi=ROI))
        updates[site] = {k: (v.detach() - initial[k]).numpy().astype(np.float32) for k, v in model.state_dict().items()}
    return updates


@pytest.fixture
def site_keys(tmp_path):
    """Each site's private key file and the shared key directory file."""
    private = {site: tmp_path / f"{site}.pem" for site in SITES}
    public = {site: generate_private_key_file(path) for site, path in private.items()}
    directory = tmp_path / "site_keys.json"
    write_key_directory(directory, public)
    return private, directory
