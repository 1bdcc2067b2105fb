"""What a site's result says it spent, by unit of protection, and the header of a decline.

Two mechanisms, two units: DP-SGD protects a patient (``dp_sgd_*`` keys, written by
:class:`clinfed.privacy.dp_sgd.SiteDPSGD`); update-level DP inside secure aggregation protects a
site's whole contribution (``update_dp_*`` keys, written by
:class:`clinfed.executors.secagg_client.SecAggClient`). Each key holds the study's cumulative spend
after the round.
"""

from __future__ import annotations

from clinfed.privacy.dp_sgd import DP_SGD_DELTA, DP_SGD_EPSILON_TOTAL

UPDATE_DP_EPSILON_ROUND = "update_dp_epsilon_round"
UPDATE_DP_EPSILON_TOTAL = "update_dp_epsilon_total"
UPDATE_DP_DELTA = "update_dp_delta"
# Header of the error reply a site sends instead of an update when its budget does not allow it.
DECLINE_HEADER = "clinfed_privacy_declined"

UNIT_KEYS = {"patient": (DP_SGD_EPSILON_TOTAL, DP_SGD_DELTA), "site": (UPDATE_DP_EPSILON_TOTAL, UPDATE_DP_DELTA)}


def spend_by_unit(meta: dict) -> dict[str, tuple[float, float]]:
    """``{"patient": (epsilon, delta), "site": (epsilon, delta)}`` for the mechanisms that ran."""
    spend = {}
    for unit, (epsilon_key, delta_key) in UNIT_KEYS.items():
        epsilon, delta = meta.get(epsilon_key), meta.get(delta_key)
        if isinstance(epsilon, (int, float)) and isinstance(delta, (int, float)):
            spend[unit] = (float(epsilon), float(delta))
    return spend


def ledger_fields(meta: dict) -> dict:
    """The contribution record's spend fields (``patient_epsilon``, ``site_delta``, ...) from a
    result's meta."""
    return {f"{unit}_{name}": value for unit, spend in spend_by_unit(meta).items()
            for name, value in zip(("epsilon", "delta"), spend)}
