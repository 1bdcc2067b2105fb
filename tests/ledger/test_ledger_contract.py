"""The contract's rules, run through every ledger backend (see conftest.BACKENDS)."""

from __future__ import annotations

import base64
import json
import time

import pytest

from clinfed.ledger import (Absence, AccessDenied, Consent, ConsentCommitment, Contribution, DuplicateRecord,
                            GlobalModel, InvalidRecord, LedgerConflict, NotInitialised, RecordNotFound, UnknownMsp,
                            verify_job)
from ledger_helpers import COORDINATOR, OUTSIDER, SITES, digest, pseudonym

JOB = "job-7f3a"


def contribution(site="site-1", round_=0, job=JOB, **kw) -> Contribution:
    values = dict(job_id=job, round=round_, site=site, update_sha256=digest(f"{job}/{round_}/{site}"),
                  n_samples=40, metrics={"train_loss": 0.42, "val_dice": 0.71}, patient_epsilon=1.5,
                  patient_delta=1e-5, site_epsilon=3.0, site_delta=1e-6)
    values.update(kw)
    return Contribution(**values)


def model(round_=0, participants=("site-1", "site-2"), job=JOB, **kw) -> GlobalModel:
    values = dict(job_id=job, round=round_, model_sha256=digest(f"model/{job}/{round_}"),
                  participants=list(participants), aggregation="fedavg", n_samples=80, patient_epsilon=1.5)
    values.update(kw)
    return GlobalModel(**values)


def consent(site="site-1", patient=1, status="active", study="STUDY-GLIOMA-1") -> Consent:
    return Consent(pseudonym=pseudonym(patient), study=study, site=site, status=status,
                   consent_commitment=digest(f"Consent/{patient}/{status}"))


# ------------------------------------------------------------------------------ registry


def test_consortium_is_recorded_by_the_coordinator(consortium):
    registry = consortium.site("site-2").consortium()
    assert registry.coordinator_msp == COORDINATOR
    assert registry.sites == SITES
    assert registry.recorded_by == COORDINATOR and registry.tx_id


def test_consortium_cannot_be_initialised_twice_or_changed(consortium):
    with pytest.raises(DuplicateRecord, match="already initialised"):
        consortium.coordinator.init_consortium(SITES, COORDINATOR)
    with pytest.raises(LedgerConflict, match="cannot be changed"):
        consortium.coordinator.init_consortium({**SITES, "site-4": "Site4MSP"}, COORDINATOR)


def test_only_the_named_coordinator_can_initialise(tmp_path):
    from clinfed.ledger import LocalLedger
    from ledger_helpers import new_local_ledger

    ledger = LocalLedger(new_local_ledger(tmp_path / "fresh.sqlite", init=False), "Site1MSP")
    with pytest.raises(NotInitialised, match="InitConsortium"):
        ledger.record_contribution(contribution())
    with pytest.raises(AccessDenied, match="must be initialised by its coordinator CoordinatorMSP; caller is Site1MSP"):
        ledger.init_consortium(SITES, COORDINATOR)


def test_site_registers_its_own_masking_key_and_everyone_reads_it(consortium):
    key1, key2 = bytes(range(32)), bytes(range(1, 33))
    recorded = consortium.site("site-1").register_site_key("site-1", key1)
    assert recorded.raw == key1 and recorded.recorded_by == "Site1MSP"
    consortium.site("site-2").register_site_key("site-2", key2)
    keys = consortium.coordinator.site_keys()
    assert {s: k.raw for s, k in keys.items()} == {"site-1": key1, "site-2": key2}


def test_nobody_else_can_register_a_sites_masking_key(consortium):
    with pytest.raises(AccessDenied, match="MSP CoordinatorMSP may not register the masking key of site site-1"):
        consortium.coordinator.register_site_key("site-1", bytes(32))
    with pytest.raises(AccessDenied, match="Site2MSP may not register the masking key of site site-1"):
        consortium.site("site-2").register_site_key("site-1", bytes(32))
    with pytest.raises(InvalidRecord, match="32-byte X25519"):
        consortium.site("site-1").register_site_key("site-1", bytes(31))


