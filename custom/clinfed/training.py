"""Training and evaluation of the fusion model on a site's cases, shared by the FLARE executor
and the centralised / local-only baselines, so all three train and score the same way.

Data preparation follows MONAI's pipelines, with the study definition's imaging settings:

- ``Orientationd`` to RAS and ``Spacingd`` to the study's spacing (bilinear image, nearest label);
- intensity per modality: CT by the study's HU window scaled to [0, 1], MR by a z-score over
  the non-zero voxels;
- training on ROI patches drawn with positive/negative balance (``RandCropByPosNegLabeld``, one
  patch per patient per step: the DP unit stays the patient) and a random flip;
- evaluation by sliding-window inference over the whole resampled volume; Dice is computed
  there, at the study's spacing (not at native resolution).

A patient with several cases (``studies_per_patient: all``) is one item: each time it is drawn,
one of its cases is, so a patient never contributes more than one case to a (DP-SGD) sample.
A case without an outcome trains segmentation only: its outcome loss is masked.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, MetaTensor
from monai.data.utils import set_rnd
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from sklearn.metrics import roc_auc_score

from clinfed.data.ingest import Case
from clinfed.errors import ClinfedError
from clinfed.models.fusion_seg import FusionSegNet

# Defaults of the committed jobs, the executor and the demo (one place; the rounds are
# tumour_seg.DEFAULT_ROUNDS). Two local epochs a round, 16 rounds: on the demo's sites, over three
# seeds each (benchmarks/quality.py), federated / centralised Dice was 0.92 at 4 rounds x 4 epochs,
# 0.91 at 8 x 4 and 0.94 at 16 x 2, the last with overlapping intervals and federated above every
# local-only model in every seed (averaging more often is the usual remedy when sites differ
# this much: client drift).
DEFAULT_ROI = (32, 32, 16)
DEFAULT_SPACING = (1.0, 1.0, 1.0)
DEFAULT_BATCH_SIZE = 2
DEFAULT_LR = 2e-3
DEFAULT_LOCAL_EPOCHS = 2
DEFAULT_EHR_SIZE = 12  # the liver study's 6 features and their missing-indicators
VALIDATION_SHARE = 0.25


class NonFiniteInput(ClinfedError):
    """A case would put NaN or infinity into the model: refused naming the case."""


@dataclass(frozen=True)
class TrainConfig:
    """What one call of ``train_epochs`` does. Same values for federated and baselines."""

    epochs: int = 1
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    outcome_weight: float = 0.5
    roi: tuple[int, int, int] = DEFAULT_ROI
    spacing: tuple[float, float, float] = DEFAULT_SPACING
    ct_window: tuple[float, float] = (-50.0, 150.0)
    mr_nonzero: bool = True
    ehr_size: int = DEFAULT_EHR_SIZE

    @classmethod
    def for_study(cls, study, **overrides) -> "TrainConfig":
        """The imaging settings of a ``StudyDefinition``, plus any overrides (epochs, lr...)."""
        values = dict(roi=study.imaging.roi, spacing=study.imaging.spacing_mm,
                      ct_window=study.imaging.intensity.ct_window, mr_nonzero=study.imaging.intensity.mr_zscore_nonzero,
                      ehr_size=study.ehr_size)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def is_validation(pseudonym: str) -> bool:
    """Fixed hold-out by pseudonym hash: a patient is always on the same side of the split."""
    return int(hashlib.sha256(pseudonym.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < VALIDATION_SHARE


def split_cases(cases: list[Case]) -> tuple[list[Case], list[Case]]:
    train = [c for c in cases if not is_validation(c.pseudonym)]
    val = [c for c in cases if is_validation(c.pseudonym)]
    return train, val


def _prepare(config: TrainConfig, *, train: bool) -> Compose:
    """Deterministic steps, cached once per case: geometry, intensity, padding, and for training
    the fg/bg indices the patch sampler draws from.

    The cache holds plain tensors on the training device: on a GPU the host then neither copies
    nor transforms volumes each step, and no MetaTensor reaches the model (its per-layer
    metadata dispatch cost about a third of GPU throughput; benchmarks/train_throughput.py).
    The fg/bg voxel indices stay on the host, so drawing a patch centre needs no device sync.
    """
    ct_low, ct_high = config.ct_window
    return Compose([
        Orientationd(keys=("image", "label"), axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=("image", "label"), pixdim=config.spacing, mode=("bilinear", "nearest")),
        _PerModalityIntensity(ct_low, ct_high, config.mr_nonzero),
        SpatialPadd(keys=("image", "label"), spatial_size=config.roi),
        *([FgBgToIndicesd(keys="label", fg_postfix="_fg", bg_postfix="_bg")] if train else []),
        EnsureTyped(keys=("image", "label", "ehr", "outcome", "has_outcome"), device=device_for_training(),
                    track_meta=False),
        _AssertFinite(),
        # Only tensors go on: Opacus's collation (DP-SGD) accepts nothing else.
        DeleteItemsd(keys=("modality", "case_id")),
    ])


class _PerModalityIntensity:
    """CT: HU window scaled to [0, 1]; MR: z-score over non-zero voxels (a case's ``modality``)."""

    def __init__(self, ct_low: float, ct_high: float, mr_nonzero: bool):
        self.ct = ScaleIntensityRanged(keys="image", a_min=ct_low, a_max=ct_high, b_min=0.0, b_max=1.0, clip=True)
        self.mr = NormalizeIntensityd(keys="image", nonzero=mr_nonzero)

    def __call__(self, item: dict) -> dict:
        return (self.ct if item["modality"] == "CT" else self.mr)(item)


class _AssertFinite:
    """The model's input is checked once, when a case enters the cache (no per-step sync)."""

    def __call__(self, item: dict) -> dict:
        for key in ("image", "ehr"):
            if not bool(torch.isfinite(item[key]).all()):
                raise NonFiniteInput(f"case {item['case_id']}: its {key} holds NaN or infinite values after "
                                     "preparation; it must not reach the model")
        return item


def _random(config: TrainConfig) -> Compose:
    return Compose([
        RandCropByPosNegLabeld(keys=("image", "label"), label_key="label", spatial_size=config.roi, pos=1, neg=1,
                               num_samples=1, fg_indices_key="label_fg", bg_indices_key="label_bg"),
        RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=0),
        EnsureTyped(keys=("image", "label"), track_meta=False),
    ])


