"""Secure aggregation on the server: sum the round's pairwise-masked updates in Z_2^32, read the
weighted mean back, and redo the round without a site whose masked update is missing.

Protocol of one round (detect and redo):

1. ``MaskedFedAvg`` sends the train task to the sampled sites with a mask context under
   ``MASK_CONTEXT_KEY``: round, attempt (0 first), the sorted participant list, the fixed-point
   range (``clip_range``) and a bound on the sum of the sites' weights (``total_weight``).
2. Each site's ``SecureMaskFilter`` masks its update against exactly that list. Masks are derived
   from the pairwise X25519 secrets *and* the context, so every attempt has fresh masks; a site
   refuses to mask twice for one (job, round, attempt) and refuses lists shorter than its minimum.
3. ``MaskedSumAggregator`` adds what arrives. The running sum holds only masked values, and masks
   cancel only when every listed participant's update is in it: with one missing, the sum is
   uniformly random and ``aggregate_model`` raises ``MaskedRoundIncomplete`` and discards it.
   No pairwise secret or mask ever reaches the server, so it cannot take a missing site's masks
   out (nor, therefore, anyone's).
4. ``MaskedFedAvg`` then redoes the round with the sites that did deliver, as attempt + 1 (new
   masks), until the sum opens, the attempts run out, or fewer than ``min_participants`` are left;
   then the job stops rather than publish a corrupted model.

What the server learns: the weighted sum of the participants of attempts that complete, and the
clear ``n_samples``. An attempt that does not complete reveals nothing. The residual risk is a
late result: if a site's update of an abandoned attempt still reached a server that kept it, that
attempt's sum minus the redo's sum would approximate the late site's update. FLARE drops results
that arrive after the task ends (``train_timeout``) and this aggregator never sees them; sites
that also apply update-level DP bound even that exposure. Closing it cryptographically needs
SecAgg's self-masks and an unmasking round (a second message per round).
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.workflows.fedavg import FedAvg

from clinfed.aggregators.fedavg import weighted_site_metrics
from clinfed.privacy.errors import MaskedRoundIncomplete, MaskingError, MaskRangeExceeded
from clinfed.privacy.masking import (
    MASK_CONTEXT_KEY,
    MASKED_META_KEY,
    MaskContext,
    check_masked_meta,
    dequantise_sum,
    layout_digest,
    layout_of,
)


class MaskedSumAggregator(ModelAggregator):
    """Sums masked updates (uint32, wrapping) and opens the sum only when every participant listed
    for the attempt has contributed. Weighted FedAvg result: sum_i n_i x_i / sum_i n_i.

    Args:
        weight_key: result meta holding each site's weight in clear (must equal the weight the
            site masked with).
    """

    def __init__(self, weight_key: str = "n_samples"):
        super().__init__()
        self.weight_key = weight_key
        self.known_weights: dict[str, float] = {}  # clear weights seen so far, kept across rounds
        self._expected: Optional[MaskContext] = None
        self.reset_stats()

    @property
    def expected(self) -> Optional[MaskContext]:
        return self._expected

    def expect(self, context: Optional[MaskContext]) -> None:
        """The attempt the workflow just sent: its participant list is the authoritative one."""
        self._expected = context
        self.reset_stats()

    def reset_stats(self):
        self._sum: dict[str, np.ndarray] = {}
        self._context_id: Optional[str] = None
        self._context: Optional[MaskContext] = None
        self._info: Optional[dict] = None
        self._weights: dict[str, float] = {}
        self._site_metrics: dict[str, dict] = {}
        self._site_privacy: dict[str, dict] = {}

    def _refuse(self, site: str, reason: str) -> None:
        self.warning(f"masked update from {site} refused: {reason}")

    def accept_model(self, model: FLModel):
        meta = model.meta or {}
        site = meta.get("client_name") or meta.get(FLMetaKey.SITE_NAME) or "?"
        info = meta.get(MASKED_META_KEY)
        if not isinstance(info, dict):
            return self._refuse(site, "it is not masked (this job aggregates masked updates only)")
        try:
            context = check_masked_meta(info)
        except MaskingError as err:
            return self._refuse(site, str(err))
        if self._expected is not None and info.get("context_id") != self._expected.context_id:
            return self._refuse(site, f"masked for round {context.round} attempt {context.attempt}, not the current "
                                      f"round {self._expected.round} attempt {self._expected.attempt}")
        if self._context_id is not None and info.get("context_id") != self._context_id:
            return self._refuse(site, "its mask context differs from the other sites'")
        if site not in context.participants:
            return self._refuse(site, f"not in the attempt's participant list {list(context.participants)}")
        if site in self._weights:
            return self._refuse(site, "second update in this attempt")
        params = model.params or {}
        if layout_digest(layout_of(params)) != info.get("layout_sha256"):
            return self._refuse(site, "parameter names or shapes differ from what was masked")
        if self._info is not None and info["layout_sha256"] != self._info["layout_sha256"]:
            return self._refuse(site, "parameter names or shapes differ from the other sites'")
        if any(np.asarray(v).dtype != np.uint32 for v in params.values()):
            return self._refuse(site, "payload is not uint32 ring elements")
        weight = float(info.get("weight", 0))
        clear_weight = meta.get(self.weight_key)
        if weight <= 0 or clear_weight is None or not np.isclose(float(clear_weight), weight, rtol=0, atol=1e-9):
            return self._refuse(site, f"masked weight {weight} does not match its clear "
                                      f"'{self.weight_key}' {clear_weight}")

        for name, value in params.items():
            value = np.asarray(value, dtype=np.uint32)
            if name in self._sum:
                np.add(self._sum[name], value, out=self._sum[name])  # wraps: addition in Z_2^32
            else:
                self._sum[name] = value.copy()
        self._context_id, self._context, self._info = info["context_id"], context, info
        self._weights[site] = weight
        self.known_weights[site] = weight
        if model.metrics:
            self._site_metrics[site] = dict(model.metrics)
        privacy = {k: meta[k] for k in ("dp_epsilon_round", "dp_epsilon_total", "dp_delta") if k in meta}
        if privacy:
            self._site_privacy[site] = privacy

    def aggregate_model(self) -> FLModel:
        context = self._expected or self._context
        if context is None:
            raise MaskingError("no masked update was received this round")
        received = sorted(self._weights)
        missing = sorted(set(context.participants) - set(received))
        if missing:
            self.reset_stats()
            raise MaskedRoundIncomplete(round_=context.round, attempt=context.attempt, missing=missing,
                                        received=received)
        weight_sum = sum(self._weights.values())
        if weight_sum > context.total_weight * (1 + 1e-12):
            self.reset_stats()
            raise MaskRangeExceeded(f"round {context.round} attempt {context.attempt}: the sites' weights add up to "
                                    f"{weight_sum}, over the total_weight {context.total_weight} the fixed point was "
                                    f"sized for; the sum may have wrapped and is discarded")
        params = {name: dequantise_sum(total, weight_sum, context).astype(np.float32)
                  for name, total in self._sum.items()}
        params_type = ParamsType.DIFF if self._info.get("data_kind") == "WEIGHT_DIFF" else ParamsType.FULL
        result = FLModel(params_type=params_type, params=params, metrics=weighted_site_metrics(self._site_metrics),
                         meta={"aggregation": "masked_sum", "participants": received,
                               "site_samples": dict(self._weights), "site_metrics": self._site_metrics,
                               "site_privacy": self._site_privacy, "mask_round": context.round,
                               "mask_attempt": context.attempt})
        self.reset_stats()
        return result


class MaskedFedAvg(FedAvg):
    """FLARE's FedAvg with masked rounds: sends each train task with its mask context and redoes
    an attempt whose masked sum cannot be opened, without the sites that did not deliver.

    Args:
        clip_range: per-coordinate clip c of the sites' updates before quantisation (common to
            all sites; must cover the updates, DP noise included).
        weight_bound: the bound on the sum of weights used while some participant's n_samples is
            not yet known (first round); afterwards the known weights' sum is used.
        max_attempts: attempts per round before the job stops.
        min_participants: fewest sites a redo may have.
        train_timeout: seconds a site has for the train task (0: no limit); a site that has not
            answered by then counts as dropped. Late answers are dropped by FLARE.
        **kwargs: FedAvg's arguments (num_clients, num_rounds, persistor_id, ...). ``aggregator``
            defaults to ``MaskedSumAggregator()``; ``ignore_result_error`` to True (a site that
            fails or declines is handled by the redo).
    """

    def __init__(self, *args, clip_range: float = 1.0, weight_bound: float = 1e5, max_attempts: int = 3,
                 min_participants: int = 2, train_timeout: int = 0, **kwargs):
        kwargs.setdefault("ignore_result_error", True)
        if kwargs.get("aggregator") is None:
            kwargs["aggregator"] = MaskedSumAggregator()
        if not isinstance(kwargs["aggregator"], MaskedSumAggregator):
            raise ValueError("MaskedFedAvg needs a MaskedSumAggregator")
        if not clip_range > 0 or not weight_bound > 0:
            raise ValueError("clip_range and weight_bound must be > 0")
        if max_attempts < 1 or min_participants < 2 or train_timeout < 0:
            raise ValueError("max_attempts must be >= 1, min_participants >= 2, train_timeout >= 0")
        super().__init__(*args, **kwargs)
        self.clip_range = float(clip_range)
        self.weight_bound = float(weight_bound)
        self.max_attempts = int(max_attempts)
        self.min_participants = int(min_participants)
        self.train_timeout = int(train_timeout)
        self._mask_round = None
        self._attempt = 0
        self._last_send: dict = {}

    def _total_weight(self, participants: list[str]) -> float:
        known = self.aggregator.known_weights
        if all(p in known for p in participants):
            return float(sum(known[p] for p in participants))
        return self.weight_bound

    def send_model(self, task_name: str = "train", data: FLModel = None, targets=None, min_responses=None,
                   timeout: int = 0, callback=None) -> None:
        if task_name == self.task_name and data is not None:
            if self.current_round != self._mask_round:
                self._mask_round, self._attempt = self.current_round, 0
            participants = sorted(t if isinstance(t, str) else t.name
                                  for t in (targets or self.engine.get_clients()))
            if len(participants) < self.min_participants:
                raise MaskingError(f"round {self.current_round}: {len(participants)} sites available, fewer than "
                                   f"min_participants={self.min_participants}")
            context = MaskContext(job_id=str(self.fl_ctx.get_job_id()), round=int(self.current_round),
                                  attempt=self._attempt, participants=tuple(participants),
                                  total_weight=self._total_weight(participants), clip_range=self.clip_range)
            data.meta = dict(data.meta or {})
            data.meta[MASK_CONTEXT_KEY] = context.to_meta()
            self.aggregator.expect(context)
            targets, timeout = participants, timeout or self.train_timeout
            self._last_send = {"task_name": task_name, "data": data, "callback": callback, "timeout": timeout}
        super().send_model(task_name=task_name, data=data, targets=targets, min_responses=min_responses,
                           timeout=timeout, callback=callback)

    def _get_aggregated_result(self) -> FLModel:
        while True:
            try:
                return super()._get_aggregated_result()
            except (MaskedRoundIncomplete, MaskRangeExceeded) as err:
                survivors = err.received if isinstance(err, MaskedRoundIncomplete) else \
                    list(self.aggregator.expected.participants)
                if self._attempt + 1 >= self.max_attempts or len(survivors) < self.min_participants:
                    self.error(f"{err}; cannot redo (attempt {self._attempt + 1} of {self.max_attempts}, "
                               f"{len(survivors)} sites left, minimum {self.min_participants}): stopping")
                    raise
                self.warning(f"{err}; redoing round {self.current_round} with {survivors}")
                self._attempt += 1
                self._received_count, self._expected_count = 0, len(survivors)
                self.send_model(task_name=self._last_send["task_name"], data=self._last_send["data"],
                                targets=survivors, timeout=self._last_send["timeout"],
                                callback=self._last_send["callback"])
                while self.get_num_standing_tasks():
                    if self.abort_signal.triggered:
                        raise MaskingError("aborted while redoing a masked round") from err
                    time.sleep(self._task_check_period)
