"""The site's FLARE executor: trains the fusion model on the site's own consented cohort.

Site data come from the site, never from the job (:mod:`clinfed.site_config`).

Consent gate: the site ingests its data once, then at every round trains (and validates) only on
the patients whose consent for the study is ``active`` *on the ledger* at that moment, as
published by ``clinfed consent sync``; a patient with no consent record there is not used. A
revocation committed between rounds takes effect at the next round. Each round's cohort goes to
the site log as counts and to ``clinfed_cohort.jsonl`` in the site's run folder as pseudonyms
(one JSON line per task: round, train and validation pseudonyms, exclusions by reason); the
counts travel with the update and are recorded in the contribution's metrics.

Patient-level differential privacy (``dp_target_epsilon``): local training runs as Opacus DP-SGD
(``clinfed.privacy.dp_sgd.SiteDPSGD``: Poisson sampling, per-sample clipping, PRV accountant). The
budget is the site's, from its own privacy policy (:mod:`clinfed.privacy.policy`), for the study
across rounds, jobs and client restarts (kept in the site's ``privacy_dir`` as
``<study>/<site>.dp_sgd.json``). The job's ``dp_target_epsilon`` is what this job asks to spend: a
site whose policy allows less declines every train task with the reason, naming the policy field;
a smaller ask is spent against the site's budget. The noise is planned once per job so that all
its rounds fit. When the next round would not fit, the site declines the task with the reason
(header ``clinfed_privacy_declined``) and sends nothing; the round goes on without it if enough
sites remain, and the ledger records the absence with the reason. The spend travels in the
result's meta and reaches the ledger.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from clinfed import arguments
from clinfed.data.ingest import Case, ingest_site
from clinfed.data.profiles import STUDY_ID
from clinfed.data.pseudonym import Pseudonymiser
from clinfed.errors import ConfigError
from clinfed.privacy.accounting import budget_file, default_privacy_dir, stored_delta
from clinfed.privacy.dp_sgd import SiteDPSGD
from clinfed.privacy.errors import PrivacyBudgetExceeded, PrivacyPolicyRefused
from clinfed.privacy.policy import site_policy
from clinfed.privacy.release import COHORT_META, ROUND_META, release_meta
from clinfed.privacy.spend import DECLINE_HEADER
from clinfed.site_config import SITE_CONFIG_FILE, site_files
from clinfed.training import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_LOCAL_EPOCHS,
    DEFAULT_LR,
    DEFAULT_ROI,
    TrainConfig,
    device_for_training,
    evaluate,
    finite_or_none,
    load_numpy_state,
    make_loader,
    new_model,
    split_cases,
    state_to_numpy,
    train_epochs,
)

COHORT_LOG_FILE = "clinfed_cohort.jsonl"
DP_SGD_EPSILON_ROUND = "dp_sgd_epsilon_round"
REVOKED_ON_LEDGER = "consent revoked on ledger"
NOT_ON_LEDGER = "no consent on ledger"


class SegExecutor(Executor):
    """Tasks ``train`` (returns the weight difference), ``validate`` and ``submit_model``.

    Args:
        study: research study whose active consent a patient needs to be trained on.
        local_epochs: epochs over the site's training split per round.
        batch_size: volumes per step.
        lr: Adam learning rate (optimiser state is reset each round, as in FedAvg).
        roi: volume size the model sees (X, Y, Z); each side divisible by 16.
        ledger_consent: gate the cohort on consents recorded on the ledger (the site's ledger
            config is then required). Off, only the consents in the site's own FHIR export count;
            that is for runs without a ledger, never for a consortium.
        dp_target_epsilon: train with DP-SGD, spending at most this much of the site's budget for
            the study in this job (patient level: one volume per patient); refused by a site whose
            policy allows less. None trains without DP-SGD.
        dp_delta: the guarantee's delta, if the job asks for a smaller one than the site's.
        dp_max_grad_norm: per-sample gradient clipping bound (at most the site's).
        dp_accountant: ``prv`` (default, tighter) or ``rdp``.
    """

    def __init__(self, study: str = STUDY_ID, local_epochs: int = DEFAULT_LOCAL_EPOCHS,
                 batch_size: int = DEFAULT_BATCH_SIZE, lr: float = DEFAULT_LR,
                 roi: list[int] | tuple[int, int, int] = DEFAULT_ROI, ledger_consent: bool = True,
                 dp_target_epsilon: float | None = None, dp_delta: float | None = None,
                 dp_max_grad_norm: float = 1.0, dp_accountant: str = "prv"):
        super().__init__()
        # Checked here, so a bad job config fails at deploy naming the argument (clinfed.arguments).
        # Kept under their argument names: FLARE's job export reads them back from the instance,
        # and silently leaves out any argument it cannot find there.
        self.study = arguments.text("study", study)
        self.local_epochs = arguments.positive_int("local_epochs", local_epochs)
        self.batch_size = arguments.positive_int("batch_size", batch_size)
        self.lr = arguments.positive_number("lr", lr)
        self.roi = arguments.roi("roi", roi)
        self.config = TrainConfig(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr, roi=self.roi)
        self.ledger_consent = arguments.flag("ledger_consent", ledger_consent)
        self.dp_target_epsilon = arguments.optional_positive_number("dp_target_epsilon", dp_target_epsilon)
        self.dp_delta = None if dp_delta is None else arguments.fraction("dp_delta", dp_delta)
        self.dp_max_grad_norm = arguments.positive_number("dp_max_grad_norm", dp_max_grad_norm)
        self.dp_accountant = arguments.choice("dp_accountant", dp_accountant, ("prv", "rdp"))
        self._dp: SiteDPSGD | None = None
        self.device = device_for_training()
        self.model = None
        self.train_loader = None
        self.val_loader = None
        self.n_train = 0
        self.n_val = 0
        self._ingested: tuple[list[Case], list[Case]] = ([], [])
        self._cohort_key = None
        self._cohort_stats: dict = {}
        self._ledger_settings = None
        self._cohort_log: Path | None = None
        self._policy = None  # the site's privacy policy (clinfed.privacy.policy), read at START_RUN

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            try:
                self._load_cohort(fl_ctx)
            except Exception as err:  # a site that cannot train must stop the run, not limp on
                self.system_panic(f"site {fl_ctx.get_identity_name()}: {err}", fl_ctx)
        elif event_type == EventType.END_RUN and self._ledger_settings is not None:
            from clinfed.ledger.settings import release_shared_ledger

            remaining = release_shared_ledger(self._ledger_settings)
            if remaining:
                self.log_warning(fl_ctx, f"{remaining} ledger write(s) stay queued in the outbox for the next run")

    def _load_cohort(self, fl_ctx: FLContext) -> None:
        site = fl_ctx.get_identity_name()
        if self.ledger_consent:
            from clinfed.ledger.settings import ledger_settings

            workspace = fl_ctx.get_engine().get_workspace()
            self._ledger_settings = ledger_settings(site, site_config_dir=workspace.get_site_config_dir())
            if self._ledger_settings is None:
                raise ConfigError(f"site {site}: the consent gate reads consents from the ledger, and none is "
                                  f"configured ('ledger' in local/{SITE_CONFIG_FILE} or $CLINFED_LEDGER)")
            self.log_info(fl_ctx, f"consents are read from the {self._ledger_settings.describe()}")
        local = fl_ctx.get_engine().get_workspace().get_site_config_dir()
        self._policy = site_policy(site, local)
        files = site_files(site, local)
        data_dir = files.data_dir
        ingestion = ingest_site(data_dir, self.study, Pseudonymiser.for_site(data_dir, files.secret_file))
        train, val = split_cases(ingestion.cases)
        report = ingestion.report()
        # Counts and reasons only: the cohort log carries pseudonyms at most, never patient data.
        self.log_info(fl_ctx, f"ingested for study {self.study}: {len(train)} train, {len(val)} validation, "
                              f"excluded {report['excluded_by_reason']}")
        if not train:
            raise ConfigError(f"{data_dir}: no usable patients for study {self.study}")
        self._ingested = (train, val)
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        self._cohort_log = Path(run_dir) / COHORT_LOG_FILE
        self.model = new_model().to(self.device)

    def _consented(self, fl_ctx: FLContext) -> tuple[set[str] | None, set[str]]:
        """Pseudonyms with active and with revoked consent on the ledger (None: gate off)."""
        if not self.ledger_consent:
            return None, set()
        from clinfed.ledger.settings import shared_ledger

        ledger = shared_ledger(self._ledger_settings)
        records = ledger.consents(self.study, site=fl_ctx.get_identity_name())
        return {c.pseudonym for c in records if c.active}, {c.pseudonym for c in records if not c.active}

    def _gate(self, fl_ctx: FLContext, round_, task: str) -> None:
        """Re-check consent on the ledger and (re)build the loaders of the patients who may be used."""
        train_all, val_all = self._ingested
        active, revoked = self._consented(fl_ctx)
        if active is None:
            train, val, excluded = train_all, val_all, {}
        else:
            train = [c for c in train_all if c.pseudonym in active]
            val = [c for c in val_all if c.pseudonym in active]
            excluded = {}
            for case in train_all + val_all:
                if case.pseudonym not in active:
                    reason = REVOKED_ON_LEDGER if case.pseudonym in revoked else NOT_ON_LEDGER
                    excluded.setdefault(reason, []).append(case.pseudonym)
        n_excluded = sum(len(v) for v in excluded.values())
        key = (tuple(c.pseudonym for c in train), tuple(c.pseudonym for c in val))
        if key != self._cohort_key:
            self.train_loader = make_loader(train, self.config, train=True) if train else None
            self.val_loader = make_loader(val, self.config, train=False) if val else None
            self._cohort_key = key
        self.n_train, self.n_val = len(train), len(val)
        self._cohort_stats = {"n_train": len(train), "n_validation": len(val), "n_excluded": n_excluded}
        reasons = ", ".join(f"{r}: {len(p)}" for r, p in sorted(excluded.items()))
        self.log_info(fl_ctx, f"round {round_} {task}: consent gate for study {self.study}: {len(train)} train, "
                              f"{len(val)} validation, {n_excluded} excluded" + (f" ({reasons})" if reasons else ""))
        line = {"round": round_, "task": task, "study": self.study, "consent_source": (
                    "ledger" if active is not None else "fhir"), "train": sorted(key[0]),
                "validation": sorted(key[1]), "excluded": {r: sorted(p) for r, p in excluded.items()},
                **self._cohort_stats}
        if self._cohort_log is not None:
            with self._cohort_log.open("a") as log:
                log.write(json.dumps(line, sort_keys=True) + "\n")
        if task == AppConstants.TASK_TRAIN and not train:
            raise ConfigError(f"site {fl_ctx.get_identity_name()}: round {round_}: no patient has active consent "
                              f"for study {self.study} on the ledger; run `clinfed consent sync` for this site")

    def _validate(self) -> dict:
        if self.val_loader is None:
            return {}
        metrics = evaluate(self.model, self.val_loader)
        return {"dice": finite_or_none(metrics["dice"]), "auc": finite_or_none(metrics["auc"]), "n_val": metrics["n"]}

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        try:
            if task_name == AppConstants.TASK_TRAIN:
                return self._train(shareable, fl_ctx, abort_signal)
            if task_name == AppConstants.TASK_VALIDATION:
                return self._validate_task(shareable, fl_ctx)
            if task_name == AppConstants.TASK_SUBMIT_MODEL:
                return DXO(DataKind.WEIGHTS, data=state_to_numpy(self.model)).to_shareable()
            self.log_error(fl_ctx, f"unknown task {task_name}")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        except Exception as err:  # report to the server instead of killing the site
            self.log_exception(fl_ctx, f"task {task_name} failed: {err}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        incoming = from_shareable(shareable)
        if incoming.data_kind != DataKind.WEIGHTS:
            return make_reply(ReturnCode.BAD_TASK_DATA)
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND)
        self._gate(fl_ctx, current_round, AppConstants.TASK_TRAIN)
        try:
            dp = self._dp_for_round(fl_ctx, shareable)  # plans the job's noise: fails when nothing is left
            if dp is not None:
                dp.check_budget()
        except (PrivacyBudgetExceeded, PrivacyPolicyRefused) as err:
            # Decline: the reason goes to the server, nothing of the model does.
            self.log_error(fl_ctx, f"round {current_round}: declining the train task: {err}")
            reply = make_reply(ReturnCode.EXECUTION_RESULT_ERROR)
            reply.set_header(DECLINE_HEADER, str(err))
            return reply
        global_weights = {k: np.asarray(v) for k, v in incoming.data.items()}
        load_numpy_state(self.model, global_weights)
        # Metrics of the model as received: the server selects the best global model with them.
        started = time.perf_counter()
        received_metrics = self._validate()
        validate_seconds = time.perf_counter() - started
        started = time.perf_counter()
        should_abort = lambda: abort_signal.triggered  # noqa: E731
        if dp is None:
            stats = train_epochs(self.model, self.train_loader, self.config, should_abort=should_abort)
        else:
            self.model.train()  # Opacus refuses a model left in eval mode by the validation above
            optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
            with dp.private_round(self.model, optimizer, self.train_loader, round_=current_round) as private:
                stats = train_epochs(private.model, private.data_loader, self.config, optimizer=private.optimizer,
                                     should_abort=should_abort)
        if stats["aborted"] or abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        local = state_to_numpy(self.model)
        diff = {k: local[k] - global_weights[k] for k in global_weights}
        self.log_info(fl_ctx, f"round {current_round}: trained {stats['steps']} steps in "
                              f"{time.perf_counter() - started:.1f}s, loss {stats['loss']:.4f}, "
                              f"received model {received_metrics}")
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: self.n_train, MetaKey.INITIAL_METRICS: received_metrics,
                "n_samples": self.n_train, "train_loss": stats["loss"],
                "train_seconds": time.perf_counter() - started, "validate_seconds": validate_seconds,
                ROUND_META: current_round,
                COHORT_META: dict(self._cohort_stats)}
        if dp is not None:
            meta.update(dp.report())
            meta[DP_SGD_EPSILON_ROUND] = dp.epsilon_of_round(stats["steps"])
            self.log_info(fl_ctx, f"round {current_round}: DP-SGD epsilon {meta[DP_SGD_EPSILON_ROUND]:.3g} this round, "
                                  f"{dp.epsilon():.3g} of {dp.target_epsilon:g} spent on study {self.study} "
                                  f"(delta {dp.delta:.3g}, noise multiplier {dp.noise_multiplier:.3g})")
        return self._update_reply(fl_ctx, current_round, diff, release_meta(meta, self._policy.release))

    @staticmethod
    def _update_reply(fl_ctx: FLContext, round_, diff: dict, meta: dict) -> Shareable:
        result = DXO(DataKind.WEIGHT_DIFF, data=diff, meta=dict(meta)).to_shareable()
        # Result filters (DP accounting, the contribution record) need the round; the aggregator
        # tells updates apart by site name, which FLARE puts in the model's meta from this header.
        result.set_header(AppConstants.CURRENT_ROUND, round_)
        result.set_header(FLMetaKey.SITE_NAME, fl_ctx.get_identity_name())
        return result

    def _dp_for_round(self, fl_ctx: FLContext, shareable: Shareable) -> SiteDPSGD | None:
        """The DP-SGD accountant for this round's cohort (a new one, re-planned, when consent
        changes the cohort); None when the executor trains without DP-SGD."""
        if self.dp_target_epsilon is None:
            return None
        if self._dp is None or self._dp.n_samples != self.n_train:
            site = fl_ctx.get_identity_name()
            num_rounds = shareable.get_header(AppConstants.NUM_ROUNDS)
            if not num_rounds:
                raise ConfigError(f"site {site}: DP-SGD plans its noise over the job's rounds, and the train "
                                  f"task carries no '{AppConstants.NUM_ROUNDS}' header")
            policy = self._policy.dp_sgd_for(self.study)
            if self.dp_target_epsilon > policy.epsilon:
                raise PrivacyPolicyRefused(
                    f"{policy.field}.epsilon is {policy.epsilon:g} at {site}, and the job asks "
                    f"dp_target_epsilon={self.dp_target_epsilon:g} ({policy.source})")
            path = budget_file(default_privacy_dir(fl_ctx), study=self.study, site=site, mechanism="dp_sgd")
            delta = policy.delta if policy.delta is not None else (
                stored_delta(path) or policy.delta_for(self.n_train))
            self._dp = SiteDPSGD(
                budget_file=path, n_samples=self.n_train, batch_size=self.batch_size, num_rounds=int(num_rounds),
                local_epochs=self.local_epochs, target_epsilon=policy.epsilon, job_epsilon=self.dp_target_epsilon,
                target_delta=min(delta, self.dp_delta) if self.dp_delta else delta,
                max_grad_norm=min(self.dp_max_grad_norm, policy.max_grad_norm), accountant=self.dp_accountant,
                job_id=str(fl_ctx.get_job_id()), site=site, study=self.study)
        return self._dp

    def _validate_task(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        incoming = from_shareable(shareable)
        if incoming.data_kind != DataKind.WEIGHTS:
            return make_reply(ReturnCode.BAD_TASK_DATA)
        self._gate(fl_ctx, shareable.get_header(AppConstants.CURRENT_ROUND), AppConstants.TASK_VALIDATION)
        trained = state_to_numpy(self.model)
        load_numpy_state(self.model, incoming.data)
        metrics = self._validate()
        load_numpy_state(self.model, trained)  # validating another model must not change ours
        owner = shareable.get_header(AppConstants.MODEL_OWNER, "?")
        self.log_info(fl_ctx, f"validated model of {owner}: {metrics}")
        return DXO(DataKind.METRICS, data=self._policy.release.metrics(metrics)).to_shareable()
