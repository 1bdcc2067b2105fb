"""The site's FLARE executor: trains the fusion model on the site's own consented cohort.

Site data come from the site, never from the job: ``local/clinfed_site.json`` in the site's
workspace (``{"data_dir": ..., "secret_file": ...}``), or, for simulator runs,
``$CLINFED_DATA_ROOT/<site name>``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from clinfed.data.ingest import ingest_site
from clinfed.data.profiles import STUDY_ID
from clinfed.data.pseudonym import Pseudonymiser
from clinfed.errors import ConfigError
from clinfed.training import (
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

SITE_CONFIG_FILE = "clinfed_site.json"
DATA_ROOT_ENV = "CLINFED_DATA_ROOT"


class SegExecutor(Executor):
    """Tasks ``train`` (returns the weight difference), ``validate`` and ``submit_model``.

    Args:
        study: research study whose active consent a patient needs to be trained on.
        local_epochs: epochs over the site's training split per round.
        batch_size: volumes per step.
        lr: Adam learning rate (optimiser state is reset each round, as in FedAvg).
        roi: volume size the model sees (X, Y, Z); each side divisible by 16.
    """

    def __init__(self, study: str = STUDY_ID, local_epochs: int = 2, batch_size: int = 2, lr: float = 5e-3,
                 roi: list[int] | tuple[int, int, int] = (32, 32, 16)):
        super().__init__()
        if local_epochs < 1 or batch_size < 1 or lr <= 0:
            raise ValueError("local_epochs and batch_size must be >= 1 and lr > 0")
        if len(roi) != 3 or any(int(s) % 16 for s in roi):
            raise ValueError(f"roi must be three sizes divisible by 16, got {roi}")
        self.study = study
        self.config = TrainConfig(epochs=local_epochs, batch_size=batch_size, lr=lr,
                                  roi=tuple(int(s) for s in roi))
        self.device = device_for_training()
        self.model = None
        self.train_loader = None
        self.val_loader = None
        self.n_train = 0

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self._load_cohort(fl_ctx)

    def _site_data(self, fl_ctx: FLContext) -> tuple[Path, Path | None]:
        site = fl_ctx.get_identity_name()
        config_file = Path(fl_ctx.get_engine().get_workspace().get_site_config_dir()) / SITE_CONFIG_FILE
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            if "data_dir" not in config:
                raise ConfigError(f"{config_file}: field 'data_dir' is missing")
            secret = config.get("secret_file")
            return Path(config["data_dir"]), Path(secret) if secret else None
        if os.environ.get(DATA_ROOT_ENV):
            return Path(os.environ[DATA_ROOT_ENV]) / site, None
        raise ConfigError(f"site {site}: no {config_file} and ${DATA_ROOT_ENV} is not set; "
                          f"tell clinfed where this site's data lives")

    def _load_cohort(self, fl_ctx: FLContext) -> None:
        data_dir, secret_file = self._site_data(fl_ctx)
        ingestion = ingest_site(data_dir, self.study, Pseudonymiser.for_site(data_dir, secret_file))
        train, val = split_cases(ingestion.cases)
        report = ingestion.report()
        # Counts and reasons only: the cohort log carries pseudonyms at most, never patient data.
        self.log_info(fl_ctx, f"cohort for study {self.study}: {len(train)} train, {len(val)} validation, "
                              f"excluded {report['excluded_by_reason']}")
        if not train:
            raise ConfigError(f"{data_dir}: no usable patients for study {self.study}")
        self.n_train = len(train)
        self.train_loader = make_loader(train, self.config, train=True)
        self.val_loader = make_loader(val, self.config, train=False) if val else None
        self.model = new_model().to(self.device)

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
        global_weights = {k: np.asarray(v) for k, v in incoming.data.items()}
        load_numpy_state(self.model, global_weights)
        # Metrics of the model as received: the server selects the best global model with them.
        received_metrics = self._validate()
        started = time.perf_counter()
        stats = train_epochs(self.model, self.train_loader, self.config, should_abort=lambda: abort_signal.triggered)
        if stats["aborted"] or abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        local = state_to_numpy(self.model)
        diff = {k: local[k] - global_weights[k] for k in global_weights}
        current_round = shareable.get_header(AppConstants.CURRENT_ROUND)
        self.log_info(fl_ctx, f"round {current_round}: trained {stats['steps']} steps in "
                              f"{time.perf_counter() - started:.1f}s, loss {stats['loss']:.4f}, "
                              f"received model {received_metrics}")
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: self.n_train, MetaKey.INITIAL_METRICS: received_metrics,
                "n_samples": self.n_train, "train_loss": stats["loss"],
                "train_seconds": time.perf_counter() - started}
        return DXO(DataKind.WEIGHT_DIFF, data=diff, meta=meta).to_shareable()

    def _validate_task(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        incoming = from_shareable(shareable)
        if incoming.data_kind != DataKind.WEIGHTS:
            return make_reply(ReturnCode.BAD_TASK_DATA)
        trained = state_to_numpy(self.model)
        load_numpy_state(self.model, incoming.data)
        metrics = self._validate()
        load_numpy_state(self.model, trained)  # validating another model must not change ours
        owner = shareable.get_header(AppConstants.MODEL_OWNER, "?")
        self.log_info(fl_ctx, f"validated model of {owner}: {metrics}")
        return DXO(DataKind.METRICS, data=metrics).to_shareable()
