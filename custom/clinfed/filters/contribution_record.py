"""Records the site's own contribution to a round on the audit ledger, from the bytes it sends.

What is hashed (``update_sha256``)
----------------------------------
The canonical serialisation of the result DXO this filter receives, which is what the site
sends when the filter is the last of the result filters:

``canonical_json({"format": "clinfed-dxo-v1", "data_kind": K, "tensors": [[name, dtype, shape], ...]})``
``+ b"\\n"`` + each array's raw bytes, C order, little-endian, in the same order,

where tensors are taken in sorted name order, ``dtype`` is NumPy's little-endian type string
(``"<f4"``, ``"<u4"``, ``"|u1"``) and ``shape`` a list of ints. The DXO's meta (n_samples,
metrics, filter history) is not hashed: it is recorded as fields of its own. FOBS, FLARE's wire
format, does not promise one byte layout for one content, so the hash is of this layout, which
anyone holding the arrays (the server, a site re-checking its own log) can recompute with
:func:`update_sha256`.

Where the filter sits (``hash_stage``)
--------------------------------------
A site's privacy filters run before the job's filters. Listed in the job (as our jobs do), this
filter therefore sees the update after the site's update-DP and masking filters; listed in the
site's privacy scope between them, it sees it after DP and before masking. ``hash_stage``
``auto`` records which: ``after_masking`` when the DXO is a masked update, else ``after_dp``
(which, without a DP filter, means the plain update).

Example ``local/privacy.json`` entry between the DP and masking filters::

    {"path": "clinfed.filters.contribution_record.ContributionRecorder", "args": {}}
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from clinfed.errors import ConfigError
from clinfed.ledger import Contribution, DuplicateRecord
from clinfed.privacy import secagg
from clinfed.privacy.release import COHORT_META, ROUND_META
from clinfed.privacy.spend import ledger_fields

FORMAT = "clinfed-dxo-v1"
HASH_STAGES = ("auto", "after_dp", "after_masking")
# Result meta this filter reads, written by clinfed.executors.seg_executor.SegExecutor (the DP
# filter's keys are clinfed.filters.update_dp's).
_METRIC_NAME = re.compile(r"[a-z][a-z0-9_./]{0,63}")
MAX_METRICS = 32


def _array(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == object:
        raise ValueError("an update entry is not numeric")
    return np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")  # keeps 0-d arrays 0-d


def update_sha256(dxo: DXO) -> str:
    """sha256 of the canonical serialisation of ``dxo``'s data (see the module docstring)."""
    data = dxo.data
    if not isinstance(data, dict):
        raise ValueError(f"can only hash a DXO whose data is a dict of arrays, got {type(data).__name__}")
    names = sorted(data)
    if any(not isinstance(n, str) for n in names):
        raise ValueError("update tensor names must be strings")
    arrays = [_array(data[n]) for n in names]
    header = {"format": FORMAT, "data_kind": dxo.data_kind,
              "tensors": [[n, a.dtype.str, list(a.shape)] for n, a in zip(names, arrays)]}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8") + b"\n")
    for array in arrays:
        digest.update(array.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def _metric(value):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    value = float(value) if isinstance(value, (float, np.floating)) else int(value)
    return value if math.isfinite(value) else None


def contribution_metrics(meta: dict) -> dict:
    """The numbers from a result's meta that the ledger keeps with the contribution.

    The model as received (``received_dice``, ``received_auc``, ``received_n_val``), the local
    training loss, and the consent gate's counts for the round (``cohort_train``,
    ``cohort_validation``, ``consent_excluded``). Never anything that could identify a patient:
    names are fixed here and values are numbers.
    """
    metrics = {}
    received = meta.get(MetaKey.INITIAL_METRICS) or {}
    if isinstance(received, dict):
        for name, value in received.items():
            metrics[f"received_{name}"] = _metric(value)
    metrics["train_loss"] = _metric(meta.get("train_loss"))
    cohort = meta.get(COHORT_META) or {}
    if isinstance(cohort, dict):
        metrics["cohort_train"] = _metric(cohort.get("n_train"))
        metrics["cohort_validation"] = _metric(cohort.get("n_validation"))
        metrics["consent_excluded"] = _metric(cohort.get("n_excluded"))
    clean = {k: v for k, v in metrics.items() if v is not None and _METRIC_NAME.fullmatch(k)}
    return dict(sorted(clean.items())[:MAX_METRICS])


class ContributionRecorder(DXOFilter):
    """Result filter on the ``train`` task: writes the site's contribution record (update hash,
    n_samples, metrics, the cumulative spend per unit of protection) before the update leaves.

    The record goes through the site's ledger outbox, journalled durably before the update is
    released, so a ledger outage never loses it; a contract refusal (e.g. the same round recorded
    with a different update) stops the update when ``policy`` is ``strict``.

    Args:
        hash_stage: ``auto`` (default: ``after_masking`` for a masked update, else ``after_dp``),
            ``after_dp`` or ``after_masking``: which bytes the recorded hash is of.
        policy: outbox policy for this job, ``async`` (the default of the site's ledger config) or
            ``strict`` (the update waits until its record is committed).
        required: refuse to release the update when the site has no ledger configured.
        data_kinds: DXO kinds recorded (default weight differences, weights and masked updates).
    """

    def __init__(self, hash_stage: str = "auto", policy: str | None = None, required: bool = True,
                 data_kinds: list[str] | None = None):
        kinds = data_kinds or [DataKind.WEIGHT_DIFF, DataKind.WEIGHTS, DataKind.APP_DEFINED]
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=kinds)
        if hash_stage not in HASH_STAGES:
            raise ValueError(f"ContributionRecorder: 'hash_stage' must be one of {', '.join(HASH_STAGES)}, "
                             f"got {hash_stage!r}")
        if policy not in (None, "async", "strict"):
            raise ValueError(f"ContributionRecorder: 'policy' must be 'async' or 'strict', got {policy!r}")
        self.hash_stage = hash_stage
        self.policy = policy
        self.required = bool(required)
        self._settings = None
        self._lock = threading.Lock()

    def _ledger(self, fl_ctx: FLContext):
        from clinfed.ledger.settings import ledger_settings, shared_ledger

        with self._lock:
            if self._settings is None:
                site = fl_ctx.get_identity_name()
                workspace = fl_ctx.get_engine().get_workspace()
                settings = ledger_settings(site, site_config_dir=workspace.get_site_config_dir())
                if settings is None:
                    return None
                self._settings = settings.with_policy(self.policy)
                self.log_info(fl_ctx, f"contributions of {site} go to the {self._settings.describe()}")
            return shared_ledger(self._settings)

    def _stage(self, dxo: DXO) -> str:
        if self.hash_stage != "auto":
            return self.hash_stage
        masked = (dxo.get_meta_prop(secagg.META_KEY) or {}).get("stage") == secagg.STAGE_MASKED_INPUT
        return "after_masking" if masked else "after_dp"

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> None:
        from clinfed.ledger.settings import deliver_now, ledger_job_id

        site = fl_ctx.get_identity_name()
        ledger = self._ledger(fl_ctx)
        if ledger is None:
            if self.required:
                raise ConfigError(f"site {site}: no ledger configured (local/clinfed_site.json 'ledger' or "
                                  f"$CLINFED_LEDGER); the update is not sent unrecorded")
            self.log_warning(fl_ctx, "no ledger configured: contribution not recorded")
            return None
        round_ = shareable.get_header(AppConstants.CURRENT_ROUND, dxo.get_meta_prop(ROUND_META))
        if round_ is None:
            raise ValueError(f"site {site}: the result carries no round number (header "
                             f"{AppConstants.CURRENT_ROUND} or meta {ROUND_META!r})")
        n_samples = dxo.get_meta_prop("n_samples", dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND))
        contribution = Contribution(
            job_id=ledger_job_id(fl_ctx.get_job_id()), round=int(round_), site=site,
            update_sha256=update_sha256(dxo), n_samples=int(n_samples or 0),
            metrics=contribution_metrics(dxo.meta), hash_stage=self._stage(dxo), **ledger_fields(dxo.meta))
        try:
            ledger.record_contribution(contribution)
        except DuplicateRecord:
            self.log_info(fl_ctx, f"round {round_}: contribution already on the ledger")
        queued = deliver_now(ledger)
        self.log_info(fl_ctx, f"round {round_}: contribution recorded for job {contribution.job_id}: update sha256 "
                              f"{contribution.update_sha256} ({contribution.hash_stage}), n={contribution.n_samples}"
                              + (f", {queued} ledger write(s) queued in the outbox" if queued else ""))
        return None  # the update itself leaves unchanged
