"""The last filter of a site's strict privacy scope: nothing model-shaped leaves unmasked.

FLARE applies a scope's filters to every task of a job, and the DP and masking filters act only on
the data kinds they know (a weight difference). A job that sends no mask context makes the
masking filter fail, which already stops the update; but other tasks return model weights too:
cross-site evaluation's ``submit_model`` asks for the site's *local* model. This guard turns any
result carrying weights or a weight difference that is not masked into an error reply, so under
the strict scope only masked (and, before that, DP-noised) updates and metrics ever leave.

``local/privacy.json`` entry (last in the strict scope's ``task_result_filters``)::

    {"path": "clinfed.consortium.release_guard.ReleaseGuard", "args": {}}
"""

from __future__ import annotations

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply

from clinfed.privacy.masking import MASKED_META_KEY

# What may leave in clear: scores and other non-model data.
RELEASABLE_KINDS = (DataKind.METRICS, DataKind.ANALYTIC, DataKind.STATISTICS, DataKind.PSI)
GUARD_HEADER = "clinfed_release_refused"


class ReleaseGuard(Filter):
    """Replaces an unmasked model-bearing task result by ``TASK_RESULT_FILTER_ERROR``.

    Args:
        releasable_kinds: DXO kinds allowed out in clear (default: metrics and statistics).
    """

    def __init__(self, releasable_kinds: list[str] | None = None):
        super().__init__()
        self.releasable_kinds = tuple(releasable_kinds or RELEASABLE_KINDS)

    def _refuse(self, fl_ctx: FLContext, why: str) -> Shareable:
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME) or "?"
        self.log_error(fl_ctx, f"strict privacy scope: result of task '{task}' not released: {why}")
        reply = make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)
        reply.set_header(GUARD_HEADER, why)
        return reply

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) == FilterKey.IN:
            return shareable
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable  # an error reply carries no data
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - not a DXO: we cannot tell what it holds
            return self._refuse(fl_ctx, "the result is not a DXO, so its content cannot be checked")
        return shareable if self._releasable(dxo) else self._refuse(
            fl_ctx, f"it holds {dxo.data_kind} that is not masked")

    def _releasable(self, dxo) -> bool:
        if dxo.get_meta_prop(MASKED_META_KEY) is not None:
            return True
        if dxo.data_kind == DataKind.COLLECTION:
            return all(self._releasable(d) for d in (dxo.data or {}).values())
        return dxo.data_kind in self.releasable_kinds