def _items(cases: list[Case]) -> list[dict]:
    items = []
    for c in cases:
        if not np.all(np.isfinite(c.ehr)) or not np.all(np.isfinite(c.image)):
            raise NonFiniteInput(f"case {c.case_id}: its image or EHR vector holds NaN or infinite values; "
                                 "it must not reach the model")
        affine = c.affine if c.affine is not None else np.diag([*c.spacing, 1.0])
        items.append({
            "image": MetaTensor(torch.from_numpy(np.ascontiguousarray(c.image, dtype=np.float32))[None], affine=affine),
            "label": MetaTensor(torch.from_numpy(c.label.astype(np.float32))[None], affine=affine),
            "ehr": c.ehr.astype(np.float32), "outcome": np.float32(c.outcome or 0),
            "has_outcome": np.float32(c.outcome is not None), "modality": c.modality, "case_id": c.case_id,
        })
    return items


class PatientDataset(torch.utils.data.Dataset):
    """One item per patient; drawing it draws one of the patient's cases (a random patch of it)."""

    def __init__(self, cases: list[Case], config: TrainConfig):
        steps = Compose([*_prepare(config, train=True).transforms, *_random(config).transforms])
        self.cache = CacheDataset(_items(cases), transform=steps, progress=False, num_workers=0)
        patients: dict[str, list[int]] = {}
        for i, case in enumerate(cases):
            patients.setdefault(case.pseudonym, []).append(i)
        self.groups = list(patients.values())
        self.R = np.random.RandomState()

    def set_random_state(self, seed: int) -> None:
        self.R = np.random.RandomState(seed)
        set_rnd(self.cache, seed + 1)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int):
        group = self.groups[index]
        return self.cache[group[self.R.randint(len(group))] if len(group) > 1 else group[0]]


def make_loader(cases: list[Case], config: TrainConfig, *, train: bool) -> DataLoader:
    """Training: patients (one random patch of one of their cases per draw). Evaluation: every
    case whole, one at a time (volumes differ in size after resampling)."""
    if train:
        return DataLoader(PatientDataset(cases, config), batch_size=config.batch_size, shuffle=True, num_workers=0)
    dataset = CacheDataset(_items(cases), transform=_prepare(config, train=False), progress=False, num_workers=0)
    return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)


def new_model(ehr_size: int = DEFAULT_EHR_SIZE) -> FusionSegNet:
    return FusionSegNet(ehr_features=ehr_size)


