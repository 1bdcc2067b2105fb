"""Server widget writing one JSON line per federated round: metrics, participants, seconds.

The metrics in round r's line are what the sites measured on the global model they received
in round r (the model after r aggregations); the demo and reports read this file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

ROUND_LOG_FILE = "clinfed_rounds.jsonl"


class RoundLogWriter(Widget):
    """Args:
        file_name: file in the job's run folder on the server.
    """

    def __init__(self, file_name: str = ROUND_LOG_FILE):
        super().__init__()
        if not file_name or "/" in file_name:
            raise ValueError(f"file_name must be a plain file name, got {file_name!r}")
        self.file_name = file_name
        self._round_started = None
        self._path: Path | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            self._path = Path(run_dir) / self.file_name
        elif event_type == AppEventType.ROUND_STARTED:
            self._round_started = time.perf_counter()
        elif event_type == AppEventType.AFTER_AGGREGATION and self._path is not None:
            result = fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT)
            if not isinstance(result, FLModel):
                return
            meta = result.meta or {}
            record = {
                "round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND),
                "metrics": result.metrics or {},
                "site_metrics": meta.get("site_metrics", {}),
                "participants": sorted(meta.get("site_samples", {})),
                "site_seconds": meta.get("site_seconds", {}),
                "seconds": None if self._round_started is None else time.perf_counter() - self._round_started,
            }
            with self._path.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
