"""The coordinator's half of secure aggregation: FedAvg whose every round is a SecAgg round
(:mod:`clinfed.privacy.secagg` documents the protocol; the sites run
:class:`clinfed.executors.secagg_client.SecAggClient`).

Per round, two FLARE tasks: ``train`` with the global model and the relayed encrypted shares to
the sites whose setup arrived (U2), and ``secagg_unmask`` to the sites whose masked input arrived
(U3), which also carries the next round's context: each site answers the unmask request and sets
up the next round in one reply. The first round, and any site of a round that brought no setup
with its last unmask answer (it had dropped), get a ``secagg_setup`` task first. The masked
inputs are summed in Z_2^32 as they arrive; the sum opens only with t unmask answers. A site
that drops at any stage is simply left out of the next one: nobody retrains, nobody uploads
twice. With fewer than t sites at a stage the round is abandoned, nothing is published, and the
job stops with the reason.

Built on FLARE's public controller API (``ModelController``: ``send_model_and_wait``,
``send_model``, ``update_model``, ``save_model``) and fires the round events the widgets listen
to (``ROUND_STARTED``, ``BEFORE_AGGREGATION``, ``AFTER_AGGREGATION`` with the result).
"""

from __future__ import annotations

import os
import time

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.base_fedavg import BaseFedAvg
from nvflare.fuel.utils import fobs
from nvflare.fuel.utils.log_utils import center_message

from clinfed.aggregators.fedavg import weighted_site_metrics
from clinfed.ledger.settings import ledger_job_id
from clinfed.privacy import secagg
from clinfed.privacy.errors import SecAggRefused


# Later rounds size the fixed point for the sites' last weights plus this much growth.
WEIGHT_HEADROOM = 1.1


