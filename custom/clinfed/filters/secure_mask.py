"""Secure masking of a site's update: the server can sum the masked updates of a round's listed
participants, and learns nothing of one site's update (see ``clinfed.privacy.masking``).

The round's mask context (participants, round, attempt, fixed-point range) comes from the server
with the train task, under ``MASK_CONTEXT_KEY`` in the task's DXO meta or headers. FLARE does not
show a result filter the task it answers, so the filter finds the context, in this order:

1. in the result's DXO meta (an executor that copies it from the task), or its headers;
2. where the same filter class saw it pass as a task *data* filter of the same task (list the
   filter under both ``task_data_filters`` and ``task_result_filters`` of the site's scope; on the
   way in it only records the context and changes nothing).

Keys: the site's private key is its ``masking_key_file`` (:mod:`clinfed.site_config`) unless
``private_key_file`` names one; peers' public keys come from the site's audit ledger, where each
site registered its own (``clinfed keys register``), unless a key directory file or class is given.

Example ``local/privacy.json`` scope (FLARE's scope filter lists are flat and apply to every
task; put the update-DP filter, if any, first; ``clinfed consortium provision`` writes these)::

    {"name": "strict",
     "task_data_filters": [{"path": "clinfed.filters.secure_mask.SecureMaskFilter", "args": {}}],
     "task_result_filters": [{"path": "clinfed.filters.secure_mask.SecureMaskFilter", "args": {}}]}
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import FilterKey, FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from clinfed.privacy.accounting import default_privacy_dir
from clinfed.privacy.errors import MaskingError
from clinfed.site_config import site_files
from clinfed.privacy.masking import (
    MASK_CONTEXT_KEY,
    MASKED_META_KEY,
    FileSiteKeyDirectory,
    LedgerSiteKeyDirectory,
    MaskContext,
    SiteKeyDirectory,
    load_private_key,
    mask_update,
)

# The kind of a masked result: uint32 arrays that only make sense summed with the other
# participants'. A distinct kind keeps weight-diff filters and plain FedAvg away from them.
MASKED_DATA_KIND = DataKind.APP_DEFINED

# Contexts seen on the way in, by (site, job, task id); a few tasks at most are in flight.
_SEEN_CONTEXTS: "OrderedDict[tuple, dict]" = OrderedDict()
_SEEN_LOCK = threading.Lock()
_SEEN_MAX = 64
_USED_MAX = 100_000


def _remember_context(key: tuple, context: dict) -> None:
    with _SEEN_LOCK:
        _SEEN_CONTEXTS[key] = copy.deepcopy(context)
        while len(_SEEN_CONTEXTS) > _SEEN_MAX:
            _SEEN_CONTEXTS.popitem(last=False)


def _recall_context(key: tuple) -> dict | None:
    with _SEEN_LOCK:
        return copy.deepcopy(_SEEN_CONTEXTS.get(key))


def _instantiate(class_path: str, args: dict):
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"SecureMaskFilter: 'key_directory_class' must be a full class path, got {class_path!r}")
    return getattr(importlib.import_module(module_name), class_name)(**(args or {}))


class SecureMaskFilter(DXOFilter):
    """Replaces a site's weight difference by its pairwise-masked, weight-scaled fixed-point form.

    Args:
        private_key_file: this site's X25519 private key (PKCS#8 PEM or 64 hex digits, mode 0600).
            A relative path is taken from the site's ``local/`` folder. Default: the site's
            ``masking_key_file`` (:func:`clinfed.site_config.site_files`).
        key_directory_file: JSON ``{"site-1": "<public key hex>", ...}`` (``FileSiteKeyDirectory``);
            relative to ``local/``. Default (neither this nor ``key_directory_class``): the keys
            registered on the site's ledger (``LedgerSiteKeyDirectory``).
        key_directory_class: class path of a ``SiteKeyDirectory``.
        key_directory_args: constructor arguments of ``key_directory_class``.
        min_participants: refuse to mask for fewer listed participants than this (a sum of two
            sites tells each the other's update once the global model is published).
        weight_key: the result meta holding this site's weight (sent in clear).
        state_dir: where the (job, round, attempt) triples this site has masked for are kept, so a
            restarted client still refuses to mask twice under the same masks; default
            ``<site workspace>/clinfed_privacy``. File: ``<state_dir>/masking/<site>.used.json``.
        data_kinds: DXO kinds to mask: ``WEIGHT_DIFF`` (default) and/or ``WEIGHTS``.
    """

    def __init__(self, private_key_file: str | None = None, key_directory_file: str | None = None,
                 key_directory_class: str | None = None, key_directory_args: dict | None = None,
                 min_participants: int = 2, weight_key: str = "n_samples", state_dir: str | None = None,
                 data_kinds: list[str] | None = None):
        super().__init__(supported_data_kinds=[DataKind.WEIGHT_DIFF, DataKind.WEIGHTS],
                         data_kinds_to_filter=data_kinds or [DataKind.WEIGHT_DIFF])
        if private_key_file is not None and (not isinstance(private_key_file, str) or not private_key_file):
            raise ValueError("SecureMaskFilter: 'private_key_file' must be a path")
        if key_directory_file is not None and key_directory_class is not None:
            raise ValueError("SecureMaskFilter: give at most one of 'key_directory_file' and 'key_directory_class'")
        if not isinstance(min_participants, int) or min_participants < 2:
            raise ValueError(f"SecureMaskFilter: 'min_participants' must be an integer >= 2, got {min_participants!r}")
        if key_directory_args is not None and not isinstance(key_directory_args, dict):
            raise ValueError("SecureMaskFilter: 'key_directory_args' must be a dict")
        self.private_key_file = private_key_file
        self.key_directory_file = key_directory_file
        self.key_directory_class = key_directory_class
        self.key_directory_args = key_directory_args or {}
        self.min_participants = min_participants
        self.weight_key = weight_key
        self.state_dir = state_dir
        self._directory: SiteKeyDirectory | None = None
        self._private_key = None
        self._used: set[tuple[str, int, int]] | None = None
        self._lock = threading.Lock()

    # -- setup -----------------------------------------------------------------------------

    @staticmethod
    def _site_path(fl_ctx: FLContext, path: str) -> Path:
        candidate = Path(path)
        if candidate.is_absolute():
            return candidate
        engine = fl_ctx.get_engine()
        workspace = engine.get_workspace() if engine is not None else None
        return Path(workspace.get_site_config_dir()) / candidate if workspace is not None else candidate

    def _keys(self, fl_ctx: FLContext):
        site = fl_ctx.get_identity_name()
        if self._private_key is None:
            if self.private_key_file is not None:
                key_file = self._site_path(fl_ctx, self.private_key_file)
            else:
                key_file = site_files(site, fl_ctx.get_engine().get_workspace().get_site_config_dir()).masking_key_file
            self._private_key = load_private_key(key_file)
        if self._directory is None:
            if self.key_directory_file is not None:
                self._directory = FileSiteKeyDirectory(self._site_path(fl_ctx, self.key_directory_file))
            elif self.key_directory_class is None:
                from clinfed.ledger.settings import ledger_settings, shared_ledger

                settings = ledger_settings(site, site_config_dir=fl_ctx.get_engine().get_workspace().get_site_config_dir())
                if settings is None:
                    raise MaskingError(f"site {site}: peers' masking keys are read from the ledger, and this site has "
                                       f"no ledger configured; or give 'key_directory_file'")
                self._directory = LedgerSiteKeyDirectory(shared_ledger(settings))
            else:
                directory = _instantiate(self.key_directory_class, self.key_directory_args)
                if not isinstance(directory, SiteKeyDirectory):
                    raise MaskingError(f"{self.key_directory_class} has no public_keys() method")
                self._directory = directory
        return self._private_key, self._directory.public_keys()

    def _used_file(self, fl_ctx: FLContext, site: str) -> Path | None:
        if self.state_dir:
            folder = Path(self.state_dir)
        elif fl_ctx.get_engine() is not None:
            folder = default_privacy_dir(fl_ctx)
        else:
            return None
        return folder / "masking" / f"{site}.used.json"

    def _claim_attempt(self, fl_ctx: FLContext, site: str, context: MaskContext) -> None:
        """Two different updates under the same masks would give the server their difference:
        each (job, round, attempt) is masked for once, across client restarts too."""
        key = (context.job_id, context.round, context.attempt)
        path = self._used_file(fl_ctx, site)
        with self._lock:
            if self._used is None:
                self._used = set()
                if path is not None and path.exists():
                    try:
                        self._used = {tuple(k) for k in json.loads(path.read_text())}
                    except (OSError, ValueError) as err:
                        raise MaskingError(f"{path}: unreadable record of masked rounds ({err})") from err
            if key in self._used:
                raise MaskingError(f"site {site}: already masked an update for job {context.job_id} round "
                                   f"{context.round} attempt {context.attempt}; a redo must use a new attempt number")
            self._used.add(key)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                recent = sorted(self._used, key=lambda k: (str(k[0]), k[1], k[2]))[-_USED_MAX:]
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(json.dumps([list(k) for k in recent]))
                os.replace(tmp, path)

    # -- filtering -------------------------------------------------------------------------

    @staticmethod
    def _task_key(fl_ctx: FLContext) -> tuple:
        return (fl_ctx.get_identity_name(), str(fl_ctx.get_job_id()), fl_ctx.get_prop(FLContextKey.TASK_ID))

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) == FilterKey.IN:
            # On the way in (task data): remember the server's mask context; change nothing.
            context = shareable.get_header(MASK_CONTEXT_KEY)
            if context is None:
                try:
                    context = from_shareable(shareable).get_meta_prop(MASK_CONTEXT_KEY)
                except ValueError:  # not a DXO: nothing to remember
                    context = None
            if context is not None:
                _remember_context(self._task_key(fl_ctx), context)
            return shareable
        return super().process(shareable, fl_ctx)

    def _context(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> MaskContext:
        raw = dxo.get_meta_prop(MASK_CONTEXT_KEY)
        if raw is None:
            raw = shareable.get_header(MASK_CONTEXT_KEY)
        if raw is None:
            raw = _recall_context(self._task_key(fl_ctx))
        if raw is None:
            raise MaskingError(f"no '{MASK_CONTEXT_KEY}' (the round's participant list) came with this task: the "
                               f"server's workflow must send it (clinfed.aggregators.masked_sum.MaskedFedAvg does), "
                               f"and this filter must also be a task data filter unless the executor copies it")
        return MaskContext.from_meta(raw, job_id=str(fl_ctx.get_job_id() or "job"))

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        site = fl_ctx.get_identity_name()
        context = self._context(dxo, shareable, fl_ctx)
        if len(context.participants) < self.min_participants:
            raise MaskingError(f"site {site}: round {context.round} lists {len(context.participants)} participants, "
                               f"fewer than this site's minimum of {self.min_participants}")
        weight = dxo.get_meta_prop(self.weight_key)
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise MaskingError(f"site {site}: result meta '{self.weight_key}' must be a positive number, "
                               f"got {weight!r}")
        self._claim_attempt(fl_ctx, site, context)
        private_key, public_keys = self._keys(fl_ctx)
        masked = mask_update(dxo.data, weight=float(weight), site=site, private_key=private_key,
                             public_keys=public_keys, context=context, data_kind=dxo.data_kind)
        if masked.clipped:
            self.log_warning(fl_ctx, f"{masked.clipped} update values were outside the mask clip range "
                                     f"+-{context.clip_range:g} and were clipped; ask for a larger clip_range")
        meta = {k: copy.deepcopy(v) for k, v in dxo.meta.items() if k != MetaKey.FILTER_HISTORY}
        meta[MASKED_META_KEY] = masked.meta
        self.log_info(fl_ctx, f"masked update for round {context.round} attempt {context.attempt} against "
                              f"{len(context.participants) - 1} peers")
        return DXO(data_kind=MASKED_DATA_KIND, data=masked.data, meta=meta)