def test_key_rotation_is_kept_in_history_and_a_repeat_is_a_duplicate(consortium):
    site = consortium.site("site-3")
    site.register_site_key("site-3", b"a" * 32)
    with pytest.raises(DuplicateRecord, match="already registered this key"):
        site.register_site_key("site-3", b"a" * 32)
    site.register_site_key("site-3", b"b" * 32)
    history = site.history("sitekey", site="site-3")
    assert [base64.b64decode(h.value["public_key"]) for h in history] == [b"a" * 32, b"b" * 32]


# ------------------------------------------------------------------------------ contributions


def test_site_records_its_own_contribution(consortium):
    written = consortium.site("site-1").record_contribution(contribution())
    assert written.tx_id and written.timestamp.endswith("Z") and written.recorded_by == "Site1MSP"
    [read] = consortium.coordinator.contributions(JOB)
    assert read == written
    assert read.metrics == {"train_loss": 0.42, "val_dice": 0.71} and read.patient_epsilon == 1.5 and read.site_epsilon == 3.0


def test_site_cannot_write_other_sites_contribution(consortium):
    with pytest.raises(AccessDenied) as err:
        consortium.site("site-2").record_contribution(contribution(site="site-1"))
    assert str(err.value) == ("CLINFED_ACCESS_DENIED: MSP Site2MSP may not record contributions of site site-1, "
                              "which belongs to MSP Site1MSP")
    assert consortium.coordinator.contributions(JOB) == []


def test_coordinator_cannot_write_a_sites_contribution(consortium):
    with pytest.raises(AccessDenied, match="CoordinatorMSP may not record contributions of site site-1"):
        consortium.coordinator.record_contribution(contribution())


def test_unknown_msp_is_rejected(consortium):
    outsider = consortium.open(OUTSIDER)
    attempts = [
        lambda: outsider.record_contribution(contribution()),
        lambda: outsider.put_consent(consent()),
        lambda: outsider.record_global_model(model()),
        lambda: outsider.record_absence(Absence(JOB, 0, "site-3", "timeout")),
        lambda: outsider.register_site_key("site-1", bytes(32)),
    ]
    for attempt in attempts:
        with pytest.raises(UnknownMsp, match="MSP OutsiderMSP is neither a site nor the coordinator"):
            attempt()
    assert consortium.coordinator.job(JOB).contributions == []


def test_duplicate_contribution_is_rejected_and_never_overwritten(consortium):
    site = consortium.site("site-1")
    first = site.record_contribution(contribution())
    with pytest.raises(DuplicateRecord) as err:
        site.record_contribution(contribution())
    assert f"contribution of site site-1 to job {JOB} round 0 is already recorded (tx {first.tx_id}" in str(err.value)
    with pytest.raises(LedgerConflict, match="already recorded .* with different content; records are never "
                                             "overwritten"):
        site.record_contribution(contribution(update_sha256=digest("tampered")))
    assert site.contributions(JOB) == [first]
    assert len(site.history("contribution", job_id=JOB, round=0, site="site-1")) == 1


def test_contribution_fields_are_validated_with_the_field_named(consortium):
    site = consortium.site("site-1")
    cases = {
        "update_sha256 must be 64 lowercase hex digits": dict(update_sha256="ABC"),
        "round must be an integer of at least 0": dict(round_=-1),
        "n_samples must be an integer": dict(n_samples=2.5),
        "patient_epsilon must be a finite number >= 0.0": dict(patient_epsilon=-1.0),
        "site_delta must be a finite number >= 0.0 and < 1.0": dict(site_delta=1.0),
        "metrics.val_dice must be a finite number": dict(metrics={"val_dice": "0.7"}),
        "site site-9 is not registered": dict(site="site-9"),
        "job_id must be a job ID": dict(job="job with spaces"),
    }
    for message, change in cases.items():
        with pytest.raises(InvalidRecord, match=message):
            site.record_contribution(contribution(**change))


def test_contract_refuses_fields_it_does_not_know(consortium):
    raw = json.dumps({**contribution().to_request(), "patient_mrn": "HOSPMRN-00017"})
    with pytest.raises(InvalidRecord, match="unexpected field.*patient_mrn"):
        consortium.site("site-1").submit("RecordContribution", raw)


