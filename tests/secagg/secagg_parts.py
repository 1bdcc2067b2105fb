"""Scripted sites and a secure-aggregation job for the FLARE-process tests.

Every site's update is random (independent across sites, known to the test), so any correlation of
what the coordinator holds with one site's update would come from that site's update itself.
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

SIZE = 2000


def scripted_update(site: str, round_: int, name: str, shape) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{site}/{round_}/{name}".encode()))
    return rng.normal(0.0, 0.01, shape).astype(np.float32)


def samples_of(site: str) -> int:
    """Multiples of 5: what a site releases as its weight is rounded up to that bucket."""
    return 5 + 5 * int(site.rsplit("-", 1)[-1])


class ScriptedTrainer(Executor):
    """A site's trainer: ``scripted_update`` as the weight difference, ``n_samples`` by site; fails
    the train task of ``fail_round`` (a site that dies after setup, before its masked input
    arrives), or sleeps ``delay_seconds`` first (a late site)."""

    def __init__(self, fail_round: int = -1, delay_seconds: float = 0.0):
        super().__init__()
        self.fail_round = fail_round
        self.delay_seconds = delay_seconds

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name != AppConstants.TASK_TRAIN:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        round_ = int(shareable.get_header(AppConstants.CURRENT_ROUND))
        if round_ == self.fail_round:
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        time.sleep(self.delay_seconds)
        site = fl_ctx.get_identity_name()
        task = from_shareable(shareable)
        update = {name: scripted_update(site, round_, name, np.shape(value)) for name, value in task.data.items()}
        return DXO(DataKind.WEIGHT_DIFF, data=update, meta={"n_samples": samples_of(site)}).to_shareable()


def weighted_mean(sites, round_: int, name: str = "w", size: int = SIZE) -> np.ndarray:
    total = sum(samples_of(s) for s in sites)
    return sum(samples_of(s) * scripted_update(s, round_, name, size).astype(np.float64) for s in sites) / total


def record(path: str | Path, entry: dict) -> None:
    """Append what a (cheating) coordinator holds to a JSON-lines file the test reads back."""
    with open(path, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
