"""Membership-inference audit: can someone holding a global model tell a site's training patients
from the same site's held-out patients?

Two attacks, both on the product's model and loss:

- **loss threshold** (Yeom et al. 2018): a patient whose loss under the model is low was probably
  trained on. Score: minus the training loss (Dice + CE + outcome BCE) of the case.
- **LiRA** (Carlini et al. 2022, "Membership inference attacks from first principles"): for each
  patient, fit Gaussians to the model's logit-scaled confidence on that patient under shadow models
  trained with it (IN) and without it (OUT), and score the target model's confidence by the
  likelihood ratio (online LiRA), or by how far it sits above the OUT fit alone (offline LiRA).
  Confidences are taken on two views (as sampled and flipped, the training augmentation) and for
  three signals per view: the outcome head's logit on the true grade, and the segmentation's mean
  logit margin on the true class over the tumour and over the whole volume. Variances are pooled
  over patients (Carlini's "fixed variance", the better choice with few shadow models).

Protocol (Carlini's): ``n_models`` federations are trained with the product's code
(:mod:`clinfed.evaluation.federation`), each on a random half of every site's pool of patients;
each model in turn is the target and the others are its shadows, so every patient is judged
``n_models`` times, as a member about half of the time. A given model (a FLARE job's final global
model) can be attacked too: its members are the site's training split, the rest of the site's
patients its non-members, and the in-process models its shadows.

Reported for each attack: ROC AUC, advantage (max over thresholds of TPR - FPR), TPR at 1% FPR,
each with a 95% bootstrap interval that resamples patients (a patient's decisions under all
models stay together), and the advantage's chance level: its mean when membership labels are
permuted within each target model. With few decisions the best threshold finds a gap even in
noise (about 0.87 x sqrt(1/n_in + 1/n_out)), so ``advantage_over_chance`` (advantage minus that
mean) is the figure to compare with 0.

Written here rather than taken from a library: privacy-meter 1.0.1 (PyPI's latest) imports
TensorFlow at load and has the old reference-model API, without LiRA; LeakPro is not on PyPI; the
Adversarial Robustness Toolbox (1.20) has no LiRA and scores classifiers by class-probability
vectors, not a 3D segmentation model by its own loss; tensorflow-privacy has LiRA scoring but
brings TensorFlow into a PyTorch project for about forty lines of arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from scipy.stats import norm
from sklearn.metrics import roc_auc_score, roc_curve

from clinfed.data.ingest import Case, ingest_site
from clinfed.data.profiles import STUDY_ID
from clinfed.errors import ClinfedError
from clinfed.evaluation.federation import Recipe, train_federated
from clinfed.training import TrainConfig, _patch_around, load_numpy_state, make_loader, new_model, split_cases

ATTACKS = ("loss_threshold", "lira_online", "lira_offline")
# Views the signals are read on: as sampled, and flipped like the training augmentation (RandFlipd, axis 0).
VIEWS = ((), (2,))
SIGNALS = ("outcome_logit", "tumour_margin", "volume_margin")
LOW_FPR = 0.01


class AuditInputError(ClinfedError):
    """The audit's data folder, target site or model file cannot be used; the message says which."""


@dataclass(frozen=True)
class CaseSignals:
    """What one model shows about each of a list of cases."""

    loss: np.ndarray  # (n,) the training loss of each case
    confidence: np.ndarray  # (n, len(VIEWS) * len(SIGNALS)) logit-scaled confidences, higher = fits better


