"""Server widget recording each round's global model, its participants and the absent sites on
the audit ledger, as the consortium's coordinator.

What is hashed (``model_sha256``)
---------------------------------
The sha256 of the global model *file exactly as the persistor saved it* for the round (for
``PTFileModelPersistor``, ``FL_global_model.pt`` in the server's run folder), read back from disk
right after ``AFTER_LEARNABLE_PERSIST``. A site that downloads the job's result, or anyone handed
the file, recomputes it with ``sha256sum`` or ``clinfed audit verify --model FILE``; a single
changed byte anywhere in the file fails the check. Round r's record is the model after round r's
aggregation (rounds count from 0, as FLARE's ``current_round``).

Events used: ``ROUND_STARTED`` (the round's expected sites: the clients connected then, or
``expected_sites``), ``AFTER_CONTRIBUTION_ACCEPT`` (who was accepted, their epsilon, and the
canonical hash of the update as received, logged for comparison with the site's own record),
``BEFORE_PROCESS_SUBMISSION`` (an error reply, e.g. a site declining because its privacy budget is
spent, or refusing a secure-aggregation stage: the workflow drops those before any accept event),
``AFTER_AGGREGATION`` (participants the aggregator used, method), ``AFTER_LEARNABLE_PERSIST``
(hash and write), ``END_RUN`` (flush the outbox).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.widget import Widget

from clinfed.filters.contribution_record import update_sha256
from clinfed.filters.release_guard import GUARD_HEADER
from clinfed.privacy.secagg import REFUSAL_HEADER
from clinfed.privacy.spend import DECLINE_HEADER, spend_by_unit
from clinfed.ledger import Absence, DuplicateRecord, GlobalModel, LedgerError, sha256_file

_REASON_CHARS = re.compile(r"[^A-Za-z0-9 _.,:;()/-]+")


def _reason(text: str) -> str:
    """An absence reason the contract accepts (200 characters of a limited alphabet)."""
    return _REASON_CHARS.sub(" ", text).strip()[:200]


class LedgerRecorder(Widget):
    """Records global models and absences on the ledger (see the module docstring).

    Args:
        persistor_id: the persistor whose saved global model file is hashed.
        aggregation: method recorded when the aggregation result's meta names none.
        expected_sites: the sites every round is expected from; default: the clients connected
            to the server when the round starts.
        policy: outbox policy for this job, ``async`` or ``strict`` (the round waits for the
            record to commit); default: the server's ledger config.
        required: end the run at start when the server has no ledger configured.
    """

    def __init__(self, persistor_id: str = AppConstants.DEFAULT_PERSISTOR_ID, aggregation: str = "fedavg",
                 expected_sites: list[str] | None = None, policy: str | None = None, required: bool = True):
        super().__init__()
        if policy not in (None, "async", "strict"):
            raise ValueError(f"LedgerRecorder: 'policy' must be 'async' or 'strict', got {policy!r}")
        if expected_sites is not None and (not isinstance(expected_sites, list) or not expected_sites):
            raise ValueError("LedgerRecorder: 'expected_sites' must be a non-empty list of site names")
        self.persistor_id = persistor_id
        self.aggregation = aggregation
        self.expected_sites = expected_sites
        self.policy = policy
        self.required = bool(required)
        self._settings = None
        self._ledger = None
        self._job_id = None
        self._lock = threading.Lock()
        self._expected: dict[int, list[str]] = {}
        self._accepted: dict[int, dict[str, dict]] = {}
        self._refused: dict[int, dict[str, str]] = {}
        self._pending: dict | None = None

    # ------------------------------------------------------------------ events

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        try:
            if event_type == EventType.START_RUN:
                self._start(fl_ctx)
            elif self._ledger is None:
                return
            elif event_type == AppEventType.ROUND_STARTED:
                self._round_started(fl_ctx)
            elif event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT:
                self._contribution(fl_ctx)
            elif event_type == EventType.BEFORE_PROCESS_SUBMISSION:
                self._submission(fl_ctx)
            elif event_type == AppEventType.AFTER_AGGREGATION:
                self._aggregated(fl_ctx)
            elif event_type == AppEventType.AFTER_LEARNABLE_PERSIST:
                self._persisted(fl_ctx)
            elif event_type == EventType.END_RUN:
                self._end(fl_ctx)
        except LedgerError as err:
            # A refusal in strict mode, or a ledger fault without outbox: the round is not recorded.
            self.log_error(fl_ctx, f"ledger: {err}")
            if self.policy == "strict":
                self.system_panic(f"ledger recording failed in strict mode: {err}", fl_ctx)

    def _start(self, fl_ctx: FLContext) -> None:
        from clinfed.ledger.settings import COORDINATOR, ledger_job_id, ledger_settings, shared_ledger

        workspace = fl_ctx.get_engine().get_workspace()
        settings = ledger_settings(COORDINATOR, site_config_dir=workspace.get_site_config_dir())
        if settings is None:
            message = ("no ledger configured for the server (local/clinfed_site.json 'ledger' or $CLINFED_LEDGER); "
                       "global models are not recorded")
            if self.required:
                self.system_panic(message, fl_ctx)
            else:
                self.log_warning(fl_ctx, message)
            return
        self._settings = settings.with_policy(self.policy)
        self._ledger = shared_ledger(self._settings)
        self._job_id = ledger_job_id(fl_ctx.get_job_id())
        self.log_info(fl_ctx, f"recording job {self._job_id} to the {self._settings.describe()}")

    def _round_started(self, fl_ctx: FLContext) -> None:
        round_ = int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
        sites = self.expected_sites or sorted(c.name for c in fl_ctx.get_engine().get_clients())
        with self._lock:
            self._expected[round_] = list(sites)
            self._accepted.setdefault(round_, {})
            self._refused.setdefault(round_, {})

    def _contribution(self, fl_ctx: FLContext) -> None:
        if fl_ctx.get_prop(FLContextKey.TASK_NAME) not in (None, AppConstants.TASK_TRAIN):
            return  # a secure-aggregation stage's message is no contribution
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer is not None else None
        round_ = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        if site is None or round_ is None:
            return
        round_ = int(round_)
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        accepted = bool(fl_ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED))
        if accepted and result is not None:
            info = {}
            try:
                dxo = from_shareable(result)
                info["received_sha256"] = update_sha256(dxo)
                info["spend"] = {unit: epsilon for unit, (epsilon, _) in spend_by_unit(dxo.meta).items()}
            except (ValueError, TypeError) as err:
                self.log_warning(fl_ctx, f"round {round_}: cannot hash the update of {site}: {err}")
            self.log_info(fl_ctx, f"round {round_}: update of {site} received, sha256 "
                                  f"{info.get('received_sha256', '?')}")
            with self._lock:
                self._accepted.setdefault(round_, {})[site] = info
        else:
            reason = "result not accepted"
            if result is not None:
                rc = result.get_return_code()
                if result.get_header(DECLINE_HEADER):
                    reason = "site declined: privacy budget spent"
                elif result.get_header(REFUSAL_HEADER):
                    reason = f"site refused secure aggregation: {result.get_header(REFUSAL_HEADER)}"
                elif result.get_header(GUARD_HEADER):
                    reason = f"strict privacy scope released nothing: {result.get_header(GUARD_HEADER)}"
                elif rc and rc != ReturnCode.OK:
                    reason = f"site returned {rc}"
            with self._lock:  # the reason seen with the reply itself (``_submission``) stays
                self._refused.setdefault(round_, {}).setdefault(site, reason)

    def _submission(self, fl_ctx: FLContext) -> None:
        """Note why a site's reply carries no update (the workflow never shows us error replies)."""
        result = fl_ctx.get_prop(FLContextKey.TASK_RESULT)
        peer = fl_ctx.get_peer_context()
        if result is None or peer is None or result.get_return_code() in (None, ReturnCode.OK):
            return
        if result.get_header(DECLINE_HEADER):
            reason = f"site declined: {result.get_header(DECLINE_HEADER)}"
        elif result.get_header(REFUSAL_HEADER):
            reason = f"site refused secure aggregation: {result.get_header(REFUSAL_HEADER)}"
        elif result.get_header(GUARD_HEADER):
            reason = f"strict privacy scope released nothing: {result.get_header(GUARD_HEADER)}"
        else:
            reason = f"site returned {result.get_return_code()}"
        with self._lock:
            if self._expected:
                self._refused.setdefault(max(self._expected), {})[peer.get_identity_name()] = reason

    def _aggregated(self, fl_ctx: FLContext) -> None:
        result = fl_ctx.get_prop(AppConstants.AGGREGATION_RESULT)
        round_ = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        meta = (result.meta or {}) if isinstance(result, FLModel) else {}
        round_ = int(meta.get("current_round", round_))
        with self._lock:
            accepted = dict(self._accepted.get(round_, {}))
        used = meta.get("site_samples")
        participants = sorted(s for s in accepted if used is None or s in used)
        n_samples = int(sum(float(v) for s, v in used.items() if s in participants)) if isinstance(used, dict) else None
        spends = [accepted[s].get("spend") or {} for s in participants]
        largest = {unit: max((s[unit] for s in spends if unit in s), default=None) for unit in ("patient", "site")}
        with self._lock:
            self._pending = {"round": round_, "participants": participants,
                             "aggregation": str(meta.get("aggregation") or self.aggregation),
                             "n_samples": n_samples, "patient_epsilon": largest["patient"],
                             "site_epsilon": largest["site"],
                             "unused": sorted(set(accepted) - set(participants))}

    def _model_file(self, fl_ctx: FLContext) -> Path | None:
        engine = fl_ctx.get_engine()
        persistor = engine.get_component(self.persistor_id) if self.persistor_id else None
        path = getattr(persistor, "_ckpt_save_path", None)  # PTFileModelPersistor's saved file
        if path and Path(path).is_file():
            return Path(path)
        name = getattr(persistor, "global_model_file_name", None)
        if name:
            run_dir = Path(engine.get_workspace().get_run_dir(fl_ctx.get_job_id()))
            found = sorted(run_dir.rglob(name), key=lambda p: p.stat().st_mtime)
            if found:
                return found[-1]
        return None

    def _persisted(self, fl_ctx: FLContext) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        round_ = pending["round"]
        model_file = self._model_file(fl_ctx)
        if model_file is None:
            self.log_error(fl_ctx, f"round {round_}: cannot find the file persistor '{self.persistor_id}' saved; "
                                   f"global model not recorded")
            return
        with self._lock:
            expected = list(self._expected.get(round_) or [])
            refused = dict(self._refused.get(round_, {}))
        participants = pending["participants"]
        expected = sorted(set(expected) | set(participants))
        if not participants:
            self.log_error(fl_ctx, f"round {round_}: no participant; global model not recorded")
            return
        model = GlobalModel(job_id=self._job_id, round=round_, model_sha256=sha256_file(model_file),
                            participants=participants, aggregation=pending["aggregation"], expected_sites=expected,
                            n_samples=pending["n_samples"], patient_epsilon=pending["patient_epsilon"],
                            site_epsilon=pending["site_epsilon"])
        self._write(self._ledger.record_global_model, model, fl_ctx)
        for site in expected:
            if site in participants:
                continue
            reason = ("update not used by the aggregator" if site in pending["unused"]
                      else refused.get(site, "no result received"))
            self._write(self._ledger.record_absence,
                        Absence(job_id=self._job_id, round=round_, site=site, reason=_reason(reason)), fl_ctx)
        self.log_info(fl_ctx, f"round {round_}: global model {model.model_sha256} ({model_file.name}) recorded with "
                              f"participants {', '.join(participants)}"
                              + (f"; absent: {', '.join(s for s in expected if s not in participants)}"
                                 if len(expected) > len(participants) else ""))

    def _write(self, write, record, fl_ctx: FLContext) -> None:
        try:
            write(record)
        except DuplicateRecord:
            self.log_info(fl_ctx, f"round {record.round}: {type(record).__name__} already on the ledger")

    def _end(self, fl_ctx: FLContext) -> None:
        from clinfed.ledger.settings import release_shared_ledger

        if self._pending is not None:
            self.log_error(fl_ctx, f"round {self._pending['round']}: aggregated but never persisted; its global "
                                   f"model is not recorded")
        remaining = release_shared_ledger(self._settings)
        if remaining:
            self.log_warning(fl_ctx, f"{remaining} ledger write(s) stay queued in the outbox for the next run")
        self._ledger = None