class SecAggFedAvg(BaseFedAvg):
    """FedAvg over secure aggregation.

    Args:
        num_clients: sites sampled per round (all connected sites when they are fewer).
        num_rounds: federated rounds.
        persistor_id: the global model's persistor (``""`` with ``model`` for tests).
        model: initial parameters instead of a persistor; the model is then saved with FOBS as
            ``FL_global_model.pt`` in the run folder.
        threshold: t, the fewest sites whose answers open a round; default more than half the
            sampled sites. Each site refuses a t below its own policy's minimum.
        encoding: ``exact`` (updates as they are) or ``dp`` (each site clips to ``clip`` in L2 and
            adds Skellam noise of ``noise_multiplier`` inside the mask).
        clip: per-coordinate range (exact) or L2 bound of a site's update (dp).
        weight_bound: a bound on the sum of the sites' ``n_samples`` (W of the encoding) while some
            site's weight is not known yet (first round); later rounds use the sites' last clear
            weights with 10% headroom, which keeps the fixed point fine. A round whose weights
            exceed its bound is abandoned (its sum may have wrapped).
        noise_multiplier: sigma of the dp encoding's noise on the sum.
        setup_timeout, train_timeout, unmask_timeout: seconds a site has for each stage (0: no
            limit); a site that has not answered by then has dropped.
        task_check_period: seconds between checks for results.
    """

    def __init__(self, *, num_clients: int = 3, num_rounds: int = 5, persistor_id: str = "persistor",
                 model: dict | None = None, threshold: int | None = None, encoding: str = "exact",
                 clip: float = 0.5, weight_bound: float = 1e4, noise_multiplier: float = 0.0,
                 setup_timeout: int = 120, train_timeout: int = 0, unmask_timeout: int = 120,
                 task_check_period: float = 0.05):
        super().__init__(num_clients=num_clients, num_rounds=num_rounds, persistor_id=persistor_id,
                         ignore_result_error=True, task_check_period=task_check_period)
        if not isinstance(num_rounds, int) or num_rounds < 1:
            raise ValueError(f"SecAggFedAvg: 'num_rounds' must be an integer >= 1, got {num_rounds!r}")
        if not isinstance(num_clients, int) or num_clients < 2:
            raise ValueError(f"SecAggFedAvg: 'num_clients' must be an integer >= 2, got {num_clients!r}")
        if threshold is not None and (not isinstance(threshold, int) or threshold < 2):
            raise ValueError(f"SecAggFedAvg: 'threshold' must be an integer >= 2, got {threshold!r}")
        for name, value in (("setup_timeout", setup_timeout), ("train_timeout", train_timeout),
                            ("unmask_timeout", unmask_timeout)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"SecAggFedAvg: '{name}' must be an integer >= 0, got {value!r}")
        try:
            secagg.Encoding(encoding, float(clip), float(weight_bound), float(noise_multiplier))
        except (SecAggRefused, TypeError, ValueError) as err:
            raise ValueError(f"SecAggFedAvg: {err}") from None
        # Kept under their argument names: FLARE's job export reads arguments back from the instance.
        self.persistor_id = persistor_id
        self.task_check_period = task_check_period
        self.model = model
        self.threshold = threshold
        self.encoding = encoding
        self.clip = float(clip)
        self.weight_bound = float(weight_bound)
        self.noise_multiplier = float(noise_multiplier)
        self.setup_timeout, self.train_timeout, self.unmask_timeout = setup_timeout, train_timeout, unmask_timeout
        self._round: secagg.ServerRound | None = None
        self._next: secagg.ServerRound | None = None  # the next round, set up with this round's unmask
        self._masked_sum: np.ndarray | None = None
        self._inputs: dict[str, dict] = {}
        self._known_weights: dict[str, float] = {}

    def run(self) -> None:
        self.info(center_message("Start FedAvg with secure aggregation."))
        self.fl_ctx.set_prop(AppConstants.NUM_ROUNDS, self.num_rounds, private=True, sticky=False)
        model = FLModel(params=self.model) if self.model is not None else self.load_model()
        model.start_round, model.total_rounds = self.start_round, self.num_rounds
        self._wait_for_clients()
        for self.current_round in range(self.start_round, self.start_round + self.num_rounds):
            self.info(center_message(f"Round {self.current_round} started.", boarder_str="-"))
            model.current_round = self.current_round
            self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, self.current_round, private=True, sticky=False)
            self.event(AppEventType.ROUND_STARTED)
            try:
                result = self.secure_round(model)
            except SecAggRefused as err:
                self.panic(f"round {self.current_round} abandoned, nothing published: {err}")
                return
            if result is None:  # aborted
                return
            self.fire_event_with_data(AppEventType.AFTER_AGGREGATION, self.fl_ctx, AppConstants.AGGREGATION_RESULT,
                                      result)
            model = self.update_model(model, result)
            self.save_model(model)
        self.info(center_message("Finished FedAvg with secure aggregation."))

    def _wait_for_clients(self) -> None:
        """Sites may still be registering when the job starts; a round sampled then would leave
        them out (and, with few sites, fall below the sites' minimum)."""
        deadline = time.monotonic() + self.setup_timeout
        while len(self.engine.get_clients()) < self.num_clients and time.monotonic() < deadline:
            if self.abort_signal.triggered:
                return
            time.sleep(self._task_check_period)

    def save_model(self, model: FLModel) -> None:
        if self.persistor:
            super().save_model(model)
        else:
            fobs.dumpf(model, os.path.join(self.get_run_dir(), "FL_global_model.pt"))

    def context_for(self, participants: list[str], round_: int | None = None) -> secagg.RoundContext:
        n = len(participants)
        threshold = self.threshold if self.threshold is not None else n // 2 + 1
        known = [self._known_weights.get(p) for p in participants]
        bound = self.weight_bound if None in known else min(self.weight_bound, WEIGHT_HEADROOM * sum(known))
        encoding = secagg.Encoding(self.encoding, self.clip, bound, self.noise_multiplier)
        round_ = self.current_round if round_ is None else round_
        # The job's ID as its records carry it (simulator runs all share FLARE's "simulate_job").
        return secagg.RoundContext(ledger_job_id(self.fl_ctx.get_job_id()), int(round_), tuple(participants),
                                   min(threshold, n), encoding)

    def _accept_setup(self, server: secagg.ServerRound, sender: str, message) -> None:
        try:
            server.accept_setup(sender, message or {})
        except SecAggRefused as err:
            self.warning(f"round {server.context.round}: {err}")

    def set_up_round(self) -> secagg.ServerRound:
        """This round, its setup complete: set up with the last round's unmask, plus a setup task
        for any listed site that brought none."""
        if self._next is not None and self._next.context.round == self.current_round:
            server, self._next = self._next, None
        else:
            server = secagg.ServerRound(self.context_for(sorted(self.sample_clients(self.num_clients))))
        context = server.context
        missing = [p for p in context.participants if p not in server.setups]
        if missing:
            for reply in self._stage(secagg.SETUP_TASK, {"context": context.to_meta()}, missing, self.setup_timeout):
                self._accept_setup(server, self._sender(reply), reply.meta.get(secagg.META_KEY))
        self._round = server
        return server

    def secure_round(self, model: FLModel) -> FLModel | None:
        """One round; the aggregate (a weight difference), or None when aborted."""
        server = self.set_up_round()
        context = server.context
        share_senders = server.share_senders
        self._require(share_senders, "completed setup", context)

        self._masked_sum, self._inputs = None, {}
        model.meta = dict(model.meta or {})
        model.meta[secagg.META_KEY] = {"context_id": context.context_id, "share_senders": share_senders,
                                       "ciphertexts": server.relay()}
        self.send_model(task_name=AppConstants.TASK_TRAIN, data=model, targets=share_senders,
                        timeout=self.train_timeout, callback=self._accept_masked_input)
        while self.get_num_standing_tasks():
            if self.abort_signal.triggered:
                return None
            time.sleep(self._task_check_period)
        model.meta.pop(secagg.META_KEY)
        survivors = sorted(self._inputs)
        self._require(survivors, "sent a masked input", context)
        weight_sum = sum(i["weight"] for i in self._inputs.values())
        if weight_sum > context.encoding.total_weight:
            raise SecAggRefused(f"the survivors' weights add up to {weight_sum}, over the weight bound "
                                f"{context.encoding.total_weight} the ring was sized for")

        unmask = {"context_id": context.context_id, "survivors": survivors}
        if self.current_round + 1 < self.start_round + self.num_rounds:
            self._next = secagg.ServerRound(self.context_for(sorted(self.sample_clients(self.num_clients)),
                                                             self.current_round + 1))
            unmask["next_context"] = self._next.context.to_meta()
        answers = {}
        for reply in self._stage(secagg.UNMASK_TASK, unmask, survivors, self.unmask_timeout):
            answer = dict(reply.meta.get(secagg.META_KEY) or {})
            if self._next is not None and "next_setup" in answer:
                self._accept_setup(self._next, self._sender(reply), answer.pop("next_setup"))
            answers[self._sender(reply)] = answer
        self.event(AppEventType.BEFORE_AGGREGATION)
        ring = server.unmask(self._masked_sum, survivors, answers)
        layout = self._inputs[survivors[0]]["layout"]
        mean = secagg.decode_sum(ring, weight_sum, context)
        dropped = sorted(set(context.participants) - set(survivors))
        self.info(f"round {context.round}: sum of {survivors} opened" + (f" (dropped: {dropped})" if dropped else ""))
        site_metrics = {s: i["metrics"] for s, i in self._inputs.items() if i["metrics"]}
        return FLModel(params_type=ParamsType.DIFF,
                       params={k: v.astype(np.float32) for k, v in secagg.unflatten(mean, layout).items()},
                       metrics=weighted_site_metrics(site_metrics),
                       meta={"aggregation": "secagg_fedavg", "participants": survivors, "dropped": dropped,
                             "site_samples": {s: i["weight"] for s, i in self._inputs.items()},
                             "site_metrics": site_metrics, "site_privacy": {s: i["privacy"] for s, i in
                                                                            self._inputs.items() if i["privacy"]},
                             "current_round": context.round})

    def _stage(self, task_name: str, meta: dict, targets, timeout: int) -> list[FLModel]:
        task = FLModel(params={}, meta={secagg.META_KEY: meta}, current_round=self.current_round,
                       total_rounds=self.num_rounds)
        return self.send_model_and_wait(task_name=task_name, data=task, targets=list(targets), timeout=timeout)

    @staticmethod
    def _sender(result: FLModel) -> str:
        return str((result.meta or {}).get("client_name", "?"))

    @staticmethod
    def _require(names, what: str, context: secagg.RoundContext) -> None:
        if len(names) < context.threshold:
            raise SecAggRefused(f"only {len(names)} sites {what} ({names}), fewer than the threshold "
                                f"{context.threshold}")

    def _accept_masked_input(self, result: FLModel) -> bool:
        """Add one site's masked input to the ring sum (callback as each result arrives)."""
        site, meta = self._sender(result), result.meta or {}
        info = meta.get(secagg.META_KEY)
        params = result.params or {}
        context = self._round.context
        problem = None
        if not isinstance(info, dict) or info.get("stage") != secagg.STAGE_MASKED_INPUT or \
                info.get("context_id") != context.context_id or info.get("sender") != site:
            problem = "not a masked input for this round"
        elif site in self._inputs or site not in self._round.share_senders:
            problem = "a second input, or from a site that did not complete setup"
        elif any(np.asarray(v).dtype != np.uint32 for v in params.values()):
            problem = "its payload is not ring elements (uint32)"
        else:
            layout = secagg.layout_of(params)
            first = next(iter(self._inputs.values()), None)
            if secagg.layout_digest(layout) != info.get("layout_sha256") or (
                    first is not None and first["layout"] != layout):
                problem = "its parameter names or shapes differ from what was masked or from the other sites'"
            weight = info.get("weight")
            if not isinstance(weight, (int, float)) or weight <= 0 or weight != meta.get("n_samples"):
                problem = problem or f"its masked weight {weight} does not match its clear n_samples"
        if problem:
            self.warning(f"round {context.round}: masked input of {site} refused: {problem}")
            return False
        flat = secagg.ring_of(params, layout)
        if self._masked_sum is None:
            self._masked_sum = flat
        else:
            self._masked_sum += flat  # wraps: addition in Z_2^32
        privacy = {k: meta[k] for k in meta if k.endswith(("epsilon_round", "epsilon_total", "_delta"))}
        self._known_weights[site] = float(weight)
        self._inputs[site] = {"weight": float(weight), "layout": layout, "metrics": dict(result.metrics or {}),
                              "privacy": privacy}
        return True
