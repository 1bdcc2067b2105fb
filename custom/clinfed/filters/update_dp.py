"""Update-level differential privacy: clip the whole update to an L2 norm, add Gaussian noise,
and keep the site's spend for the study across rounds, jobs and restarts.

Example ``local/privacy.json`` entry (a site's strict scope; runs on the train task's result)::

    {"path": "clinfed.filters.update_dp.UpdateDPFilter",
     "args": {"noise_multiplier": 1.0, "clip_norm": 0.5, "target_epsilon": 20.0, "delta": 1e-5}}
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.app_constant import AppConstants

from clinfed.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyBudget,
    budget_file,
    compose_epsilon,
    default_privacy_dir,
    stored_delta,
)
from clinfed.privacy.dp_sgd import DP_SGD_DELTA, DP_SGD_EPSILON_TOTAL
from clinfed.privacy.errors import PrivacyBudgetExceeded, PrivacyStateError

DEFAULT_STUDY = "clinfed-tumour-seg"  # clinfed.data.profiles.STUDY_ID
# Result meta written by this filter (what the ledger records as the round's spend).
DP_EPSILON_ROUND = "dp_epsilon_round"
DP_EPSILON_TOTAL = "dp_epsilon_total"
DP_DELTA = "dp_delta"
DP_DETAILS = "dp_update"
# Header of the error reply sent instead of an update when the budget is spent.
DECLINE_HEADER = "clinfed_privacy_declined"
MECHANISM = "update_dp"


def reported_spend(meta: dict) -> tuple[float | None, float | None]:
    """The study's (epsilon, delta) spent so far that a result reports: the update-DP filter's
    total, the executor's DP-SGD total, or, when both ran, their sum (basic composition, an upper
    bound). (None, None) when no DP mechanism ran."""
    spends = [(meta.get(eps), meta.get(delta)) for eps, delta in
              ((DP_EPSILON_TOTAL, DP_DELTA), (DP_SGD_EPSILON_TOTAL, DP_SGD_DELTA))]
    spends = [(float(e), float(d)) for e, d in spends if isinstance(e, (int, float)) and isinstance(d, (int, float))]
    if not spends:
        return None, None
    return sum(e for e, _ in spends), sum(d for _, d in spends)


class UpdateDPFilter(DXOFilter):
    """Clips a weight difference to global L2 norm ``clip_norm`` and adds N(0, (noise_multiplier *
    clip_norm)^2) to every coordinate; refuses to release once the study's budget would be exceeded.

    The guarantee is per released update, composed over all releases of this site for the study.
    With ``patient_level`` false it is for the update against no update (sensitivity C: DP-FedAvg's
    site-level notion); with ``patient_level`` true, for any change of one patient's records, which
    can move a clipped update anywhere in the ball (sensitivity 2C, so half the effective noise).

    Args:
        noise_multiplier: sigma; the noise std is sigma * clip_norm. Must be > 0.
        clip_norm: C, the bound on the update's L2 norm over all parameters. Must be > 0.
        target_epsilon: the site's budget for this study (all jobs together).
        delta: the delta of the guarantee; if omitted, 1 / (10 n) with n the result's ``n_samples``
            at the first release (then fixed in the budget file).
        study: the study whose budget this spends.
        accountant: ``gaussian`` (exact for Gaussian releases without subsampling; default),
            ``prv`` or ``rdp``.
        state_dir: folder of the budget files; default ``<site workspace>/clinfed_privacy``. The
            file is ``<state_dir>/<study>/<site>.update_dp.json``.
        patient_level: account for the patient-level (2C) sensitivity instead of site-level (C).
        data_kinds: DXO kinds to filter; only ``WEIGHT_DIFF`` is supported (full weights cannot be
            clipped meaningfully).
    """

    def __init__(self, noise_multiplier: float = 1.0, clip_norm: float = 1.0, target_epsilon: float = 10.0,
                 delta: float | None = None, study: str = DEFAULT_STUDY, accountant: str = "gaussian",
                 state_dir: str | None = None, patient_level: bool = False, data_kinds: list[str] | None = None):
        super().__init__(supported_data_kinds=[DataKind.WEIGHT_DIFF],
                         data_kinds_to_filter=data_kinds or [DataKind.WEIGHT_DIFF])
        for name, value in (("noise_multiplier", noise_multiplier), ("clip_norm", clip_norm),
                            ("target_epsilon", target_epsilon)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"UpdateDPFilter: '{name}' must be a positive number, got {value!r}")
        if delta is not None and not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"UpdateDPFilter: 'delta' must be in (0, 1), got {delta!r}")
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"UpdateDPFilter: 'accountant' must be one of {ACCOUNTANTS}, got {accountant!r}")
        if not isinstance(study, str) or not study:
            raise ValueError("UpdateDPFilter: 'study' must be a non-empty string")
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta) if delta is not None else None
        self.study = study
        self.accountant = accountant
        self.state_dir = state_dir
        self.patient_level = bool(patient_level)

    @property
    def effective_noise_multiplier(self) -> float:
        """Noise std over the sensitivity: sigma for site level, sigma / 2 for patient level."""
        return self.noise_multiplier / (2.0 if self.patient_level else 1.0)

    def _budget(self, fl_ctx: FLContext, site: str, n_samples) -> PrivacyBudget:
        folder = Path(self.state_dir) if self.state_dir else default_privacy_dir(fl_ctx)
        path = budget_file(folder, study=self.study, site=site, mechanism=MECHANISM)
        delta = self.delta if self.delta is not None else stored_delta(path)
        if delta is None:
            if not isinstance(n_samples, (int, float)) or n_samples < 1:
                raise PrivacyStateError("UpdateDPFilter: no 'delta' configured and the result has no n_samples "
                                        "to derive 1/(10 n) from; set 'delta' in the site's privacy policy")
            delta = 1.0 / (10 * float(n_samples))
        return PrivacyBudget(path, target_epsilon=self.target_epsilon, delta=delta, accountant=self.accountant,
                             mechanism=MECHANISM, site=site, study=self.study)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            return super().process(shareable, fl_ctx)
        except PrivacyBudgetExceeded as err:
            # Decline: an error reply with the reason, and nothing of the update.
            self.log_error(fl_ctx, str(err))
            reply = make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
            reply.set_header(DECLINE_HEADER, str(err))
            return reply

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        site = fl_ctx.get_identity_name() or "site"
        job_id = str(fl_ctx.get_job_id() or "job")
        round_ = shareable.get_header(AppConstants.CURRENT_ROUND, dxo.get_meta_prop(AppConstants.CURRENT_ROUND))
        budget = self._budget(fl_ctx, site, dxo.get_meta_prop("n_samples"))
        event = [(self.effective_noise_multiplier, 1.0, 1)]
        what = f"the update of round {round_} of job {job_id}"
        budget.check(event, what=what)  # before any work; spend() checks again under the file lock

        names = sorted(dxo.data)
        arrays = {name: np.asarray(dxo.data[name]) for name in names}
        norm = math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values()))
        factor = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        std = self.noise_multiplier * self.clip_norm
        rng = np.random.default_rng()  # seeded from OS entropy on every call
        noisy = {}
        for name, a in arrays.items():
            dtype = a.dtype if a.dtype in (np.float32, np.float64) else np.dtype(np.float32)
            noise = rng.standard_normal(a.shape, dtype=dtype)
            noise *= std
            noise += a.astype(dtype) * dtype.type(factor)  # a new array: the input is never written
            noisy[name] = noise

        # Spend is recorded before the update leaves the site: a failed send still counts.
        epsilon_total = budget.spend(event, what=what, job_id=job_id, round_=round_)
        epsilon_round = compose_epsilon(event, budget.delta, self.accountant)
        # The norm itself is not sent (it is data-dependent); the site log gets it.
        self.log_info(fl_ctx, f"update DP: norm {norm:.4g} clipped to {self.clip_norm:g} (x{factor:.3g}), noise std "
                              f"{std:.3g}; epsilon round {epsilon_round:.4g}, total {epsilon_total:.4g} of "
                              f"{self.target_epsilon:g} at delta {budget.delta:.3g} ({budget.path})")
        meta = {k: copy.deepcopy(v) for k, v in dxo.meta.items() if k != MetaKey.FILTER_HISTORY}
        meta.update({DP_EPSILON_ROUND: epsilon_round, DP_EPSILON_TOTAL: epsilon_total, DP_DELTA: budget.delta,
                     DP_DETAILS: {"noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                                  "target_epsilon": self.target_epsilon, "accountant": self.accountant,
                                  "patient_level": self.patient_level, "study": self.study}})
        return DXO(data_kind=dxo.data_kind, data=noisy, meta=meta)
