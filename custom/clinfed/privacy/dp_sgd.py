"""Sample-level DP-SGD for a site's local training, with one budget for the whole job.

Wraps the objects the executor already has, as Opacus's ``PrivacyEngine`` does::

    dp = SiteDPSGD(budget_file=..., n_samples=len(train), batch_size=4, num_rounds=5,
                   local_epochs=2, target_epsilon=8.0, job_id=fl_ctx.get_job_id(), site=site)
    if dp.would_exceed():                   # decline the task cleanly
        ...
    with dp.private_round(model, torch.optim.Adam(model.parameters(), lr), loader, round_=r) as private:
        train_epochs(private.model, private.data_loader, config, optimizer=private.optimizer)
    dp.epsilon()                            # spent so far, for the result's meta

The noise multiplier is set once per job so that ``num_rounds x local_epochs`` epochs of Poisson-
sampled steps end at the job's limit: what earlier jobs on the study spent plus ``job_epsilon``,
never past the site's ``target_epsilon``. Spend is reserved before each round and committed after
it, in ``budget_file``; a restarted client reloads it and goes on from there.

Noise: Opacus's ``secure_mode`` draws every value from torchcsprng, which has no build for this
torch; each round's noise generator is instead seeded with 63 bits from the operating system's
CSPRNG (``secrets``), the seeding the DP libraries recommend, and Opacus's warning that secure mode
is off is left visible in the site log.

Levers that leave a more useful model at the same epsilon (measured in ``benchmarks/dp_utility.py``):
``trainable`` (train only part of the model, so the noise spreads over fewer coordinates; pairs
with a pretrained starting model), ``augmentation_multiplicity`` (De et al. 2022: each patient's
gradient is the mean over several flipped views before clipping, at no privacy cost) and
``clipping="per_layer"``. The batch size (the Poisson sampling rate), the rounds x epochs split
and the optimiser (DP-Adam or DP-SGD) are the caller's.
"""

from __future__ import annotations

import math
import os
import secrets
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch

from clinfed.privacy.accounting import (
    PrivacyBudget,
    compose_epsilon,
    merge_history,
    noise_multiplier_for,
    stored_delta,
)
from clinfed.privacy.errors import PrivacyBudgetExceeded, PrivacyStateError

# Result meta keys of a DP-SGD round (see ``SiteDPSGD.report``).
DP_SGD_EPSILON_TOTAL = "dp_sgd_epsilon_total"
DP_SGD_DELTA = "dp_sgd_delta"
# Modes whose hooks can sit on the caller's own module: its state_dict keys stay as they are.
_HOOK_MODES = ("hooks", "functorch")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew")
CLIPPING_MODES = ("flat", "per_layer")
# Parameters trained under DP (the rest stay as received). "decoder": the UNet's decoder, the
# outcome head and every GroupNorm; "norm+head": every GroupNorm, the last 1x1 convolution and
# the outcome head (about 2k of FusionSegNet's 240k parameters).
_DECODER_PREFIXES = ("unet.upcat_", "unet.final_conv.", "outcome_head.")
_HEAD_PREFIXES = ("unet.final_conv.", "outcome_head.")
TRAINABLE_SETS = ("all", "decoder", "norm+head")
# Flips of the views of augmentation multiplicity (spatial dims of a (B, C, X, Y, Z) batch); view 0 is as sampled.
_VIEW_FLIPS = ((), (2,), (3,), (2, 3), (4,), (2, 4), (3, 4), (2, 3, 4))


