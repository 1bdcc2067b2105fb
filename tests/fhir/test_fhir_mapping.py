"""Harmonisation rules for real-world variation: codings, units, several results, consent history."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from clinfed.data.profiles import STUDY_ID
from clinfed.data.study import load_study
from fhir_adapter import consent_sha256, harmonise_site

SUBJECT = {"reference": "Patient/p1"}
PATIENT = {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-06-15",
           "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                "code": "MR"}]}, "system": "urn:h", "value": "M-778899"}]}
STUDY = {"resourceType": "ImagingStudy", "id": "s1", "status": "available", "subject": SUBJECT,
         "started": "2020-06-15T08:30:00+02:00",
         "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}]}

LIVER = load_study("clinfed-tumour-seg").fhir


def _condition(i, system, code):
    return {"resourceType": "Condition", "id": f"c{i}", "subject": SUBJECT,
            "code": {"coding": [{"system": system, "code": code}]}}


def _lab(i, loinc, quantity, when):
    return {"resourceType": "Observation", "id": f"o{i}", "status": "final", "subject": SUBJECT,
            "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
            "effectiveDateTime": when, "valueQuantity": quantity}


def _consent(i, when, status="active", provision=None):
    return {"resourceType": "Consent", "id": f"k{i}", "status": status, "patient": SUBJECT, "dateTime": when,
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "research"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
            "policyRule": {"text": "study protocol"},
            "provision": provision or {"type": "permit", "data": [_study_data(STUDY_ID)]}}


def _study_data(study_id):
    return {"meaning": "related", "reference": {"identifier": {"system": "urn:clinfed:study", "value": study_id}}}


def _row(tmp_path, pseudonymise, *resources):
    path = tmp_path / "site.ndjson"
    path.write_text("".join(json.dumps(r) + "\n" for r in (PATIENT, STUDY, *resources)))
    site = harmonise_site(path, LIVER, pseudonymise)
    assert site.issues == [], [str(i) for i in site.issues]
    return site.row(pseudonymise("M-778899")), site


@pytest.mark.parametrize("system,codes", [
    ("http://hl7.org/fhir/sid/icd-10", ["C22.0", "E11.9", "I10"]),
    ("http://hl7.org/fhir/sid/icd-10-cm", ["C220", "E11.65", "I10"]),
    ("http://hl7.org/fhir/sid/icd-10-cm", ["C22.8", "E10.9", "I13.0"]),
    ("http://snomed.info/sct", ["25370001", "44054006", "38341003"]),
    ("http://snomed.info/sct", ["93870000", "73211009", "59621000"]),
])
def test_diagnosis_flags_map_across_snomed_icd10_and_subcodes(tmp_path, pseudonymise, system, codes):
    row, _ = _row(tmp_path, pseudonymise, *(_condition(i, system, c) for i, c in enumerate(codes)))
    assert (row.features["diabetes"], row.features["hypertension"]) == (1, 1)


def test_unrelated_or_refuted_conditions_set_no_flag(tmp_path, pseudonymise):
    refuted = _condition(2, "http://snomed.info/sct", "44054006")
    refuted["verificationStatus"] = {"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "refuted"}]}
    row, _ = _row(tmp_path, pseudonymise, _condition(1, "http://hl7.org/fhir/sid/icd-10", "E66.9"),
                  _condition(3, "http://snomed.info/sct", "I10"), refuted)
    assert (row.features["diabetes"], row.features["hypertension"]) == (0, 0)


@pytest.mark.parametrize("quantity,expected", [
    ({"value": 99.0, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}, 99.0 / 18.016),
    ({"value": 99.0, "unit": "mg/dl"}, 99.0 / 18.016),
    ({"value": 5.5, "unit": "mmol/l", "system": "http://unitsofmeasure.org", "code": "mmol/L"}, 5.5),
    ({"value": 5.5, "unit": "mmol/L", "system": "http://example.org/lab-units", "code": "GLU-MMOL"}, 5.5),
])
def test_glucose_units_convert_to_mmol_per_litre(tmp_path, pseudonymise, quantity, expected):
    row, _ = _row(tmp_path, pseudonymise, _lab(1, "2345-7", quantity, "2020-06-15"))
    assert row.features["glucose"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("quantity,expected", [
    ({"value": 1.2, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}, 1.2 * 10_000 / 113.12),
    ({"value": 106, "unit": "\u00b5mol/L", "system": "http://unitsofmeasure.org", "code": "umol/L"}, 106.0),
    ({"value": 106, "unit": "\u00b5mol/L"}, 106.0),
    ({"value": 106, "unit": "\u03bcmol/l"}, 106.0),
    ({"value": 0.106, "unit": "mmol/L"}, 106.0),
])
def test_creatinine_units_convert_to_micromol_per_litre(tmp_path, pseudonymise, quantity, expected):
    row, _ = _row(tmp_path, pseudonymise, _lab(1, "14682-9", quantity, "2020-06-15"))
    assert row.features["creatinine"] == pytest.approx(expected, rel=1e-12)


def test_lab_closest_to_the_study_date_wins(tmp_path, pseudonymise):
    mmol = {"unit": "mmol/L", "system": "http://unitsofmeasure.org", "code": "mmol/L"}
    row, _ = _row(tmp_path, pseudonymise,
                  _lab(1, "15074-8", {"value": 9.0, **mmol}, "2019-01-01"),
                  _lab(2, "15074-8", {"value": 6.0, **mmol}, "2020-06-20T10:00:00Z"),
                  _lab(3, "15074-8", {"value": 7.0, **mmol}, "2020-07-30"))
    assert row.features["glucose"] == 6.0
    # started 2020-06-15T08:30+02:00 is the study's local date; birthDate 1970-06-15
    assert row.features["age"] == (dt.date(2020, 6, 15) - dt.date(1970, 6, 15)).days / 365.25


@pytest.mark.parametrize("code,expected", [("61026006", 1), ("54102005", 0), ("1663004", 0)])
def test_tumour_grade_maps_to_high_grade_outcome(tmp_path, pseudonymise, code, expected):
    grade = {"resourceType": "Observation", "id": "g", "status": "final", "subject": SUBJECT,
             "code": {"coding": [{"system": "http://loinc.org", "code": "33732-9"}]},
             "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": code}]}}
    row, _ = _row(tmp_path, pseudonymise, grade)
    assert row.outcome == expected


def test_no_grade_observation_gives_empty_outcome(tmp_path, pseudonymise):
    row, _ = _row(tmp_path, pseudonymise)
    assert row.outcome is None and row.consent_status == "none"


def test_latest_consent_wins_including_re_consent(tmp_path, pseudonymise):
    deny = {"type": "deny", "data": [_study_data(STUDY_ID)]}
    grant, revoke, regrant = (_consent(1, "2020-01-01T10:00:00Z"), _consent(2, "2020-02-01", provision=deny),
                              _consent(3, "2020-03-01T00:00:00+05:00"))
    row, site = _row(tmp_path, pseudonymise, regrant, revoke, grant)
    assert row.consent_status == "active"
    assert site.consents[row.pseudonym].consent_sha256 == consent_sha256(regrant)
    row, _ = _row(tmp_path, pseudonymise, regrant, revoke, grant, _consent(4, "2021-01-01", status="inactive"))
    assert row.consent_status == "revoked"


def test_consent_tie_on_date_resolves_to_revoked(tmp_path, pseudonymise):
    deny = {"type": "deny", "data": [_study_data(STUDY_ID)]}
    row, _ = _row(tmp_path, pseudonymise, _consent(1, "2020-01-01", provision=deny), _consent(2, "2020-01-01"))
    assert row.consent_status == "revoked"


def test_nested_provision_for_the_study_decides(tmp_path, pseudonymise):
    nested = {"type": "permit", "data": [_study_data("other-study")],
              "provision": [{"type": "deny", "data": [_study_data(STUDY_ID)]}]}
    row, _ = _row(tmp_path, pseudonymise, _consent(1, "2020-01-01", provision=nested))
    assert row.consent_status == "revoked"
    only_other = {"type": "permit", "data": [_study_data("other-study")]}
    row, _ = _row(tmp_path, pseudonymise, _consent(1, "2020-01-01", provision=only_other))
    assert row.consent_status == "none"


def test_pseudonymise_is_called_once_per_mrn(tmp_path):
    calls = []

    def counting(mrn):
        calls.append(mrn)
        return f"ps{len(calls)}"

    path = tmp_path / "site.ndjson"
    twin = dict(PATIENT, id="p2")
    path.write_text("".join(json.dumps(r) + "\n" for r in (PATIENT, twin, STUDY)))
    site = harmonise_site(path, LIVER, counting)
    # Once per MRN; logical ids are pseudonymised too, but only when an issue names them.
    assert [c for c in calls if not c.startswith("fhir-id:")] == ["M-778899"]
    assert list(site.rows) == [f"ps{calls.index('M-778899') + 1}"]
