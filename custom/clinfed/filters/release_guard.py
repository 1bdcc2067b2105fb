"""The last filter of a site's strict privacy scope: nothing model-shaped leaves unmasked.

FLARE applies a scope's filters to every task of a job, whatever the job. Under the strict scope a
result may leave the site only as one of:

- a masked input of secure aggregation (:mod:`clinfed.privacy.secagg`): ring elements (uint32)
  whose layout is the one the protocol fields state, and whose bytes are exactly the ones this
  site's :class:`~clinfed.executors.secagg_client.SecAggClient` masked for this task (it leaves
  their sha256 in the task's FLContext): no other component can pass data off as masked;
- a protocol message of the setup or unmask stage: no arrays at all;
- scores and other non-model data (metrics, statistics).

Anything else (a weight difference from a job without secure aggregation, the local model that
cross-site evaluation asks for) is replaced by an error reply naming why.

``local/privacy.json`` entry (last in the strict scope's ``task_result_filters``)::

    {"path": "clinfed.filters.release_guard.ReleaseGuard", "args": {}}
"""

from __future__ import annotations

import numpy as np
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply

from clinfed.executors.secagg_client import MASKED_INPUT_DIGEST
from clinfed.filters.contribution_record import update_sha256
from clinfed.privacy import secagg

# What may leave in clear: scores and other non-model data.
RELEASABLE_KINDS = (DataKind.METRICS, DataKind.ANALYTIC, DataKind.STATISTICS, DataKind.PSI)
GUARD_HEADER = "clinfed_release_refused"


class ReleaseGuard(Filter):
    """Replaces a result that would release unmasked model data by ``TASK_RESULT_FILTER_ERROR``.

    Args:
        releasable_kinds: DXO kinds allowed out in clear (default: metrics and statistics).
    """

    def __init__(self, releasable_kinds: list[str] | None = None):
        super().__init__()
        self.releasable_kinds = tuple(releasable_kinds or RELEASABLE_KINDS)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) == FilterKey.IN:
            return shareable
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable  # an error reply carries no data
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - not a DXO: we cannot tell what it holds
            return self._refuse(fl_ctx, "the result is not a DXO, so its content cannot be checked")
        why = self._why_not_releasable(dxo, fl_ctx.get_prop(MASKED_INPUT_DIGEST))
        return shareable if why is None else self._refuse(fl_ctx, why)

    def _why_not_releasable(self, dxo, masked_digest: str | None) -> str | None:
        message = dxo.get_meta_prop(secagg.META_KEY)
        data = dxo.data if isinstance(dxo.data, dict) else {}
        if isinstance(message, dict) and message.get("stage") == secagg.STAGE_MASKED_INPUT:
            if message.get("protocol") != secagg.PROTOCOL:
                return f"a masked input of an unknown protocol {message.get('protocol')!r}"
            if not data or any(np.asarray(v).dtype != np.uint32 for v in data.values()):
                return "a masked input whose payload is not ring elements (uint32)"
            if secagg.layout_digest(secagg.layout_of(data)) != message.get("layout_sha256"):
                return "a masked input whose parameter names or shapes are not the ones it states"
            if masked_digest is None or update_sha256(dxo) != masked_digest:
                return "a masked input that this site's secure-aggregation client did not make for this task"
            return None
        if isinstance(message, dict) and message.get("stage") in (secagg.STAGE_SETUP, secagg.STAGE_UNMASK):
            return None if not data else "a protocol message that carries arrays"
        if dxo.data_kind == DataKind.COLLECTION:
            for name, part in data.items():
                why = self._why_not_releasable(part, masked_digest)
                if why:
                    return f"{name}: {why}"
            return None
        if dxo.data_kind in self.releasable_kinds:
            return None
        return f"it holds {getattr(dxo.data_kind, 'value', dxo.data_kind)} that is not masked"

    def _refuse(self, fl_ctx: FLContext, why: str) -> Shareable:
        task = fl_ctx.get_prop(FLContextKey.TASK_NAME) or "?"
        self.log_error(fl_ctx, f"strict privacy scope: result of task '{task}' not released: {why}")
        reply = make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)
        reply.set_header(GUARD_HEADER, why)
        return reply