@torch.no_grad()
def case_signals(model: torch.nn.Module, cases: Sequence[Case], config: TrainConfig) -> CaseSignals:
    """The model's loss and logit-scaled confidences on ``cases`` (no augmentation but the views),
    each case whole at the study's spacing: the segmentation by sliding windows of ``config.roi``,
    the outcome head on the ROI patch around the case's lesion (where training's positive patches sit)."""
    model.eval()
    device = next(model.parameters()).device
    seg_loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    losses, confidences = [], []
    for batch in make_loader(list(cases), config, train=False):
        image, label = batch["image"].to(device), batch["label"].to(device)
        ehr, outcome = batch["ehr"].to(device), batch["outcome"].to(device)
        patch = _patch_around(image, label[0, 0], config.roi)
        per_view = []
        for dims in VIEWS:
            view = image.flip(dims) if dims else image
            seg_logits = sliding_window_inference(view, config.roi, sw_batch_size=4, overlap=0.25,
                                                  predictor=lambda x: model(x, ehr.expand(x.shape[0], -1))[0])
            seg_logits = seg_logits.flip(dims) if dims else seg_logits
            _, outcome_logit = model(patch.flip(dims) if dims else patch, ehr)
            sign = 2.0 * label[:, 0] - 1.0  # +1 on tumour voxels, -1 elsewhere
            margin = sign * (seg_logits[:, 1] - seg_logits[:, 0])
            tumour = label[:, 0]
            per_view += [(2.0 * outcome - 1.0) * outcome_logit,
                         (margin * tumour).sum(dim=(1, 2, 3)) / tumour.sum(dim=(1, 2, 3)).clamp(min=1.0),
                         margin.mean(dim=(1, 2, 3))]
            if not dims:
                bce = torch.nn.functional.binary_cross_entropy_with_logits(outcome_logit, outcome)
                losses.append(float(seg_loss(seg_logits, label) + config.outcome_weight * bce))
        confidences.append(torch.stack(per_view, dim=1).cpu().numpy())
    return CaseSignals(np.asarray(losses), np.concatenate(confidences).astype(np.float64))