# ------------------------------------------------------------------------------ global models and absences


def test_coordinator_records_global_models_and_absences(consortium):
    coordinator = consortium.coordinator
    recorded = coordinator.record_global_model(model(expected_sites=["site-1", "site-2", "site-3"]))
    assert recorded.participants == ["site-1", "site-2"] and recorded.recorded_by == COORDINATOR
    absence = coordinator.record_absence(Absence(JOB, 0, "site-3", "timeout after 600 s"))
    job = consortium.site("site-3").job(JOB)
    assert job.global_models == [recorded] and job.absences == [absence]


def test_site_cannot_write_a_global_model_or_an_absence(consortium):
    site = consortium.site("site-1")
    with pytest.raises(AccessDenied, match="only the coordinator CoordinatorMSP may record global models; "
                                           "caller is Site1MSP"):
        site.record_global_model(model())
    with pytest.raises(AccessDenied, match="only the coordinator CoordinatorMSP may record absences"):
        site.record_absence(Absence(JOB, 0, "site-2", "timeout"))
    assert consortium.coordinator.global_models(JOB) == []


def test_duplicate_global_model_and_absence_are_rejected(consortium):
    coordinator = consortium.coordinator
    coordinator.record_global_model(model())
    with pytest.raises(DuplicateRecord, match=f"global model of job {JOB} round 0 is already recorded"):
        coordinator.record_global_model(model())
    with pytest.raises(LedgerConflict, match="different content"):
        coordinator.record_global_model(model(model_sha256=digest("other")))
    coordinator.record_absence(Absence(JOB, 1, "site-3", "dropped"))
    with pytest.raises(DuplicateRecord, match=f"absence of site site-3 from job {JOB} round 1 is already recorded"):
        coordinator.record_absence(Absence(JOB, 1, "site-3", "dropped"))


def test_global_model_participants_must_be_registered_and_expected(consortium):
    with pytest.raises(InvalidRecord, match="site-9 are not registered"):
        consortium.coordinator.record_global_model(model(participants=["site-1", "site-9"]))
    with pytest.raises(InvalidRecord, match=r"participants \['site-2'\] are not among expected_sites"):
        consortium.coordinator.record_global_model(model(expected_sites=["site-1"]))


# ------------------------------------------------------------------------------ consents


def test_site_records_consents_of_its_own_patients_with_history(consortium):
    site = consortium.site("site-1")
    active = site.put_consent(consent())
    revoked = site.put_consent(consent(status="revoked"))
    assert site.consent("STUDY-GLIOMA-1", pseudonym(1)) == revoked
    history = site.history("consent", study="STUDY-GLIOMA-1", pseudonym=pseudonym(1))
    assert [h.value["status"] for h in history] == ["active", "revoked"]
    assert [h.tx_id for h in history] == [active.tx_id, revoked.tx_id]
    assert history[0].timestamp == active.timestamp
    assert consortium.coordinator.consent_counts("STUDY-GLIOMA-1") == {"site-1": {"active": 0, "revoked": 1}}


def test_other_participants_read_commitments_and_counts_not_a_sites_consents(consortium):
    consortium.site("site-1").put_consent(consent("site-1", 1))
    consortium.site("site-1").put_consent(consent("site-1", 2, status="revoked"))
    for reader in (consortium.coordinator, consortium.site("site-2")):
        seen = reader.consents("STUDY-GLIOMA-1")
        assert all(isinstance(c, ConsentCommitment) for c in seen) and len(seen) == 2
        assert {c.consent_commitment for c in seen} == {digest("Consent/1/active"), digest("Consent/2/revoked")}
        assert reader.consent_counts("STUDY-GLIOMA-1") == {"site-1": {"active": 1, "revoked": 1}}
        with pytest.raises(RecordNotFound, match="recorded by your site"):
            reader.history("consent", study="STUDY-GLIOMA-1", pseudonym=pseudonym(1))
    with pytest.raises(AccessDenied, match="only a site reads its patients' consents in full"):
        consortium.coordinator.consent("STUDY-GLIOMA-1", pseudonym(1))
    assert consortium.site("site-2").consent("STUDY-GLIOMA-1", pseudonym(1)) is None
    assert consortium.site("site-2").consents_of(pseudonym(1)) == []
    assert {c.pseudonym for c in consortium.site("site-1").consents("STUDY-GLIOMA-1")} == {pseudonym(1), pseudonym(2)}


