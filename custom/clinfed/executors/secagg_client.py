"""The site's half of secure aggregation: wraps the site's training executor, the way Opacus wraps
a model, and answers the protocol's stages (:mod:`clinfed.privacy.secagg`).

Tasks: ``secagg_setup`` and ``secagg_unmask`` are answered here; ``train`` goes to the wrapped
executor and its weight difference leaves only encoded (with the site's update-level DP noise,
when the round's encoding is ``dp``) and masked; every other task goes to the wrapped executor
unchanged. What this site accepts comes from its own privacy policy
(:func:`clinfed.privacy.policy.site_policy`), never from the job; the masking key is the site's
``masking_key_file`` (:mod:`clinfed.site_config`), which only ever exists at the site.

At ``START_RUN`` the site pins what its own ledger client says of the consortium: organisations,
and the masking keys registered by then. A key registered while the job runs applies from the
next job on.

Job config (the masked job of :mod:`clinfed.jobs.tumour_seg`)::

    {"tasks": ["train", "validate", "secagg_setup", "secagg_unmask"],
     "executor": {"path": "clinfed.executors.secagg_client.SecAggClient",
                  "args": {"trainer": {"path": "clinfed.executors.seg_executor.SegExecutor", "args": {}}}}}
"""

from __future__ import annotations

import copy
import fcntl
import json
import math

import numpy as np
import threading
from pathlib import Path

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from clinfed.filters.contribution_record import update_sha256
from clinfed.privacy import secagg
from clinfed.privacy.accounting import PrivacyBudget, budget_file, compose_epsilon, default_privacy_dir
from clinfed.privacy.errors import PrivacyBudgetExceeded, PrivacyError, SecAggRefused
from clinfed.privacy.policy import DEFAULT_DELTA, site_policy
from clinfed.privacy.release import release_meta
from clinfed.privacy.secagg import REFUSAL_HEADER
from clinfed.privacy.spend import DECLINE_HEADER, UPDATE_DP_DELTA, UPDATE_DP_EPSILON_ROUND, UPDATE_DP_EPSILON_TOTAL
from clinfed.site_config import site_files

UPDATE_DP_MECHANISM = "update_dp"
# FLContext prop (private, this task only): the sha256 of the masked input this component made, so
# the site's release guard lets out those bytes and no others.
MASKED_INPUT_DIGEST = "clinfed_secagg_masked_input_sha256"
MASKED_DATA_KIND = DataKind.APP_DEFINED


