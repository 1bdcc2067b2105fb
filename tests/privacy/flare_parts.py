"""A scripted site for the FLARE-process masking test: known updates, and a failure on cue."""

from __future__ import annotations

import zlib

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

MASK_CONTEXT_KEY = "clinfed_mask_context"  # clinfed.privacy.masking.MASK_CONTEXT_KEY


def scripted_update(site: str, round_: int, name: str, shape) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{site}/{round_}/{name}".encode()))
    return rng.normal(0.0, 0.01, shape).astype(np.float32)


class ScriptedUpdateExecutor(Executor):
    """Returns ``scripted_update`` for every parameter of the received model as a weight
    difference with ``n_samples``, no training; fails the train task of ``fail_round`` (first
    attempt only), as a site that dies after receiving the task would. It does not copy the mask
    context into its result: the site's data filter must find it."""

    def __init__(self, n_samples: int, fail_round: int = -1):
        super().__init__()
        self.n_samples = n_samples
        self.fail_round = fail_round

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name != AppConstants.TASK_TRAIN:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        round_ = int(shareable.get_header(AppConstants.CURRENT_ROUND))
        task = from_shareable(shareable)
        attempt = int((task.get_meta_prop(MASK_CONTEXT_KEY) or {}).get("attempt", 0))
        if round_ == self.fail_round and attempt == 0:
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        site = fl_ctx.get_identity_name()
        update = {name: scripted_update(site, round_, name, np.shape(value)) for name, value in task.data.items()}
        return DXO(DataKind.WEIGHT_DIFF, data=update, meta={"n_samples": self.n_samples}).to_shareable()
