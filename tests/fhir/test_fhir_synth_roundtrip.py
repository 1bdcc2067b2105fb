"""Synthetic FHIR is valid R4 and harmonises back to the patients it was made from."""

from __future__ import annotations

import json

import pytest
from fhir.resources.R4B import get_fhir_model_class

from clinfed.data.profiles import SITE_PROFILES, STUDY_ID
from clinfed.data.study import load_study
from clinfed.data.synth_fhir import RESOURCE_TYPES, fhir_resources_for, write_bulk_export
from fhir_adapter import consent_sha256, harmonise_site

PROFILE_IDS = [f"{p.name}-{p.glucose_unit}-{p.creatinine_unit}-{p.diagnosis_system}" for p in SITE_PROFILES]

LIVER = load_study("clinfed-tumour-seg").fhir


@pytest.mark.parametrize("profile", SITE_PROFILES, ids=PROFILE_IDS)
def test_synthetic_resources_validate_as_r4(profile, make_patient):
    for i in range(3):
        resources = fhir_resources_for(make_patient(i), profile, STUDY_ID)
        assert set(resources) == set(RESOURCE_TYPES)
        for rtype, items in resources.items():
            for item in items:
                assert item["resourceType"] == rtype
                get_fhir_model_class(rtype).model_validate(item)


@pytest.mark.parametrize("profile", SITE_PROFILES, ids=PROFILE_IDS)
def test_synthetic_site_harmonises_back_to_ground_truth(profile, tmp_path, make_patient,
                                                        write_site, pseudonymise):
    patients = [make_patient(i) for i in range(6)]  # every consent state, flag and grade
    write_site(tmp_path, patients, profile)
    site = harmonise_site(tmp_path, LIVER, pseudonymise)
    assert site.issues == []
    assert site.resources_read["Patient"] == 6
    assert len(site.rows) == 6
    for p in patients:
        row = site.row(pseudonymise(p.mrn))
        assert tuple(row.as_dict()) == ("pseudonym", "study_instance_uid", *LIVER.feature_names, "outcome",
                                        "consent_status")
        assert row.study_instance_uid == p.study_uid
        assert row.features["age"] == pytest.approx(p.age_at_study, rel=1e-12)
        assert row.features["sex_female"] == int(p.sex == "female")
        assert row.features["glucose"] == pytest.approx(p.glucose_mmol_l, rel=1e-6)
        assert row.features["creatinine"] == pytest.approx(p.creatinine_umol_l, rel=1e-6)
        assert row.features["diabetes"] == int(p.has_diabetes)
        assert row.features["hypertension"] == int(p.has_hypertension)
        assert row.outcome == int(p.high_grade)
        assert row.consent_status == p.consent
        assert site.consents[row.pseudonym].status == p.consent


def test_site_units_and_codes_follow_the_profile(make_patient):
    p = make_patient(0, glucose_mmol_l=5.5, creatinine_umol_l=88.42)
    by_site = {prof.name: fhir_resources_for(p, prof, STUDY_ID) for prof in SITE_PROFILES}

    def lab(site, loinc):
        (obs,) = [o for o in by_site[site]["Observation"] if o["code"]["coding"][0]["code"] == loinc]
        return obs["valueQuantity"]

    assert lab("site-1", "2345-7") == pytest.approx(
        {"value": 5.5 * 18.016, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"})
    assert lab("site-1", "2160-0")["value"] == pytest.approx(88.42 * 113.12 / 10_000)
    assert lab("site-2", "15074-8")["code"] == "mmol/L"
    assert lab("site-2", "14682-9") == pytest.approx(
        {"value": 88.42, "unit": "\u00b5mol/L", "system": "http://unitsofmeasure.org", "code": "umol/L"})
    codes = {site: {c["code"]["coding"][0]["system"] + "|" + c["code"]["coding"][0]["code"]
                    for c in res["Condition"]} for site, res in by_site.items()}
    assert codes["site-1"] == {"http://snomed.info/sct|25370001", "http://snomed.info/sct|44054006",
                               "http://snomed.info/sct|38341003"}
    assert codes["site-2"] == {"http://hl7.org/fhir/sid/icd-10|C22.0", "http://hl7.org/fhir/sid/icd-10|E11.9",
                               "http://hl7.org/fhir/sid/icd-10|I10"}


def test_revocation_is_a_later_deny_consent_and_decides(make_patient, tmp_path, write_site, pseudonymise):
    active, revoked, none = make_patient(0, consent="active"), make_patient(1, consent="revoked"), \
        make_patient(2, consent="none")
    resources = write_site(tmp_path, [active, revoked, none])
    consents = resources["Consent"]
    assert [c["provision"]["type"] for c in consents] == ["permit", "permit", "deny"]
    grant, deny = consents[1], consents[2]
    assert deny["dateTime"] > grant["dateTime"]
    assert grant["scope"]["coding"][0]["code"] == "research"
    assert grant["category"][0]["coding"][0]["code"] == "57016-8"
    assert grant["provision"]["data"] == [{"meaning": "related", "reference": {
        "identifier": {"system": "urn:clinfed:study", "value": STUDY_ID}}}]
    site = harmonise_site(tmp_path, LIVER, pseudonymise)
    assert site.consents[pseudonymise(active.mrn)].consent_sha256 == consent_sha256(consents[0])
    assert site.consents[pseudonymise(revoked.mrn)].consent_sha256 == consent_sha256(deny)
    assert site.consents[pseudonymise(none.mrn)].status == "none"
    assert site.consents[pseudonymise(none.mrn)].consent_sha256 is None


def test_consent_for_another_study_id_counts_as_none(make_patient, tmp_path, write_site, pseudonymise):
    patient = make_patient(0, consent="active")
    write_site(tmp_path, [patient], study_id="some-other-study")
    site = harmonise_site(tmp_path, LIVER, pseudonymise)
    assert site.row(pseudonymise(patient.mrn)).consent_status == "none"
    assert site.issues == []


def test_bulk_export_is_deterministic_compact_ndjson(make_patient, tmp_path):
    patients = [make_patient(i) for i in range(4)]
    for out in ("a", "b"):
        resources = {}
        for p in patients:
            for rtype, items in fhir_resources_for(p, SITE_PROFILES[1], STUDY_ID).items():
                resources.setdefault(rtype, []).extend(items)
        write_bulk_export(resources, tmp_path / out)
    names = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert names == sorted(f"{t}.ndjson" for t in RESOURCE_TYPES)
    for name in names:
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes()
        lines = a.decode("utf-8").splitlines()
        assert len(lines) == len(resources[name.removesuffix(".ndjson")])
        for line in lines:
            assert line == json.dumps(json.loads(line), separators=(",", ":"), ensure_ascii=False)
    patient_lines = (tmp_path / "a" / "Patient.ndjson").read_text(encoding="utf-8").splitlines()
    first = json.loads(patient_lines[0])
    assert first["identifier"][0]["type"]["coding"][0] == {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR", "display": "Medical record number"}
    assert first["identifier"][0]["system"] == SITE_PROFILES[1].mrn_system
    assert len({json.loads(line)["id"] for line in patient_lines}) == 4