class SecAggClient(Executor):
    """Secure aggregation at a site, around the executor that trains.

    Args:
        trainer: the site's training executor (e.g. ``SegExecutor``); it receives every task but
            the protocol's own and knows nothing of masking.
        study: the study whose update-level DP budget (site policy) a ``dp`` round spends.
        private_key_file: this site's X25519 masking key; default the site's ``masking_key_file``.
    """

    def __init__(self, trainer: Executor, study: str = "clinfed-tumour-seg", private_key_file: str | None = None):
        super().__init__()
        if not isinstance(trainer, Executor):
            raise TypeError(f"SecAggClient: 'trainer' must be an Executor, got {type(trainer).__name__}")
        if not isinstance(study, str) or not study:
            raise ValueError("SecAggClient: 'study' must be a non-empty string")
        self.trainer = trainer
        self.study = study
        self.private_key_file = private_key_file
        self._long_term = None
        self._registry: secagg.SiteRegistry | None = None
        self._policy: secagg.SecAggPolicy | None = None
        self._update_dp = None
        self._release = None
        self._not_ready: str | None = None  # why this site cannot take part in this job
        self._rounds: dict[int, secagg.SiteRound] = {}
        self._lock = threading.Lock()

    # -- the job's start: keys, registry, policy --------------------------------------------

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            try:
                self._pin(fl_ctx)
            except (PrivacyError, OSError, ValueError) as err:
                self._not_ready = str(err)
                self.log_error(fl_ctx, f"secure aggregation unavailable at this site for this job: {err}")
        self.trainer.handle_event(event_type, fl_ctx)

    def _pin(self, fl_ctx: FLContext) -> None:
        from clinfed.errors import ConfigError
        from clinfed.ledger.settings import ledger_settings, shared_ledger

        site = fl_ctx.get_identity_name()
        local = fl_ctx.get_engine().get_workspace().get_site_config_dir()
        try:
            key_file = Path(self.private_key_file) if self.private_key_file else site_files(site, local).masking_key_file
            policy = site_policy(site, local)
        except ConfigError as err:
            raise SecAggRefused(str(err)) from None
        self._long_term = secagg.load_private_key(key_file)
        self._policy = policy.secagg_for(self.study)
        self._update_dp = policy.update_dp.get(self.study)
        self._release = policy.release
        settings = ledger_settings(site, site_config_dir=local)
        if settings is None:
            raise SecAggRefused("peers' masking keys are read from this site's ledger, and none is configured")
        self._registry = secagg.SiteRegistry.from_ledger(shared_ledger(settings))
        if self._registry.sites.get(site, (None, None))[1] != secagg.public_key_bytes(self._long_term):
            raise SecAggRefused(f"{key_file}: not the masking key registered on the ledger for {site}; run "
                                f"`clinfed keys register` as this site")
        self.log_info(fl_ctx, f"secure aggregation: {len(self._registry.sites)} sites pinned from the "
                              f"{settings.describe()}; policy from {policy.source}")

    # -- tasks ---------------------------------------------------------------------------------

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in (secagg.SETUP_TASK, AppConstants.TASK_TRAIN, secagg.UNMASK_TASK):
            return self.trainer.execute(task_name, shareable, fl_ctx, abort_signal)
        round_ = shareable.get_header(AppConstants.CURRENT_ROUND)
        try:
            if self._not_ready:
                raise SecAggRefused(self._not_ready)
            message = from_shareable(shareable).get_meta_prop(secagg.META_KEY)
            if not isinstance(message, dict):
                raise SecAggRefused(f"task '{task_name}' carries no '{secagg.META_KEY}' (a job without secure "
                                    f"aggregation at its server)")
            if task_name == secagg.SETUP_TASK:
                return self._setup(message, fl_ctx)
            if task_name == AppConstants.TASK_TRAIN:
                return self._train(message, shareable, fl_ctx, abort_signal)
            return self._unmask(message, fl_ctx)
        except PrivacyBudgetExceeded as err:
            self.log_error(fl_ctx, f"round {round_}: declining: {err}")
            reply = make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
            reply.set_header(DECLINE_HEADER, str(err))
            return reply
        except SecAggRefused as err:
            self.log_error(fl_ctx, f"round {round_} {task_name}: refused: {err}")
            reply = make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
            reply.set_header(REFUSAL_HEADER, str(err))
            return reply

    def _setup(self, message: dict, fl_ctx: FLContext) -> Shareable:
        return self._reply(self._set_up(message.get("context"), fl_ctx))

    def _set_up(self, context_meta, fl_ctx: FLContext) -> dict:
        """Check a round's context and make this site's setup message for it."""
        context = secagg.RoundContext.from_meta(context_meta)
        site = fl_ctx.get_identity_name()
        from clinfed.ledger.settings import ledger_job_id

        secagg.check_context(context, site=site, job_id=ledger_job_id(fl_ctx.get_job_id()), registry=self._registry,
                             policy=self._policy)
        self._claim(fl_ctx, site, context)
        state, reply = secagg.setup(context, site=site, long_term=self._long_term, registry=self._registry)
        with self._lock:
            self._rounds = {r: s for r, s in self._rounds.items() if r >= context.round - 1}
            self._rounds[context.round] = state
        self.log_info(fl_ctx, f"round {context.round}: secure aggregation with {len(context.participants)} sites, "
                              f"threshold {context.threshold}, {context.encoding.kind} encoding; shares sent")
        return reply

    def _state(self, message: dict) -> secagg.SiteRound:
        context_id = message.get("context_id")
        with self._lock:
            for state in self._rounds.values():
                if state.context.context_id == context_id:
                    return state
        raise SecAggRefused("no setup of this site matches the task's round context")

    def _train(self, message: dict, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        state = self._state(message)
        site = state.site
        ciphertexts = (message.get("ciphertexts") or {}).get(site, {})
        secagg.receive_shares(state, share_senders=message.get("share_senders") or [], ciphertexts=ciphertexts,
                              long_term=self._long_term, registry=self._registry, policy=self._policy)
        incoming = from_shareable(shareable)
        expected_layout = secagg.layout_of(incoming.data or {})
        result = self.trainer.execute(AppConstants.TASK_TRAIN, shareable, fl_ctx, abort_signal)
        if result.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return result  # the trainer declined or failed: this site drops out of the round
        update = from_shareable(result)
        if update.data_kind != DataKind.WEIGHT_DIFF:
            raise SecAggRefused(f"the trainer returned {update.data_kind}; only a weight difference is aggregated")
        layout = secagg.layout_of(update.data)
        if layout != expected_layout:
            raise SecAggRefused("the trainer's update does not have the global model's parameter names and shapes")
        # What leaves is what the release policy allows, the weight included (coarsened to its bucket).
        meta = release_meta({k: copy.deepcopy(v) for k, v in update.meta.items() if k != MetaKey.FILTER_HISTORY},
                            self._release)
        weight = meta.get("n_samples")
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise SecAggRefused(f"the trainer's result meta 'n_samples' must be a positive number, got {weight!r}")
        dimension = sum(int(np.prod(shape, dtype=np.int64)) for _, shape in layout)
        meta.update(self._spend_update_dp(state, dimension, fl_ctx))
        noise = self._update_dp.requirement.noise if self._update_dp else "distributed"
        encoded = secagg.encode(update.data, layout, float(weight), state.context, noise=noise)
        if encoded.clipped:
            self.log_warning(fl_ctx, f"round {state.context.round}: the update was clipped to the round's range "
                                     f"({state.context.encoding.kind}, {state.context.encoding.clip:g})")
        masked = secagg.mask(state, encoded.ring)
        meta[secagg.META_KEY] = secagg.masked_meta(state, weight=float(weight), layout=layout)
        dxo = DXO(MASKED_DATA_KIND, data=secagg.unflatten(masked, layout), meta=meta)
        fl_ctx.set_prop(MASKED_INPUT_DIGEST, update_sha256(dxo), private=True, sticky=False)
        reply = dxo.to_shareable()
        reply.set_header(AppConstants.CURRENT_ROUND, state.context.round)
        reply.set_header(FLMetaKey.SITE_NAME, site)
        self.log_info(fl_ctx, f"round {state.context.round}: masked input sent (masked against "
                              f"{len(state.share_senders) - 1} peers and a self-mask)")
        return reply

    def _unmask(self, message: dict, fl_ctx: FLContext) -> Shareable:
        state = self._state(message)
        answer = secagg.unmask_answer(state, message.get("survivors") or [], self._policy)
        dropped = sorted(answer["key_shares"])
        self.log_info(fl_ctx, f"round {state.context.round}: unmask answered for {len(answer['self_seed_shares'])} "
                              f"survivors" + (f", dropped {dropped}" if dropped else ""))
        if message.get("next_context") is not None:  # the next round's setup rides on this reply
            try:
                answer["next_setup"] = self._set_up(message["next_context"], fl_ctx)
            except SecAggRefused as err:
                self.log_error(fl_ctx, f"round {state.context.round + 1} secagg_setup: refused: {err}")
        return self._reply(answer)

    @staticmethod
    def _reply(message: dict) -> Shareable:
        return DXO(DataKind.APP_DEFINED, data={}, meta={secagg.META_KEY: message}).to_shareable()

    # -- update-level DP and one-time claims -------------------------------------------------

    def _spend_update_dp(self, state: secagg.SiteRound, dimension: int, fl_ctx: FLContext) -> dict:
        """Account this round's site-level release before it leaves; nothing for an exact round."""
        encoding = state.context.encoding
        if encoding.kind != "dp":
            return {}
        # A site whose policy sets no update-DP budget still accounts what it releases, uncapped.
        target, delta = ((self._update_dp.epsilon, self._update_dp.delta) if self._update_dp
                         else (math.inf, DEFAULT_DELTA))
        budget = PrivacyBudget(budget_file(default_privacy_dir(fl_ctx), study=self.study, site=state.site,
                                           mechanism=UPDATE_DP_MECHANISM),
                               target_epsilon=target, delta=delta,
                               accountant="skellam", mechanism=UPDATE_DP_MECHANISM, site=state.site, study=self.study)
        event = [(secagg.skellam_noise_multiplier(state.context, dimension), 1.0, 1)]
        total = budget.spend(event, what=f"the update of round {state.context.round}",
                             job_id=state.context.job_id, round_=state.context.round)
        epsilon_round = compose_epsilon(event, budget.delta, "skellam")
        self.log_info(fl_ctx, f"round {state.context.round}: update-level DP (site level, {encoding.noise_multiplier:g} "
                              f"x C={encoding.clip:g}) epsilon {epsilon_round:.4g} this round, {total:.4g} of "
                              f"{budget.target_epsilon:g} spent on study {self.study}")
        return {UPDATE_DP_EPSILON_ROUND: epsilon_round, UPDATE_DP_EPSILON_TOTAL: total, UPDATE_DP_DELTA: budget.delta}

    def _claim(self, fl_ctx: FLContext, site: str, context: secagg.RoundContext) -> None:
        """A site sets up (and so masks) at most once per (job, round), across client restarts."""
        path = default_privacy_dir(fl_ctx) / "secagg" / f"{site}.rounds.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        key = [context.job_id, context.round]
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                claimed = json.loads(path.read_text()) if path.exists() else []
            except ValueError as err:
                raise SecAggRefused(f"{path}: unreadable record of this site's rounds ({err})") from None
            if key in claimed:
                raise SecAggRefused(f"already took part in job {context.job_id} round {context.round}; a site "
                                    f"sets up and masks once per round")
            claimed.append(key)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(claimed[-10_000:]))
            tmp.replace(path)