def lira_scores(target: np.ndarray, shadows: np.ndarray, shadow_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Online and offline LiRA scores of each case (higher: more likely a member).

    Args:
        target: (n, f) the target model's confidences.
        shadows: (s, n, f) the shadow models' confidences on the same cases.
        shadow_member: (s, n) whether each shadow trained on each case.
    """
    inside = shadow_member[:, :, None]
    count_in = inside.sum(axis=0)
    count_out = (~inside).sum(axis=0)
    mean_in = np.where(inside, shadows, 0.0).sum(axis=0) / np.maximum(count_in, 1)
    mean_out = np.where(~inside, shadows, 0.0).sum(axis=0) / np.maximum(count_out, 1)
    # Fixed (pooled) variance per signal: residuals of every shadow around its case's IN or OUT mean.
    residual = np.where(inside, shadows - mean_in, shadows - mean_out)
    sd_in = np.sqrt((np.where(inside, residual, 0.0) ** 2).sum(axis=(0, 1)) / max(inside.sum() - 1, 1)) + 1e-6
    sd_out = np.sqrt((np.where(~inside, residual, 0.0) ** 2).sum(axis=(0, 1)) / max((~inside).sum() - 1, 1)) + 1e-6
    offline = norm.logcdf((target - mean_out) / sd_out).sum(axis=1)
    online = (norm.logpdf(target, mean_in, sd_in) - norm.logpdf(target, mean_out, sd_out)).sum(axis=1)
    # A case no shadow trained on (or none left out) has no IN (OUT) fit: its offline score stands in.
    missing = (count_in[:, 0] == 0) | (count_out[:, 0] == 0)
    return np.where(missing, offline, online), offline


def _roc_figures(scores: np.ndarray, member: np.ndarray) -> tuple[float, float, float]:
    fpr, tpr, _ = roc_curve(member, scores, drop_intermediate=False)
    low = tpr[fpr <= LOW_FPR]
    return float(roc_auc_score(member, scores)), float(np.max(tpr - fpr)), float(low.max() if low.size else 0.0)


def attack_figures(scores: np.ndarray, member: np.ndarray, patient: np.ndarray, target_model: np.ndarray, *,
                   rng: np.random.Generator, n_bootstrap: int = 500, n_permutations: int = 200) -> dict:
    """AUC, advantage and TPR at 1% FPR of one attack's decisions, with 95% intervals over patients,
    and the advantage's chance level (mean under permuted labels within each target model)."""
    member = member.astype(bool)
    auc, advantage, tpr_low = _roc_figures(scores, member)
    by_patient = [np.flatnonzero(patient == p) for p in np.unique(patient)]
    draws = []
    for _ in range(n_bootstrap):
        rows = np.concatenate([by_patient[i] for i in rng.integers(len(by_patient), size=len(by_patient))])
        if member[rows].all() or not member[rows].any():
            continue
        draws.append(_roc_figures(scores[rows], member[rows]))
    # Basic (reverse percentile) intervals: a resample repeats patients, which the best threshold
    # exploits, so resampled advantages sit above the estimate; reflecting corrects that bias.
    q_low, q_high = np.percentile(np.asarray(draws), [2.5, 97.5], axis=0)
    point = np.array([auc, advantage, tpr_low])
    low, high = np.clip(2 * point - q_high, 0.0, 1.0), np.clip(2 * point - q_low, 0.0, 1.0)
    chance = []
    groups = [np.flatnonzero(target_model == m) for m in np.unique(target_model)]
    for _ in range(n_permutations):
        permuted = member.copy()
        for rows in groups:
            permuted[rows] = rng.permutation(member[rows])
        fpr, tpr, _ = roc_curve(permuted, scores, drop_intermediate=False)
        chance.append(float(np.max(tpr - fpr)))
    chance_mean = float(np.mean(chance))
    return {"auc": auc, "auc_ci95": [float(low[0]), float(high[0])],
            "advantage": advantage, "advantage_ci95": [float(low[1]), float(high[1])],
            "advantage_chance": chance_mean, "advantage_chance_p95": float(np.percentile(chance, 95)),
            "advantage_over_chance": advantage - chance_mean,
            "advantage_over_chance_ci95": [float(low[1]) - chance_mean, float(high[1]) - chance_mean],
            "p_value": float((1 + sum(c >= advantage for c in chance)) / (1 + len(chance))),
            "tpr_at_1pct_fpr": tpr_low, "tpr_at_1pct_fpr_ci95": [float(low[2]), float(high[2])],
            "decisions": int(member.size), "members": int(member.sum())}


@dataclass
class TrainedPool:
    """Models trained on random halves of the sites' pools, with what they show about the target site."""

    sites: list[str]  # the target sites
    cases: list[Case]  # the target sites' pools, one after the other
    site_of: np.ndarray  # (n,) the site of each case
    member: np.ndarray  # (models, n) which model trained on which case
    signals: list[CaseSignals]  # per model, on ``cases``
    epsilon: list[dict]  # per model, the DP-SGD epsilon each site spent


def train_pool(site_pools: Mapping[str, Sequence[Case]], recipe: Recipe, *, sites: Sequence[str], n_models: int,
               seed: int, initial: Mapping[str, np.ndarray] | None = None,
               progress: Callable[[int], None] | None = None) -> TrainedPool:
    """Train ``n_models`` federations, each on a random half of every site's pool (exactly half,
    so each model's members and non-members are balanced), and read the target ``sites``' signals
    (each site's patients judged against its own held-out half; decisions of several sites pooled)."""
    unknown = [s for s in sites if s not in site_pools]
    if unknown or not sites:
        raise ValueError(f"target sites {list(sites)} must be among the sites {sorted(site_pools)}")
    if n_models < 2:
        raise ValueError(f"n_models must be >= 2 (each model needs shadows), got {n_models}")
    small = [s for s, cases in site_pools.items() if len(cases) < 2]
    if small:
        raise ValueError(f"sites with fewer than 2 patients cannot be split into members and non-members: {small}")
    rng = np.random.default_rng(seed)
    config = recipe.train_config()
    cases = [c for site in sites for c in site_pools[site]]
    member = np.zeros((n_models, len(cases)), dtype=bool)
    signals, epsilon = [], []
    for k in range(n_models):
        halves, chosen_at = {}, {}
        for name, pool in site_pools.items():
            chosen = np.zeros(len(pool), dtype=bool)
            chosen[rng.permutation(len(pool))[:len(pool) // 2]] = True
            halves[name] = [c for c, keep in zip(pool, chosen) if keep]
            chosen_at[name] = chosen
        member[k] = np.concatenate([chosen_at[site] for site in sites])
        trained = train_federated(halves, recipe, seed=seed * 1000 + k, initial=initial)
        signals.append(case_signals(trained.model, cases, config))
        epsilon.append(trained.epsilon)
        if progress is not None:
            progress(k + 1)
    site_of = np.array([site for site in sites for _ in site_pools[site]])
    return TrainedPool(sites=list(sites), cases=cases, site_of=site_of, member=member, signals=signals, epsilon=epsilon)


def _decisions(pool: TrainedPool, site: str | None) -> dict[str, tuple]:
    """Every model as the target, the others as its shadows: scores, labels, patients, targets
    (of ``site``'s patients only, or of every target site's)."""
    n_models, n = pool.member.shape
    keep = np.ones(n, bool) if site is None else pool.site_of == site
    confidence = np.stack([s.confidence for s in pool.signals])
    out = {attack: [] for attack in ATTACKS}
    for k in range(n_models):
        others = [j for j in range(n_models) if j != k]
        online, offline = lira_scores(confidence[k], confidence[others], pool.member[others])
        out["loss_threshold"].append(-pool.signals[k].loss[keep])
        out["lira_online"].append(online[keep])
        out["lira_offline"].append(offline[keep])
    labels = pool.member[:, keep].reshape(-1)
    patients = np.tile(np.flatnonzero(keep), n_models)
    targets = np.repeat(np.arange(n_models), keep.sum())
    return {attack: (np.concatenate(scores), labels, patients, targets) for attack, scores in out.items()}


def audit_pool(pool: TrainedPool, *, site: str | None = None, seed: int = 0, n_bootstrap: int = 500) -> dict:
    """Carlini's protocol on a trained pool: figures of each attack over all targets' decisions on
    ``site``'s patients (default: every target site's, pooled)."""
    if site is not None and site not in pool.sites:
        raise ValueError(f"site {site!r} is not among the pool's target sites {pool.sites}")
    rng = np.random.default_rng(seed)
    return {attack: attack_figures(*decision, rng=rng, n_bootstrap=n_bootstrap)
            for attack, decision in _decisions(pool, site).items()}


def audit_model(model: torch.nn.Module, members: Sequence[Case], non_members: Sequence[Case], pool: TrainedPool,
                config: TrainConfig, *, seed: int = 0, n_bootstrap: int = 500) -> dict:
    """Attack one given model (a job's final global model): ``members`` were its training patients at
    the pool's site, ``non_members`` the site's held-out ones; the pool's models are the shadows."""
    index = {c.pseudonym: i for i, c in enumerate(pool.cases)}
    unknown = [c.pseudonym for c in [*members, *non_members] if c.pseudonym not in index]
    if unknown:
        raise ValueError(f"{len(unknown)} case(s) are not in the shadow models' pool (first: {unknown[0]})")
    cases = [*members, *non_members]
    rows = [index[c.pseudonym] for c in cases]
    target = case_signals(model, cases, config)
    confidence = np.stack([s.confidence[rows] for s in pool.signals])
    online, offline = lira_scores(target.confidence, confidence, pool.member[:, rows])
    label = np.r_[np.ones(len(members), bool), np.zeros(len(non_members), bool)]
    patients, targets = np.arange(len(cases)), np.zeros(len(cases), int)
    rng = np.random.default_rng(seed)
    return {attack: attack_figures(scores, label, patients, targets, rng=rng, n_bootstrap=n_bootstrap)
            for attack, scores in (("loss_threshold", -target.loss), ("lira_online", online),
                                   ("lira_offline", offline))}


def figures_table(figures: dict) -> str:
    """A plain-text table of ``audit_pool`` / ``audit_model`` figures."""

    def ci(pair) -> str:
        return f"[{pair[0]:.3f}, {pair[1]:.3f}]"

    lines = [f"{'attack':<16} {'AUC':>6} {'95% CI':>16} {'advantage':>10} {'95% CI':>16} {'chance':>7} "
             f"{'p':>6} {'TPR@1%FPR':>10} {'decisions':>10}"]
    for attack, f in figures.items():
        lines.append(f"{attack:<16} {f['auc']:>6.3f} {ci(f['auc_ci95']):>16} {f['advantage']:>10.3f} "
                     f"{ci(f['advantage_ci95']):>16} {f['advantage_chance']:>7.3f} {f['p_value']:>6.3f} "
                     f"{f['tpr_at_1pct_fpr']:>10.3f} {f['decisions']:>10}")
    return "\n".join(lines)


def load_global_model(path: Path, ehr_size: int) -> torch.nn.Module:
    """A FusionSegNet from a plain state dict or a ``PTFileModelPersistor`` file (``{"model": ...}``)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False)
        model = new_model(ehr_size)
        load_numpy_state(model, saved["model"] if "model" in saved else saved)
    except Exception as err:
        raise AuditInputError(f"{path}: not a FusionSegNet state dict or a PTFileModelPersistor file "
                              f"({type(err).__name__}: {err})") from None
    return model


def audit_data_folder(data: Path, recipe: Recipe, *, site: str, n_models: int, seed: int,
                      model_file: Path | None = None, study: str = STUDY_ID,
                      progress: Callable[[int], None] | None = None) -> dict:
    """``clinfed eval privacy``: ingest every site folder under ``data``, train ``n_models``
    federations with ``recipe`` on random halves, and attack them (Carlini's protocol) or, with
    ``model_file``, that model, judging ``site``'s patients (``all``: every site's, pooled)."""
    data = Path(data)
    site_dirs = sorted(p for p in data.iterdir() if (p / "imaging").is_dir()) if data.is_dir() else []
    if not site_dirs:
        raise AuditInputError(f"{data}: no site folders (each with imaging/ and fhir/) inside")
    pools = {d.name: ingest_site(d, study).cases for d in site_dirs}
    targets = sorted(pools) if site == "all" else [site]
    if any(t not in pools for t in targets):
        raise AuditInputError(f"--site {site}: not among the sites in {data} ({', '.join(sorted(pools))})")
    if model_file is not None and len(targets) != 1:
        raise AuditInputError("--model attacks one site's patients: give --site SITE, not all")
    recipe = replace(recipe, study=study)
    model = load_global_model(model_file, recipe.train_config().ehr_size) if model_file is not None else None
    pool = train_pool(pools, recipe, sites=targets, n_models=n_models, seed=seed, progress=progress)
    if model is not None:
        members, held_out = split_cases(pools[targets[0]])
        if not members or not held_out:
            raise AuditInputError(f"--site {targets[0]}: {len(members)} training and {len(held_out)} validation "
                                  "patient(s) by its pseudonym split; attacking a model needs both")
        figures = audit_model(model, members, held_out, pool, recipe.train_config(), seed=seed)
        target = f"{model_file} on {targets[0]}'s training vs validation patients"
    else:
        figures = audit_pool(pool, seed=seed)
        target = f"{n_models} federations, each on a random half of every site's patients"
    return {"target": target, "sites": targets, "recipe": recipe.describe(), "attacks": figures,
            "epsilon_spent": pool.epsilon[0]}