def test_repeating_a_consent_unchanged_is_a_duplicate(consortium):
    site = consortium.site("site-1")
    site.put_consent(consent())
    with pytest.raises(DuplicateRecord, match="is already active with this commitment"):
        site.put_consent(consent())


def test_site_cannot_write_other_sites_consent(consortium):
    with pytest.raises(AccessDenied, match="MSP Site2MSP may not record consents of site site-1"):
        consortium.site("site-2").put_consent(consent(site="site-1"))
    consortium.site("site-1").put_consent(consent(site="site-1", patient=5))
    with pytest.raises(AccessDenied, match=f"consent of {pseudonym(5)} for study STUDY-GLIOMA-1 belongs to site "
                                           f"site-1; site site-2 may not change it"):
        consortium.site("site-2").put_consent(consent(site="site-2", patient=5, status="revoked"))
    with pytest.raises(AccessDenied):
        consortium.coordinator.put_consent(consent(site="site-1", patient=6))


@pytest.mark.parametrize("patient_id", ["HOSPMRN-00017", "Vandersloot, Ottilie", "1957-03-01", "p-1234",
                                        "P-" + "A" * 32, "p-" + "g" * 32, "pid-" + "0" * 20, ""])
def test_only_pseudonyms_identify_patients(consortium, patient_id):
    record = Consent(pseudonym=patient_id, study="STUDY-GLIOMA-1", site="site-1", status="active",
                     consent_commitment=digest("c"))
    with pytest.raises(InvalidRecord, match="pseudonym must be a clinfed pseudonym .*never a patient identifier") \
            as err:
        consortium.site("site-1").put_consent(record)
    assert "not shown" in str(err.value) and (not patient_id or patient_id not in str(err.value))  # errors reach logs


def test_consent_with_extra_patient_fields_is_refused(consortium):
    raw = json.dumps({**consent().to_request(), "birth_date": "1957-03-01", "name": "Ottilie Vandersloot"})
    with pytest.raises(InvalidRecord, match="unexpected field.*birth_date, name"):
        consortium.site("site-1").submit("PutConsent", raw)


def test_consent_status_must_be_active_or_revoked(consortium):
    with pytest.raises(InvalidRecord, match="status must be one of active, revoked"):
        consortium.site("site-1").put_consent(consent(status="withdrawn"))


def test_consent_queries_by_study_site_and_pseudonym(consortium):
    s1, s2 = consortium.site("site-1"), consortium.site("site-2")
    s1.put_consent(consent("site-1", 1))
    s1.put_consent(consent("site-1", 1, study="STUDY-OTHER"))
    s2.put_consent(consent("site-2", 2, status="revoked"))
    assert {c.pseudonym for c in s1.consents("STUDY-GLIOMA-1", site="site-1")} == {pseudonym(1)}
    assert [c.pseudonym for c in s2.consents("STUDY-GLIOMA-1", site="site-2")] == [pseudonym(2)]
    assert sorted(c.site for c in s1.consents("STUDY-GLIOMA-1")) == ["site-1", "site-2"]
    assert {c.study for c in s1.consents_of(pseudonym(1))} == {"STUDY-GLIOMA-1", "STUDY-OTHER"}
    assert s1.consent("STUDY-GLIOMA-1", pseudonym(99)) is None


# ------------------------------------------------------------------------------ queries, events, time


