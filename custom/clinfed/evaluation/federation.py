"""FedAvg in one process, with the product's own training code, for experiments that need many
models: a membership-inference audit trains dozens, the DP utility benchmark hundreds.

Each round does what ``SegExecutor`` and ``WeightedFedAvg`` do in a FLARE job: every site loads
the global weights, trains ``local_epochs`` with a fresh optimiser (under ``SiteDPSGD`` when the
recipe is private, with the same budget planning), and the global model moves by the
``n_samples``-weighted mean of the sites' differences. What it leaves out is the transport:
FLARE's simulator costs about 20 s to start a job, which a grid of hundreds of runs cannot pay.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch

from clinfed.data.ingest import Case
from clinfed.data.profiles import STUDY_ID
from clinfed.data.study import load_study
from clinfed.privacy.dp_sgd import SiteDPSGD
from clinfed.training import (DEFAULT_BATCH_SIZE, DEFAULT_LOCAL_EPOCHS, DEFAULT_LR, DEFAULT_ROI, TrainConfig,
                              load_numpy_state, make_loader, new_model, state_to_numpy, train_epochs)

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class Recipe:
    """How a federation trains: the executor's settings plus DP-SGD's (``dp_epsilon=None``: no DP).

    ``dp_*`` fields are ``SiteDPSGD``'s arguments of the same names; ``optimizer`` is ``adam`` (the
    executor's, DP-Adam under DP) or ``sgd`` (momentum 0.9). ``study`` gives the training spacing,
    intensity normalisation and EHR size (``roi`` overrides the study's patch size)."""

    rounds: int = 4
    local_epochs: int = DEFAULT_LOCAL_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    roi: tuple[int, int, int] = DEFAULT_ROI
    optimizer: str = "adam"
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_max_grad_norm: float = 1.0
    dp_trainable: str = "all"
    dp_augmentation_multiplicity: int = 1
    dp_clipping: str = "flat"
    dp_accountant: str = "prv"
    study: str = STUDY_ID

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.rounds < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("rounds, local_epochs and batch_size must all be >= 1")
        if len(self.roi) != 3 or any(s < 16 or s % 16 for s in self.roi):
            raise ValueError(f"roi must be three sizes divisible by 16 (the UNet pools four times), got {self.roi}")

    @property
    def private(self) -> bool:
        return self.dp_epsilon is not None and self.dp_epsilon != float("inf")

    def train_config(self, epochs: int | None = None) -> TrainConfig:
        """The study's TrainConfig with this recipe's epochs (``local_epochs`` unless given), batch, lr and ROI."""
        return TrainConfig.for_study(load_study(self.study), epochs=epochs or self.local_epochs,
                                     batch_size=self.batch_size, lr=self.lr, roi=self.roi)

    def describe(self) -> dict:
        return asdict(self)


class Federated(NamedTuple):
    model: torch.nn.Module
    epsilon: dict[str, float]  # DP-SGD epsilon each site spent (empty without DP)


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=recipe.lr)


def train_federated(site_cases: Mapping[str, Sequence[Case]], recipe: Recipe, *, seed: int,
                    initial: Mapping[str, np.ndarray] | None = None, privacy_dir: Path | None = None,
                    on_round=None) -> Federated:
    """The global model after ``recipe.rounds`` FedAvg rounds over ``site_cases``.

    Args:
        site_cases: each site's training cases (a site with none is refused).
        seed: seeds the initial model (unless ``initial`` is given), the flips and Poisson sampling.
        initial: starting weights (a pretrained model); default: ``new_model()`` under ``seed``.
        privacy_dir: where each site's DP-SGD budget file goes (default: a temporary folder).
        on_round: called as ``on_round(round, model)`` after each round (for per-round curves).
    """
    empty = [site for site, cases in site_cases.items() if not cases]
    if empty:
        raise ValueError(f"sites without training cases: {', '.join(empty)}")
    config = recipe.train_config()
    torch.manual_seed(seed)
    model = new_model(config.ehr_size)
    if initial is not None:
        load_numpy_state(model, dict(initial))
    loaders = {site: make_loader(list(cases), config, train=True) for site, cases in site_cases.items()}
    with tempfile.TemporaryDirectory() as tmp:
        budget_dir = Path(privacy_dir or tmp)
        dps = {site: SiteDPSGD(
            budget_file=budget_dir / f"{site}.dp_sgd.json", n_samples=len(site_cases[site]),
            batch_size=recipe.batch_size, num_rounds=recipe.rounds, local_epochs=recipe.local_epochs,
            target_epsilon=recipe.dp_epsilon, target_delta=recipe.dp_delta, max_grad_norm=recipe.dp_max_grad_norm,
            accountant=recipe.dp_accountant, trainable=recipe.dp_trainable,
            augmentation_multiplicity=recipe.dp_augmentation_multiplicity, clipping=recipe.dp_clipping,
            job_id=f"simulation-{seed}", site=site, study="simulation") for site in loaders} if recipe.private else {}
        global_state = state_to_numpy(model)
        for round_ in range(recipe.rounds):
            total, weight = {k: np.zeros_like(v, dtype=np.float64) for k, v in global_state.items()}, 0
            for site, loader in loaders.items():
                load_numpy_state(model, global_state)
                model.train()
                optimizer = make_optimizer(model, recipe)
                if site in dps:
                    with dps[site].private_round(model, optimizer, loader, round_=round_) as private:
                        train_epochs(private.model, private.data_loader, config, optimizer=private.optimizer)
                else:
                    train_epochs(model, loader, config, optimizer=optimizer)
                n = len(site_cases[site])
                for k, v in state_to_numpy(model).items():
                    total[k] += (v - global_state[k]) * n
                weight += n
            global_state = {k: (global_state[k] + total[k] / weight).astype(np.float32) for k in global_state}
            load_numpy_state(model, global_state)
            if on_round is not None:
                on_round(round_, model)
        return Federated(model, {site: dp.epsilon() for site, dp in dps.items()})


def train_central(cases: Sequence[Case], recipe: Recipe, *, epochs: int, seed: int,
                  initial: Mapping[str, np.ndarray] | None = None) -> torch.nn.Module:
    """A non-private model trained on pooled ``cases`` for ``epochs`` (the centralised baseline, and
    pretraining on a public set), with the recipe's batch size, learning rate, ROI and optimiser."""
    if not cases:
        raise ValueError("no cases to train on")
    config = recipe.train_config(epochs)
    torch.manual_seed(seed)
    model = new_model(config.ehr_size)
    if initial is not None:
        load_numpy_state(model, dict(initial))
    train_epochs(model, make_loader(list(cases), config, train=True), config, optimizer=make_optimizer(model, recipe))
    return model
