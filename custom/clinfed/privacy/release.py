"""Everything a site sends besides the model update, field by field: each is either accounted (a
DP mechanism's output or its spend) or coarsened to what the site's policy allows, and a field
not listed here never leaves (:func:`release_meta` refuses it).

=============================  ===============================================================
field                          treatment, and why
=============================  ===============================================================
``n_samples``,                 coarse: rounded up to the policy's ``count_bucket`` (default 5).
``NUM_STEPS_CURRENT_ROUND``    FedAvg needs a weight, and under secure aggregation it travels in
                               clear; a bucket hides whether one patient was added or removed.
``clinfed_cohort``             coarse: the consent gate's counts (train, validation, excluded),
                               each rounded up to the bucket; the ledger shows them to auditors.
``initial_metrics``            coarse: Dice and AUC of the received model on the site's validation
                               patients, rounded to ``metric_decimals`` (default 2); ``n_val``
                               bucketed. The server selects the best round with them. Rounding is
                               not DP: it limits, it does not bound, what one validation patient
                               moves; validation patients never enter training.
``train_loss``                 not released: the site log has it; nobody else needs it.
``train_seconds``,             coarse: rounded to 0.1 s. They time the site's machine (used in
``validate_seconds``           the round log), and move with cohort size no more than the counts.
``dp_sgd_epsilon_total``,      accounted: the study's cumulative patient-level spend (public by
``dp_sgd_delta``,              design: the ledger's audit of DP-SGD) and the budget the job asked
``dp_sgd_target_epsilon``      for. The noise multiplier, sampling rate and per-round epsilon stay
                               in the site log: the sampling rate would give 1/ceil(n/batch).
``update_dp_epsilon_round``,   accounted: the site-level spend of update DP inside the mask.
``update_dp_epsilon_total``,
``update_dp_delta``
``clinfed_round``              protocol: the round number.
``clinfed_secagg``             protocol: secure aggregation's messages (context id, weight, layout).
``filter_history``             FLARE's own record of the filters that ran (class names).
=============================  ===============================================================

A validation task's result (``dice``, ``auc``, ``n_val``) gets the same treatment as
``initial_metrics``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nvflare.apis.dxo import MetaKey

from clinfed.privacy.errors import PrivacyError
from clinfed.privacy.secagg import META_KEY as SECAGG_META

COHORT_META = "clinfed_cohort"  # the consent gate's counts of the round (SegExecutor)
ROUND_META = "clinfed_round"

COUNTS = ("n_samples", MetaKey.NUM_STEPS_CURRENT_ROUND)
METRICS = MetaKey.INITIAL_METRICS
SECONDS = ("train_seconds", "validate_seconds")
ACCOUNTED = ("dp_sgd_epsilon_total", "dp_sgd_delta", "dp_sgd_target_epsilon", "update_dp_epsilon_round",
             "update_dp_epsilon_total", "update_dp_delta")
PROTOCOL = (ROUND_META, SECAGG_META, MetaKey.FILTER_HISTORY)
WITHHELD = ("train_loss", "dp_sgd_noise_multiplier", "dp_sgd_sample_rate", "dp_sgd_epsilon_round")
RELEASED_FIELDS = frozenset((*COUNTS, COHORT_META, METRICS, *SECONDS, *ACCOUNTED, *PROTOCOL))


class UnlistedRelease(PrivacyError):
    """A result carries a field this module does not list: it is not sent."""


@dataclass(frozen=True)
class ReleasePolicy:
    """How coarse a site's released figures are (the ``release`` part of its privacy policy)."""

    count_bucket: int = 5
    metric_decimals: int = 2

    def count(self, value):
        if value is None:
            return None
        return int(math.ceil(float(value) / self.count_bucket) * self.count_bucket)

    def metric(self, value):
        return None if value is None else round(float(value), self.metric_decimals)

    def metrics(self, metrics: dict) -> dict:
        """A validation result: scores rounded, the validation count bucketed."""
        return {k: self.count(v) if k == "n_val" else self.metric(v) for k, v in (metrics or {}).items()}


def release_meta(meta: dict, policy: ReleasePolicy) -> dict:
    """The meta a site may send: withheld fields dropped, coarse ones coarsened, accounted and
    protocol fields as they are. Raises ``UnlistedRelease`` naming any other field."""
    unlisted = sorted(str(k) for k in meta if k not in RELEASED_FIELDS and k not in WITHHELD)
    if unlisted:
        raise UnlistedRelease(f"result fields {unlisted} are not listed in clinfed.privacy.release with a "
                              f"treatment; nothing is sent")
    released = {}
    for key, value in meta.items():
        if key in WITHHELD:
            continue
        if key in COUNTS:
            value = policy.count(value)
        elif key == COHORT_META:
            value = {k: policy.count(v) for k, v in (value or {}).items()}
        elif key == METRICS:
            value = policy.metrics(value)
        elif key in SECONDS:
            value = None if value is None else round(float(value), 1)
        released[key] = value
    return released