def test_queries_by_job_and_by_site(consortium):
    for round_ in range(3):
        for site in ("site-1", "site-2"):
            consortium.site(site).record_contribution(contribution(site, round_))
    consortium.site("site-1").record_contribution(contribution("site-1", 0, job="job-other"))
    reader = consortium.site("site-3")
    assert [(c.round, c.site) for c in reader.contributions(JOB)] == [
        (0, "site-1"), (0, "site-2"), (1, "site-1"), (1, "site-2"), (2, "site-1"), (2, "site-2")]
    assert sorted((c.job_id, c.round) for c in reader.contributions_by_site("site-1")) == [
        (JOB, 0), (JOB, 1), (JOB, 2), ("job-other", 0)]


def test_rounds_are_returned_in_numeric_order(consortium):
    for round_ in (10, 2, 1):
        consortium.coordinator.record_global_model(model(round_))
    assert [m.round for m in consortium.coordinator.global_models(JOB)] == [1, 2, 10]


def test_every_write_emits_one_event_carrying_the_record(consortium):
    coordinator = consortium.coordinator
    start = max((e.block for e in coordinator.events()), default=0) + 1
    written = [
        consortium.site("site-1").register_site_key("site-1", bytes(32)),
        consortium.site("site-1").put_consent(consent()),
        consortium.site("site-1").record_contribution(contribution()),
        coordinator.record_global_model(model(participants=["site-1"])),
        coordinator.record_absence(Absence(JOB, 0, "site-2", "timeout")),
    ]
    with pytest.raises(DuplicateRecord):  # refused transactions emit nothing
        coordinator.record_absence(Absence(JOB, 0, "site-2", "timeout"))
    events = list(coordinator.events(start_block=start))
    assert [e.name for e in events] == ["SiteKeyRegistered", "ConsentRecorded", "ContributionRecorded",
                                        "GlobalModelRecorded", "AbsenceRecorded"]
    assert [e.tx_id for e in events] == [w.tx_id for w in written]
    assert [e.payload["tx_id"] for e in events] == [w.tx_id for w in written]
    assert events[2].payload["update_sha256"] == written[2].update_sha256


def test_timestamps_come_from_the_transaction_header_within_the_allowed_skew(consortium):
    moment = float(int(time.time()) - 120) + 0.25  # what the client puts in the proposal header
    site = consortium.open("Site1MSP", clock=lambda: moment)
    written = site.record_contribution(contribution())
    assert written.timestamp == time.strftime("%Y-%m-%dT%H:%M:%S.250000000Z", time.gmtime(moment))
    [entry] = site.history("contribution", job_id=JOB, round=0, site="site-1")
    assert entry.timestamp == written.timestamp


# ------------------------------------------------------------------------------ job verification


def _complete_job(consortium, rounds=2):
    coordinator = consortium.coordinator
    for round_ in range(rounds):
        for site in ("site-1", "site-2"):
            consortium.site(site).record_contribution(contribution(site, round_))
        coordinator.record_global_model(model(round_, expected_sites=list(SITES)))
        coordinator.record_absence(Absence(JOB, round_, "site-3", "no consented patients"))
    return coordinator


def test_complete_job_verifies_against_its_final_model(consortium):
    coordinator = _complete_job(consortium)
    report = verify_job(coordinator, JOB, model_sha256=digest(f"model/{JOB}/1"))
    assert report.ok, report.problems
    assert (report.rounds, report.final_round, report.model_round, report.records) == (2, 1, 1, 8)


def test_tampered_model_fails_verification_naming_the_round(consortium):
    coordinator = _complete_job(consortium)
    report = verify_job(coordinator, JOB, model_sha256=digest("one byte changed"))
    assert not report.ok
    assert report.problems[0].startswith("round 1: model file sha256")


def test_missing_contribution_or_absence_breaks_the_chain(consortium):
    coordinator = consortium.coordinator
    consortium.site("site-1").record_contribution(contribution("site-1", 0))
    coordinator.record_global_model(model(0, expected_sites=list(SITES)))
    coordinator.record_global_model(model(2, participants=["site-1"]))
    problems = verify_job(coordinator, JOB).problems
    assert "round 0: participant site-2 has no contribution recorded" in problems
    assert "round 0: expected site site-3 neither contributed to the model nor was recorded absent" in problems
    assert "round 1: no global model recorded" in problems
    assert "round 2: participant site-1 has no contribution recorded" in problems