class PrivateRound(NamedTuple):
    """What to train with during one private round (same roles as ``make_private``'s result)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: torch.utils.data.DataLoader


def _seed_empty_batch_structure(dp_loader, data_loader) -> None:
    """Poisson sampling draws empty batches (probability (1 - q)^n each). Opacus builds them from
    the first batch it collated, and fails when the first batch of a round is itself empty and the
    samples are dicts (MONAI's). Collating one real sample up front gives it the structure."""
    collate = getattr(dp_loader, "collate_fn", None)
    if getattr(collate, "first_batch", False) is None and len(data_loader.dataset):
        inner = collate.wrapped_collator_fn or torch.utils.data.default_collate
        collate.first_batch = inner([data_loader.dataset[0]])


class _EmptyBatchSafe(torch.nn.Module):
    """Opacus's ExpandedWeights mode (``ew``) cannot run a batch of size 0, which Poisson sampling
    draws now and then. For one, this gives every parameter an empty per-sample gradient (the DP
    optimiser then takes a noise-only step, as it must) and returns empty outputs of the model's
    output structure, still attached to the graph so the training loop's backward() works."""

    def __init__(self, wrapped: torch.nn.Module, module: torch.nn.Module):
        super().__init__()
        self.wrapped = wrapped
        self._plain = [module]  # not a submodule: parameters are registered once, via ``wrapped``

    def forward(self, *args, **kwargs):
        first = args[0] if args else next(iter(kwargs.values()))
        if first.shape[0] > 0:
            return self.wrapped(*args, **kwargs)
        module = self._plain[0]
        trainable = [p for p in module.parameters() if p.requires_grad]
        for parameter in trainable:
            parameter.grad_sample = torch.zeros((0, *parameter.shape), dtype=parameter.dtype, device=parameter.device)
        anchor = trainable[0].sum() * 0.0
        one = [a[:1].new_zeros((1, *a.shape[1:])) if torch.is_tensor(a) else a for a in args]
        with torch.no_grad():
            shaped = module(*one, **{k: v[:1].new_zeros((1, *v.shape[1:])) if torch.is_tensor(v) else v
                                     for k, v in kwargs.items()})
        return _map_tensors(shaped, lambda t: t[:0] + anchor)


def trainable_parameters(model: torch.nn.Module, which: str) -> list[str]:
    """Names of the parameters of ``model`` that the set ``which`` (``TRAINABLE_SETS``) trains."""
    if which not in TRAINABLE_SETS:
        raise ValueError(f"trainable must be one of {TRAINABLE_SETS}, got {which!r}")
    if which == "all":
        return [name for name, _ in model.named_parameters()]
    norm = {f"{module_name}.{name}" for module_name, module in model.named_modules()
            if isinstance(module, torch.nn.GroupNorm) for name, _ in module.named_parameters()}
    prefixes = _DECODER_PREFIXES if which == "decoder" else _HEAD_PREFIXES
    names = [name for name, _ in model.named_parameters() if name in norm or name.startswith(prefixes)]
    if not any(name.startswith(prefixes) for name in names):
        raise ValueError(f"trainable={which!r} expects FusionSegNet's parameter names ({', '.join(prefixes)}); "
                         f"{type(model).__name__} has none of them")
    return names


class _AugmentedViews:
    """Augmentation multiplicity's data side: every sample of a batch becomes ``k`` consecutive rows,
    flipped views of it (image and label flipped alike), so per-row gradients come out grouped by patient."""

    def __init__(self, loader, k: int):
        self.loader, self.k = loader, k

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            views = {key: value.repeat_interleave(self.k, dim=0) for key, value in batch.items()}
            for key in ("image", "label"):
                rows = views[key]
                for view, dims in enumerate(_VIEW_FLIPS[:self.k]):
                    if dims:
                        rows[view::self.k] = rows[view::self.k].flip(dims)
            yield views


class _MeanOverViews:
    """Augmentation multiplicity's optimiser side: before Opacus clips, each patient's per-sample
    gradient becomes the mean of its ``k`` views' (so one patient still moves the sum by at most C)."""

    def __init__(self, dp_optimizer, k: int):
        self.dp_optimizer, self.k = dp_optimizer, k

    def zero_grad(self, set_to_none: bool = True):
        self.dp_optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        for parameter in self.dp_optimizer.params:
            rows = parameter.grad_sample
            parameter.grad_sample = rows.view(rows.shape[0] // self.k, self.k, *rows.shape[1:]).mean(dim=1)
        return self.dp_optimizer.step(closure)

    def __getattr__(self, name):
        return getattr(self.dp_optimizer, name)


def _map_tensors(value, fn):
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


class SiteDPSGD:
    """Opacus DP-SGD with Poisson sampling and a per-site, per-study budget that spans the job.

    Args:
        budget_file: JSON file holding this site's DP-SGD spend for the study (``PrivacyBudget``).
        n_samples: training cases at this site.
        batch_size: the loader's batch size; the Poisson sampling rate is 1 / ceil(n / batch_size).
        num_rounds: rounds this job will train for.
        local_epochs: epochs per round.
        target_epsilon: the site's budget for this study (its privacy policy), over all jobs.
        job_epsilon: what this job may spend on top of earlier jobs (the job's ask, at most the
            site's budget); default: the rest of the budget.
        target_delta: defaults to min(1e-5, 1 / (10 n)) at the study's first job (then kept in the
            budget file).
        max_grad_norm: per-sample gradient clipping bound.
        accountant: ``prv`` (tighter, slower) or ``rdp``.
        grad_sample_mode: Opacus per-sample gradient engine: ``ew`` (ExpandedWeights; default:
            1.2x a non-private step on FusionSegNet on CPU, against 7x for ``hooks``; per-sample
            gradients checked equal), ``hooks`` or ``functorch``.
        trainable: which parameters train under DP (``TRAINABLE_SETS``): ``all``, ``decoder`` or
            ``norm+head``; the others are frozen for the round and come back unchanged.
        augmentation_multiplicity: flipped views per patient whose gradients are averaged before
            clipping (1 = off; at most 8). Costs k x the compute of a step.
        clipping: ``flat`` (one bound C over all parameters) or ``per_layer`` (C / sqrt(L) for each
            of the L trained tensors, so the whole gradient is still bounded by C).
        job_id, site, study: where the spend is recorded.
    """

    def __init__(self, *, budget_file: str | os.PathLike, n_samples: int, batch_size: int, num_rounds: int,
                 local_epochs: int, target_epsilon: float, job_epsilon: float | None = None,
                 target_delta: float | None = None,
                 max_grad_norm: float = 1.0, accountant: str = "prv", grad_sample_mode: str = "ew",
                 trainable: str = "all", augmentation_multiplicity: int = 1, clipping: str = "flat",
                 job_id: str = "job", site: str = "", study: str = ""):
        if n_samples < 1 or batch_size < 1 or num_rounds < 1 or local_epochs < 1:
            raise ValueError("n_samples, batch_size, num_rounds and local_epochs must all be >= 1")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if accountant not in ("prv", "rdp"):
            raise ValueError(f"accountant must be 'prv' or 'rdp' for DP-SGD, got {accountant!r}")
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
        if trainable not in TRAINABLE_SETS:
            raise ValueError(f"trainable must be one of {TRAINABLE_SETS}, got {trainable!r}")
        if not 1 <= int(augmentation_multiplicity) <= len(_VIEW_FLIPS):
            raise ValueError(f"augmentation_multiplicity must be 1..{len(_VIEW_FLIPS)}, got {augmentation_multiplicity}")
        if clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping must be one of {CLIPPING_MODES}, got {clipping!r}")
        self.n_samples = int(n_samples)
        self.batch_size = int(batch_size)
        self.num_rounds = int(num_rounds)
        self.local_epochs = int(local_epochs)
        self.max_grad_norm = float(max_grad_norm)
        self.accountant = accountant
        self.grad_sample_mode = grad_sample_mode
        self.trainable = trainable
        self.augmentation_multiplicity = int(augmentation_multiplicity)
        self.clipping = clipping
        self.job_id = str(job_id)
        # Delta is fixed for a study's budget file: the default is taken at the first job, and a
        # later cohort size does not change it.
        self.delta = float(target_delta) if target_delta else (
            stored_delta(budget_file) or min(1e-5, 1.0 / (10 * self.n_samples)))
        if job_epsilon is not None and not 0 < job_epsilon <= target_epsilon:
            raise ValueError(f"job_epsilon must be in (0, target_epsilon={target_epsilon}], got {job_epsilon}")
        self.job_epsilon = job_epsilon
        # Opacus takes the sampling rate from the loader's length: 1 / number of batches.
        self.batches_per_epoch = math.ceil(self.n_samples / self.batch_size)
        self.sample_rate = 1.0 / self.batches_per_epoch
        self.steps_per_round = self.local_epochs * self.batches_per_epoch
        self.budget = PrivacyBudget(budget_file, target_epsilon=target_epsilon, delta=self.delta,
                                    accountant=accountant, mechanism="dp_sgd", site=site, study=study)
        self.noise_multiplier = self._plan_noise()

    @property
    def target_epsilon(self) -> float:
        return self.budget.target_epsilon

    def _plan_noise(self) -> float:
        """Same noise for every round of a job; a restarted client finds its plan in the file."""
        plan = self.budget.plan(self.job_id)
        if (plan and math.isclose(plan["sample_rate"], self.sample_rate)
                and plan["steps_per_round"] == self.steps_per_round):
            return float(plan["noise_multiplier"])
        # First start of this job, or the cohort changed: fit the rounds still to come into what is
        # left of the job's limit (fixed at the job's first plan: earlier jobs' spend + its ask).
        limit = plan["epsilon_limit"] if plan else min(
            self.target_epsilon, self.budget.epsilon() + (self.job_epsilon or self.target_epsilon))
        rounds_left = max(self.num_rounds - len(self.budget.rounds_of(self.job_id)), 1)
        sigma = noise_multiplier_for(target_epsilon=limit, delta=self.delta,
                                     sample_rate=self.sample_rate, steps=rounds_left * self.steps_per_round,
                                     accountant=self.accountant, history=self.budget.history)
        self.budget.set_plan(self.job_id, {"noise_multiplier": sigma, "sample_rate": self.sample_rate,
                                           "steps_per_round": self.steps_per_round, "num_rounds": self.num_rounds,
                                           "max_grad_norm": self.max_grad_norm, "n_samples": self.n_samples,
                                           "epsilon_limit": limit})
        return sigma

    def _round_events(self, steps: int | None) -> list:
        return [(self.noise_multiplier, self.sample_rate, self.steps_per_round if steps is None else int(steps))]

    def epsilon(self) -> float:
        """Epsilon spent on this study by DP-SGD at this site so far (all jobs, reservations included)."""
        return self.budget.epsilon()

    def epsilon_of_round(self, steps: int | None = None) -> float:
        """Epsilon of one round on its own (for reporting; rounds compose sub-additively)."""
        return compose_epsilon(self._round_events(steps), self.delta, self.accountant)

    def would_exceed(self, next_round_steps: int | None = None) -> bool:
        """Whether a round of ``next_round_steps`` (default: a full round) would overspend."""
        return self.budget.would_exceed(self._round_events(next_round_steps))

    def check_budget(self, next_round_steps: int | None = None) -> None:
        """Raise ``PrivacyBudgetExceeded`` (with a message for the site operator) if the next round won't fit."""
        self.budget.check(self._round_events(next_round_steps), what=f"DP-SGD round of job {self.job_id}")

    @contextmanager
    def private_round(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      data_loader: torch.utils.data.DataLoader, *, round_: int | None = None) -> Iterator[PrivateRound]:
        """One round of private training. Raises ``PrivacyBudgetExceeded`` before touching anything
        if the round won't fit. Train with the yielded objects; ``model``'s own state_dict keys are
        unchanged (hooks are removed on exit). The steps actually taken are committed on exit, even
        if training fails or is aborted."""
        from opacus import PrivacyEngine

        if len(data_loader) != self.batches_per_epoch:
            raise PrivacyStateError(f"the loader has {len(data_loader)} batches per epoch but the privacy plan assumed "
                                    f"{self.batches_per_epoch} (n={self.n_samples}, batch size {self.batch_size})")
        what = f"DP-SGD round {round_} of job {self.job_id}"
        reservation = self.budget.reserve(self._round_events(None), what=what, job_id=self.job_id, round_=round_)
        engine = PrivacyEngine(accountant=self.accountant)
        wrap = self.grad_sample_mode not in _HOOK_MODES
        trained = set(trainable_parameters(model, self.trainable))
        frozen = [p for name, p in model.named_parameters() if name not in trained and p.requires_grad]
        for parameter in frozen:
            parameter.requires_grad_(False)
        n_tensors = sum(p.requires_grad for p in model.parameters())
        max_grad_norm = ([self.max_grad_norm / math.sqrt(n_tensors)] * n_tensors if self.clipping == "per_layer"
                         else self.max_grad_norm)
        noise = torch.Generator(device=next(model.parameters()).device)
        noise.manual_seed(secrets.randbits(63))
        try:
            hooked, dp_optimizer, dp_loader = engine.make_private(
                module=model, optimizer=optimizer, data_loader=data_loader, noise_multiplier=self.noise_multiplier,
                max_grad_norm=max_grad_norm, poisson_sampling=True, clipping=self.clipping,
                grad_sample_mode=self.grad_sample_mode, wrap_model=wrap, noise_generator=noise)
        except Exception:
            for parameter in frozen:
                parameter.requires_grad_(True)
            self.budget.commit([], job_id=self.job_id, round_=round_, reservation=reservation)
            raise
        _seed_empty_batch_structure(dp_loader, data_loader)
        k = self.augmentation_multiplicity
        try:
            yield PrivateRound(_EmptyBatchSafe(hooked, model) if wrap else model,
                               _MeanOverViews(dp_optimizer, k) if k > 1 else dp_optimizer,
                               _AugmentedViews(dp_loader, k) if k > 1 else dp_loader)
        finally:
            taken = merge_history(engine.accountant.history)
            if not wrap:
                hooked.cleanup()
            elif hasattr(hooked, "_close"):
                hooked._close()
            for parameter in model.parameters():
                parameter.grad_sample = None
                parameter.grad = None
            for parameter in frozen:
                parameter.requires_grad_(True)
            self.budget.commit(taken, job_id=self.job_id, round_=round_, reservation=reservation)

    def report(self) -> dict:
        """Figures for the result's meta and ``results.json``."""
        return {DP_SGD_EPSILON_TOTAL: self.epsilon(), DP_SGD_DELTA: self.delta,
                "dp_sgd_noise_multiplier": self.noise_multiplier, "dp_sgd_sample_rate": self.sample_rate,
                "dp_sgd_target_epsilon": self.target_epsilon}


__all__ = ["SiteDPSGD", "PrivateRound", "PrivacyBudgetExceeded", "GRAD_SAMPLE_MODES", "CLIPPING_MODES", "TRAINABLE_SETS",
           "trainable_parameters"]
