"""The strict scope's last filter: only masked updates and metrics leave a site."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import make_reply

from clinfed.consortium.release_guard import GUARD_HEADER, ReleaseGuard
from clinfed.privacy.masking import MASKED_META_KEY


def _ctx(direction=FilterKey.OUT) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, direction, private=True, sticky=False)
    ctx.set_prop(FLContextKey.TASK_NAME, "submit_model", private=True, sticky=False)
    return ctx


def _weights(kind=DataKind.WEIGHTS, meta=None):
    return DXO(data_kind=kind, data={"w": np.ones(3, dtype=np.float32)}, meta=meta or {}).to_shareable()


@pytest.mark.parametrize("kind", [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF])
def test_unmasked_model_is_not_released(kind):
    result = ReleaseGuard().process(_weights(kind), _ctx())
    assert result.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "not masked" in result.get_header(GUARD_HEADER)
    assert "w" not in str(result.get("DXO", ""))


def test_masked_update_and_metrics_pass():
    masked = _weights(DataKind.APP_DEFINED, {MASKED_META_KEY: {"round": 0}})
    assert ReleaseGuard().process(masked, _ctx()) is masked
    metrics = DXO(data_kind=DataKind.METRICS, data={"dice": 0.5}).to_shareable()
    assert ReleaseGuard().process(metrics, _ctx()) is metrics


def test_collection_needs_every_part_releasable():
    inner = {"m": DXO(data_kind=DataKind.METRICS, data={"dice": 0.5}),
             "w": DXO(data_kind=DataKind.WEIGHTS, data={"w": np.ones(2)})}
    collection = DXO(data_kind=DataKind.COLLECTION, data=inner).to_shareable()
    assert ReleaseGuard().process(collection, _ctx()).get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR


def test_error_replies_and_incoming_task_data_are_left_alone():
    error = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    assert ReleaseGuard().process(error, _ctx()) is error
    task_data = _weights()
    assert ReleaseGuard().process(task_data, _ctx(FilterKey.IN)) is task_data
