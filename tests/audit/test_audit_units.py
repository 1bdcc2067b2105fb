"""The pieces of ledger recording that need no FLARE run: the update hash, where a participant
finds its ledger, consent publication, the contribution filter on its own, chain verification."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants

from audit_helpers import revoke_in_fhir_export
from clinfed import audit
from clinfed.data.synth import synthesise
from clinfed.errors import ConfigError
from clinfed.filters.contribution_record import COHORT_META, ContributionRecorder, update_sha256
from clinfed.ledger import AccessDenied, Absence, Contribution, GlobalModel, LocalLedger
from clinfed.ledger.settings import JOB_ID_ENV, LEDGER_ENV, ledger_settings, release_shared_ledger


def _update() -> dict:
    rng = np.random.default_rng(0)
    return {"b.weight": rng.normal(size=(3, 4)).astype(np.float32), "a.bias": rng.normal(size=4).astype(np.float32),
            "c.count": np.array(7, dtype=np.int64)}


def test_update_hash_is_the_documented_canonical_serialisation():
    data = _update()
    names = sorted(data)
    header = {"format": "clinfed-dxo-v1", "data_kind": DataKind.WEIGHT_DIFF,
              "tensors": [[n, data[n].dtype.newbyteorder("<").str, list(data[n].shape)] for n in names]}
    expected = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode() + b"\n"
                              + b"".join(data[n].astype(data[n].dtype.newbyteorder("<")).tobytes() for n in names))
    assert update_sha256(DXO(DataKind.WEIGHT_DIFF, data=data)) == expected.hexdigest()


def test_update_hash_ignores_order_and_meta_but_not_a_value_a_type_a_name_or_the_kind():
    data = _update()
    digest = update_sha256(DXO(DataKind.WEIGHT_DIFF, data=data, meta={"n_samples": 3}))
    assert update_sha256(DXO(DataKind.WEIGHT_DIFF, data=dict(reversed(list(data.items()))))) == digest
    big_endian = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in data.items()}
    assert update_sha256(DXO(DataKind.WEIGHT_DIFF, data=big_endian)) == digest  # same numbers, same hash
    changed = {k: v.copy() for k, v in data.items()}
    changed["b.weight"][1, 2] = np.nextafter(changed["b.weight"][1, 2], np.float32(10))
    assert update_sha256(DXO(DataKind.WEIGHT_DIFF, data=changed)) != digest
    as_double = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in data.items()}
    assert update_sha256(DXO(DataKind.WEIGHT_DIFF, data=as_double)) != digest
    renamed = {("z.weight" if k == "b.weight" else k): v for k, v in data.items()}
    assert update_sha256(DXO(DataKind.WEIGHT_DIFF, data=renamed)) != digest
    assert update_sha256(DXO(DataKind.WEIGHTS, data=data)) != digest


@pytest.fixture(scope="module")
def one_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("consent_site")
    synthesise(root, 1, 12, (16, 16, 8), 2)  # seed 2: site-1 has active, revoked and no-consent patients
    return root / "site-1"


def test_consent_sync_publishes_pseudonyms_once_and_then_a_revocation_from_the_export(one_site, tmp_path):
    site_dir = tmp_path / "site-1"
    shutil.copytree(one_site, site_dir)
    ledger_path = tmp_path / "ledger.sqlite"
    audit.init_consortium(ledger_path, ["site-1", "site-2"])
    ledger = LocalLedger(ledger_path, "Site1MSP")
    first = audit.sync_consents(site_dir, ledger, "site-1")
    assert first.published == first.active + first.revoked > 0
    assert first.revoked >= 1 and first.no_consent >= 1
    again = audit.sync_consents(site_dir, ledger, "site-1")
    assert (again.published, again.unchanged) == (0, first.published)

    recorded = ledger.consents("clinfed-tumour-seg", site="site-1")
    assert all(c.pseudonym.startswith("p-") and c.recorded_by == "Site1MSP" for c in recorded)
    victim = next(c.pseudonym for c in recorded if c.active)
    revoke_in_fhir_export(site_dir, victim)
    third = audit.sync_consents(site_dir, ledger, "site-1")
    assert (third.published, third.revoked) == (1, first.revoked + 1)
    assert ledger.consent("clinfed-tumour-seg", victim).status == "revoked"
    # Another site's identity cannot publish (or overwrite) site-1's patients' consents.
    revoke_in_fhir_export(site_dir, next(c.pseudonym for c in recorded if c.active and c.pseudonym != victim))
    with pytest.raises(AccessDenied, match="Site2MSP may not"):
        audit.sync_consents(site_dir, LocalLedger(ledger_path, "Site2MSP"), "site-1")


def _fl_ctx(site: str, site_config_dir: Path, job_id: str = "job-unit") -> FLContext:
    fl_ctx = FLContext()
    workspace = SimpleNamespace(get_site_config_dir=lambda: str(site_config_dir))
    fl_ctx.set_prop(ReservedKey.ENGINE, SimpleNamespace(get_workspace=lambda: workspace), private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=True, sticky=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=True, sticky=False)
    return fl_ctx


def test_contribution_recorder_records_what_it_is_given_and_sends_it_unchanged(tmp_path, monkeypatch):
    ledger_path = tmp_path / "ledger.sqlite"
    audit.init_consortium(ledger_path, ["site-1"])
    monkeypatch.setenv(LEDGER_ENV, str(ledger_path))
    monkeypatch.delenv(JOB_ID_ENV, raising=False)
    data = _update()
    original = {k: v.copy() for k, v in data.items()}
    meta = {"n_samples": 9, "train_loss": 0.5, MetaKey.INITIAL_METRICS: {"dice": 0.25, "auc": None},
            COHORT_META: {"n_train": 9, "n_validation": 2, "n_excluded": 1}, "update_dp_epsilon_total": 1.5,
            "update_dp_delta": 1e-5}
    shareable = DXO(DataKind.WEIGHT_DIFF, data=data, meta=meta).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, 4)
    out = ContributionRecorder().process(shareable, _fl_ctx("site-1", tmp_path / "no_config"))
    sent = from_shareable(out)
    assert all(np.array_equal(sent.data[k], original[k]) for k in original)
    (record,) = LocalLedger(ledger_path, "CoordinatorMSP").contributions("job-unit")
    assert (record.round, record.site, record.n_samples, record.site_epsilon, record.site_delta) == (
        4, "site-1", 9, 1.5, 1e-5)
    assert record.patient_epsilon is None  # no DP-SGD ran: the units are never merged
    assert record.update_sha256 == update_sha256(sent) and record.hash_stage == "after_dp"
    assert record.metrics == {"cohort_train": 9, "cohort_validation": 2, "consent_excluded": 1,
                              "received_dice": 0.25, "train_loss": 0.5}
    release_shared_ledger(ledger_settings("site-1"))


def test_contribution_recorder_refuses_to_send_unrecorded(tmp_path, monkeypatch):
    monkeypatch.delenv(LEDGER_ENV, raising=False)
    shareable = DXO(DataKind.WEIGHT_DIFF, data=_update(), meta={"n_samples": 1}).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, 0)
    with pytest.raises(ConfigError, match="no ledger configured"):
        ContributionRecorder().process(shareable, _fl_ctx("site-1", tmp_path))


def test_verify_names_the_round_without_a_model_and_the_site_neither_contributing_nor_absent(tmp_path):
    path = tmp_path / "ledger.sqlite"
    audit.init_consortium(path, ["site-1", "site-2"])
    coordinator, site1 = LocalLedger(path, "CoordinatorMSP"), LocalLedger(path, "Site1MSP")
    digest = hashlib.sha256(b"update").hexdigest()
    for round_ in (0, 2):
        site1.record_contribution(Contribution("job-v", round_, "site-1", digest, 3))
        coordinator.record_global_model(GlobalModel("job-v", round_, digest, ["site-1"], "weighted_fedavg",
                                                    expected_sites=["site-1", "site-2"]))
    coordinator.record_absence(Absence("job-v", 0, "site-2", "no result received"))
    result = audit.verify(coordinator, "job-v")
    assert not result.ok
    assert result.job.problems == ["round 1: no global model recorded",
                                   "round 2: expected site site-2 neither contributed to the model nor was recorded "
                                   "absent"]


def test_ledger_recorder_records_the_model_file_hash_participants_and_the_absent_site(tmp_path, monkeypatch):
    """The server widget, driven with the events FedAvg fires: site-2's task failed in round 0."""
    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.shareable import make_reply
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.app_event_type import AppEventType

    from clinfed.widgets.ledger_recorder import LedgerRecorder

    ledger_path = tmp_path / "ledger.sqlite"
    audit.init_consortium(ledger_path, ["site-1", "site-2"])
    monkeypatch.setenv(LEDGER_ENV, str(ledger_path))
    monkeypatch.setenv(JOB_ID_ENV, "job-widget")
    model_file = tmp_path / "FL_global_model.pt"
    engine = SimpleNamespace(
        get_workspace=lambda: SimpleNamespace(get_site_config_dir=lambda: str(tmp_path / "server_local"),
                                              get_run_dir=lambda job: str(tmp_path)),
        get_clients=lambda: [SimpleNamespace(name="site-1"), SimpleNamespace(name="site-2")],
        get_component=lambda cid: SimpleNamespace(_ckpt_save_path=str(model_file)) if cid == "persistor" else None)
    fl_ctx = _fl_ctx("server", tmp_path)
    fl_ctx.set_prop(ReservedKey.ENGINE, engine, private=True, sticky=False)

    def peer(site):
        ctx = FLContext()
        ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=True, sticky=False)
        fl_ctx.set_prop(ReservedKey.PEER_CTX, ctx, private=True, sticky=False)

    recorder = LedgerRecorder()
    recorder.handle_event(EventType.START_RUN, fl_ctx)
    fl_ctx.set_prop(AppConstants.CURRENT_ROUND, 0, private=True, sticky=False)
    recorder.handle_event(AppEventType.ROUND_STARTED, fl_ctx)
    update = DXO(DataKind.WEIGHT_DIFF, data=_update(), meta={"n_samples": 5})
    peer("site-1")
    fl_ctx.set_prop(AppConstants.TRAINING_RESULT, update.to_shareable(), private=True, sticky=False)
    fl_ctx.set_prop(AppConstants.AGGREGATION_ACCEPTED, True, private=True, sticky=False)
    recorder.handle_event(AppEventType.AFTER_CONTRIBUTION_ACCEPT, fl_ctx)
    peer("site-2")
    fl_ctx.set_prop(AppConstants.TRAINING_RESULT, make_reply(ReturnCode.EXECUTION_EXCEPTION), private=True,
                    sticky=False)
    fl_ctx.set_prop(AppConstants.AGGREGATION_ACCEPTED, False, private=True, sticky=False)
    recorder.handle_event(AppEventType.AFTER_CONTRIBUTION_ACCEPT, fl_ctx)
    fl_ctx.set_prop(AppConstants.AGGREGATION_RESULT, FLModel(params={}, meta={
        "site_samples": {"site-1": 5.0}, "aggregation": "weighted_fedavg", "current_round": 0}), private=True,
        sticky=False)
    recorder.handle_event(AppEventType.AFTER_AGGREGATION, fl_ctx)
    model_file.write_bytes(b"the global model as the persistor saved it")
    recorder.handle_event(AppEventType.AFTER_LEARNABLE_PERSIST, fl_ctx)
    recorder.handle_event(EventType.END_RUN, fl_ctx)

    LocalLedger(ledger_path, "Site1MSP").record_contribution(
        Contribution("job-widget", 0, "site-1", update_sha256(update), 5))
    ledger = LocalLedger(ledger_path, "CoordinatorMSP")
    (model,) = ledger.global_models("job-widget")
    assert model.model_sha256 == hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert (model.participants, model.expected_sites, model.n_samples, model.recorded_by) == (
        ["site-1"], ["site-1", "site-2"], 5, "CoordinatorMSP")
    (absence,) = ledger.absences("job-widget")
    assert (absence.site, absence.round) == ("site-2", 0) and "EXECUTION_EXCEPTION" in absence.reason
    assert audit.verify(ledger, "job-widget", model_file).ok
