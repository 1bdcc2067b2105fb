"""The strict scope's last filter: only masked inputs of the task's model, protocol messages and
metrics leave a site."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import make_reply

from clinfed.executors.secagg_client import MASKED_INPUT_DIGEST
from clinfed.filters.contribution_record import update_sha256
from clinfed.filters.release_guard import GUARD_HEADER, ReleaseGuard
from clinfed.privacy import secagg

MODEL = {"conv.weight": np.zeros((2, 3), np.float32), "conv.bias": np.zeros(2, np.float32)}


def _ctx(direction=FilterKey.OUT, masked_by_client=None) -> FLContext:
    """The task's context; ``masked_by_client``: the DXO the site's SecAggClient masked for it."""
    ctx = FLContext()
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, direction, private=True, sticky=False)
    ctx.set_prop(FLContextKey.TASK_NAME, "train", private=True, sticky=False)
    if masked_by_client is not None:
        ctx.set_prop(MASKED_INPUT_DIGEST, update_sha256(masked_by_client), private=True, sticky=False)
    return ctx


def _masked_dxo(data: dict, layout_of=None) -> DXO:
    layout = secagg.layout_of(layout_of or data)
    meta = {secagg.META_KEY: {"stage": secagg.STAGE_MASKED_INPUT, "protocol": secagg.PROTOCOL,
                              "layout_sha256": secagg.layout_digest(layout)}}
    return DXO(DataKind.APP_DEFINED, data=data, meta=meta)


RING = {k: np.arange(v.size, dtype=np.uint32).reshape(v.shape) for k, v in MODEL.items()}


def _refused(result) -> str:
    assert result.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    return result.get_header(GUARD_HEADER)


def test_the_masked_input_the_sites_client_made_is_released():
    masked = _masked_dxo(RING)
    shareable = masked.to_shareable()
    assert ReleaseGuard().process(shareable, _ctx(masked_by_client=masked)) is shareable


@pytest.mark.parametrize("kind", [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF])
def test_an_unmasked_model_is_not_released(kind):
    why = _refused(ReleaseGuard().process(DXO(kind, data=MODEL).to_shareable(), _ctx()))
    assert "not masked" in why


def test_a_masked_label_on_plain_floats_is_not_enough():
    why = _refused(ReleaseGuard().process(_masked_dxo(dict(MODEL)).to_shareable(), _ctx()))
    assert "not ring elements (uint32)" in why


def test_ring_elements_the_client_did_not_mask_are_not_released():
    # A float update's raw bits passed off as ring elements, with the protocol's fields: refused.
    disguised = _masked_dxo({k: v.view(np.uint32) for k, v in MODEL.items()})
    why = _refused(ReleaseGuard().process(disguised.to_shareable(), _ctx(masked_by_client=_masked_dxo(RING))))
    assert "did not make for this task" in why
    why = _refused(ReleaseGuard().process(disguised.to_shareable(), _ctx()))
    assert "did not make for this task" in why


def test_a_masked_input_whose_layout_is_not_the_stated_one_is_not_released():
    other = {"conv.weight": np.zeros((3, 2), np.uint32), "conv.bias": np.zeros(2, np.uint32)}
    masked = _masked_dxo(other, layout_of=MODEL)
    assert "not the ones it states" in _refused(ReleaseGuard().process(masked.to_shareable(),
                                                                        _ctx(masked_by_client=masked)))


def test_protocol_messages_pass_only_without_arrays():
    setup = DXO(DataKind.APP_DEFINED, data={}, meta={secagg.META_KEY: {"stage": secagg.STAGE_SETUP}}).to_shareable()
    assert ReleaseGuard().process(setup, _ctx()) is setup
    smuggling = DXO(DataKind.APP_DEFINED, data={"w": np.ones(3, np.float32)},
                    meta={secagg.META_KEY: {"stage": secagg.STAGE_UNMASK}}).to_shareable()
    assert "carries arrays" in _refused(ReleaseGuard().process(smuggling, _ctx()))


def test_metrics_pass_and_a_collection_needs_every_part_releasable():
    metrics = DXO(data_kind=DataKind.METRICS, data={"dice": 0.5}).to_shareable()
    assert ReleaseGuard().process(metrics, _ctx()) is metrics
    inner = {"m": DXO(data_kind=DataKind.METRICS, data={"dice": 0.5}),
             "w": DXO(data_kind=DataKind.WEIGHTS, data={"w": np.ones(2)})}
    collection = DXO(data_kind=DataKind.COLLECTION, data=inner).to_shareable()
    assert "w: it holds WEIGHTS" in _refused(ReleaseGuard().process(collection, _ctx()))


def test_error_replies_and_incoming_task_data_are_left_alone():
    error = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    assert ReleaseGuard().process(error, _ctx()) is error
    task_data = DXO(DataKind.WEIGHTS, data=MODEL).to_shareable()
    assert ReleaseGuard().process(task_data, _ctx(FilterKey.IN)) is task_data
