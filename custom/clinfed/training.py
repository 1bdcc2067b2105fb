"""Training and evaluation of the fusion model on a site's cases, shared by the FLARE executor
and the centralised / local-only baselines, so all three train and score the same way.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, NormalizeIntensityd, RandFlipd, Resized
from sklearn.metrics import roc_auc_score

from clinfed.data.ingest import Case
from clinfed.models.fusion_seg import FusionSegNet

# Defaults of the committed jobs, the executor and the demo (one place). Four local epochs per
# round: on the demo data, 4 rounds x 4 epochs reached 1.00 x central Dice where 8 x 2 reached
# 0.92 x with the same epoch budget (benchmarks/quality.py, three seeds each).
DEFAULT_ROI = (32, 32, 16)
DEFAULT_BATCH_SIZE = 2
DEFAULT_LR = 2e-3
DEFAULT_LOCAL_EPOCHS = 4
VALIDATION_SHARE = 0.25


@dataclass(frozen=True)
class TrainConfig:
    """What one call of ``train_epochs`` does. Same values for federated and baselines."""

    epochs: int = 1
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    outcome_weight: float = 0.5
    roi: tuple[int, int, int] = DEFAULT_ROI


def is_validation(pseudonym: str) -> bool:
    """Fixed hold-out by pseudonym hash: a patient is always on the same side of the split."""
    return int(hashlib.sha256(pseudonym.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < VALIDATION_SHARE


def split_cases(cases: list[Case]) -> tuple[list[Case], list[Case]]:
    train = [c for c in cases if not is_validation(c.pseudonym)]
    val = [c for c in cases if is_validation(c.pseudonym)]
    return train, val


def _transforms(roi: tuple[int, int, int], augment: bool) -> Compose:
    # The cache holds plain tensors on the training device: on a GPU the host then neither copies
    # nor flips volumes each step, and no MetaTensor reaches the model (its per-layer metadata
    # dispatch cost about a third of GPU throughput; benchmarks/train_throughput.py). No spatial
    # metadata is needed after resizing. GPU memory: about 2 x 4 bytes per ROI voxel per patient.
    steps = [
        EnsureChannelFirstd(keys=("image", "label"), channel_dim="no_channel"),
        NormalizeIntensityd(keys="image"),  # per-volume z-score: removes scanner scale differences
        Resized(keys="image", spatial_size=roi, mode="trilinear"),
        Resized(keys="label", spatial_size=roi, mode="nearest"),
        EnsureTyped(keys=("image", "label", "ehr", "outcome"), device=device_for_training(), track_meta=False),
    ]
    if augment:
        steps += [RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=0),
                  EnsureTyped(keys=("image", "label"), track_meta=False)]
    return Compose(steps)


def make_loader(cases: list[Case], config: TrainConfig, *, train: bool) -> DataLoader:
    items = [{"image": c.image, "label": c.label.astype(np.float32), "ehr": c.ehr,
              "outcome": np.float32(c.outcome)} for c in cases]
    # Cache the deterministic part; the random flip runs per epoch.
    dataset = CacheDataset(items, transform=_transforms(config.roi, augment=train), progress=False, num_workers=0)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=train, num_workers=0)


def new_model() -> FusionSegNet:
    return FusionSegNet()


def device_for_training() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_epochs(model: torch.nn.Module, loader: DataLoader, config: TrainConfig,
                 optimizer: torch.optim.Optimizer | None = None, should_abort=lambda: False) -> dict:
    """Local epochs of Dice+CE segmentation loss plus weighted outcome BCE. Returns loss stats."""
    device = next(model.parameters()).device
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=config.lr)
    seg_loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    outcome_loss = torch.nn.BCEWithLogitsLoss()
    use_amp = device.type == "cuda"
    model.train()
    # The loss sum stays on the device: reading it every step would make the GPU wait for the host.
    total, steps, scored = torch.zeros((), device=device), 0, 0
    for _ in range(config.epochs):
        for batch in loader:
            if should_abort():
                return {"loss": float(total) / max(scored, 1), "steps": steps, "aborted": True}
            image, label = batch["image"].to(device), batch["label"].to(device)
            ehr, outcome = batch["ehr"].to(device), batch["outcome"].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                seg_logits, outcome_logit = model(image, ehr)
                loss = seg_loss(seg_logits.float(), label) + config.outcome_weight * outcome_loss(
                    outcome_logit.float(), outcome)
            loss.backward()
            optimizer.step()
            steps += 1
            if image.shape[0]:  # an empty Poisson batch (DP-SGD) takes a noise-only step and has no loss
                total += loss.detach()
                scored += 1
    return {"loss": float(total) / max(scored, 1), "steps": steps, "aborted": False}


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader) -> dict:
    """Mean Dice of the tumour class (MONAI DiceMetric) and outcome ROC AUC on ``loader``."""
    device = next(model.parameters()).device
    model.eval()
    dice = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    scores, outcomes = [], []
    n = 0
    for batch in loader:
        image, label = batch["image"].to(device), batch["label"].to(device)
        seg_logits, outcome_logit = model(image, batch["ehr"].to(device))
        prediction = torch.nn.functional.one_hot(seg_logits.argmax(1), 2).permute(0, 4, 1, 2, 3)
        target = torch.nn.functional.one_hot(label[:, 0].long(), 2).permute(0, 4, 1, 2, 3)
        dice(y_pred=prediction, y=target)
        scores.extend(torch.sigmoid(outcome_logit.float()).cpu().tolist())
        outcomes.extend(batch["outcome"].tolist())
        n += image.shape[0]
    mean_dice = float(dice.aggregate().item()) if n else float("nan")
    auc = float(roc_auc_score(outcomes, scores)) if len(set(outcomes)) == 2 else float("nan")
    return {"dice": mean_dice, "auc": auc, "n": n}


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (e.g. AUC with one class) is written as null."""
    return None if value is None or math.isnan(value) else float(value)


def state_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: torch.nn.Module, params: dict[str, np.ndarray]) -> None:
    state = {k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}
    model.load_state_dict(state, strict=True)