def device_for_training() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_epochs(model: torch.nn.Module, loader: DataLoader, config: TrainConfig,
                 optimizer: torch.optim.Optimizer | None = None, should_abort=lambda: False) -> dict:
    """Local epochs of Dice+CE segmentation loss plus weighted outcome BCE (masked where a case
    has no outcome). Returns loss stats."""
    device = next(model.parameters()).device
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=config.lr)
    seg_loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    outcome_loss = torch.nn.BCEWithLogitsLoss(reduction="none")
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
            has_outcome = batch["has_outcome"].to(device)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                seg_logits, outcome_logit = model(image, ehr)
                # Mean over the batch (Opacus's loss reduction), cases without outcome count 0.
                masked = (outcome_loss(outcome_logit.float(), outcome) * has_outcome).sum() / max(image.shape[0], 1)
                loss = seg_loss(seg_logits.float(), label) + config.outcome_weight * masked
            loss.backward()
            optimizer.step()
            steps += 1
            if image.shape[0]:  # an empty Poisson batch (DP-SGD) takes a noise-only step and has no loss
                total += loss.detach()
                scored += 1
    return {"loss": float(total) / max(scored, 1), "steps": steps, "aborted": False}


OUTCOME_VARIANTS = ("fused", "ehr_zeroed", "image_zeroed")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, config: TrainConfig | None = None,
             per_case: bool = False) -> dict:
    """Mean Dice of the tumour class (MONAI DiceMetric, sliding-window inference at the study's
    spacing) and outcome ROC AUC over the cases that have an outcome.

    ``per_case``: also each case's Dice (``case_dice``), and for the cases with an outcome their
    outcome (``outcomes``) and the head's probability (``outcome_scores``) for each of
    ``OUTCOME_VARIANTS``: the model as trained, with the EHR vector zeroed, and with the image
    embedding zeroed (what each input adds), with their AUCs (``auc_<variant>``)."""
    config = config or TrainConfig()
    device = next(model.parameters()).device
    model.eval()
    dice = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    scores = {variant: [] for variant in OUTCOME_VARIANTS}
    outcomes = []
    n = 0
    for batch in loader:
        image, label = batch["image"].to(device), batch["label"].to(device)
        ehr = batch["ehr"].to(device)
        seg_logits = sliding_window_inference(
            image, config.roi, sw_batch_size=4, overlap=0.25,
            predictor=lambda x: model(x, ehr.expand(x.shape[0], -1))[0])
        prediction = torch.nn.functional.one_hot(seg_logits.argmax(1), 2).permute(0, 4, 1, 2, 3)
        target = torch.nn.functional.one_hot(label[:, 0].long(), 2).permute(0, 4, 1, 2, 3)
        dice(y_pred=prediction, y=target)
        if float(batch["has_outcome"][0]):
            # The outcome head sees the ROI patch centred on the predicted lesion, as in training's
            # positive patches (the volume's centre when nothing is predicted).
            patch = _patch_around(image, seg_logits.argmax(1)[0], config.roi)
            variants = {"fused": model(patch, ehr)[1]}
            if per_case:
                variants["ehr_zeroed"] = model(patch, torch.zeros_like(ehr))[1]
                variants["image_zeroed"] = model(patch, ehr, zero_image=True)[1]
            for variant, logit in variants.items():
                scores[variant].append(float(torch.sigmoid(logit.float())[0]))
            outcomes.append(float(batch["outcome"][0]))
        n += image.shape[0]
    mean_dice = float(dice.aggregate().item()) if n else float("nan")
    result = {"dice": mean_dice, "auc": _auc(outcomes, scores["fused"]), "n": n}
    if per_case:
        result["case_dice"] = [float(v) for v in dice.get_buffer()[:, 0]] if n else []
        result["outcomes"] = outcomes
        result["outcome_scores"] = scores
        result.update({f"auc_{variant}": _auc(outcomes, scores[variant]) for variant in OUTCOME_VARIANTS})
    return result


def _auc(outcomes: list[float], scores: list[float]) -> float:
    return float(roc_auc_score(outcomes, scores)) if len(set(outcomes)) == 2 else float("nan")


def _patch_around(image: torch.Tensor, mask: torch.Tensor, roi: tuple[int, int, int]) -> torch.Tensor:
    shape = image.shape[2:]
    found = torch.nonzero(mask)
    centre = found.float().mean(0).round().long().tolist() if len(found) else [s // 2 for s in shape]
    starts = [min(max(c - r // 2, 0), s - r) for c, r, s in zip(centre, roi, shape)]
    return image[:, :, starts[0]:starts[0] + roi[0], starts[1]:starts[1] + roi[1], starts[2]:starts[2] + roi[2]]


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (e.g. AUC with one class) is written as null."""
    return None if value is None or math.isnan(value) else float(value)


def state_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_state(model: torch.nn.Module, params: dict[str, np.ndarray]) -> None:
    state = {k: torch.as_tensor(np.asarray(v)) for k, v in params.items()}
    model.load_state_dict(state, strict=True)
