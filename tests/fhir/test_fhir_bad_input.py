"""Each unusable resource is reported with file, line and resource, and the rest still harmonises."""

from __future__ import annotations

import hashlib

import datetime as dt
import json

import pytest

from clinfed.data.profiles import STUDY_ID
from clinfed.data.study import load_study
from fhir_adapter import FhirInputError, harmonise_site, iter_ndjson


def label(raw: str) -> str:
    """How an issue names a resource: type and the pseudonym of the logical id (see conftest)."""
    return f"{raw.split('/', 1)[0]}/pid-" + hashlib.sha256(b"test-key|fhir-id:" + raw.encode()).hexdigest()[:20]

LIVER = load_study("clinfed-tumour-seg").fhir


def _harmonise(fhir_dir, pseudonymise):
    return harmonise_site(fhir_dir, LIVER, pseudonymise)


def _assert_good_patients(site, patients, pseudonymise):
    for p in patients:
        row = site.row(pseudonymise(p.mrn))
        assert row.study_instance_uid == p.study_uid
        assert row.features["glucose"] == pytest.approx(p.glucose_mmol_l, rel=1e-6)
        assert row.features["creatinine"] == pytest.approx(p.creatinine_umol_l, rel=1e-6)
        assert row.consent_status == p.consent


def _only_issue(site) -> FhirInputError:
    assert len(site.issues) == 1, [str(i) for i in site.issues]
    return site.issues[0]


def test_bad_json_line_is_reported_and_skipped(site_dir, append_lines, pseudonymise):
    fhir_dir, patients, _ = site_dir
    (line,) = append_lines(fhir_dir / "Observation.ndjson", '{"resourceType": "Observation", "id": ')
    site = _harmonise(fhir_dir, pseudonymise)
    issue = _only_issue(site)
    assert (issue.path, issue.line) == (str(fhir_dir / "Observation.ndjson"), line)
    assert "invalid JSON" in issue.problem
    assert str(issue).startswith(f"{fhir_dir / 'Observation.ndjson'}:{line}")
    _assert_good_patients(site, patients, pseudonymise)


def test_unknown_resource_type_is_reported(site_dir, append_lines, pseudonymise):
    fhir_dir, patients, _ = site_dir
    (line,) = append_lines(fhir_dir / "Patient.ndjson", '{"resourceType": "Patiënt", "id": "x1"}')
    issue = _only_issue(_harmonise(fhir_dir, pseudonymise))
    assert (issue.line, issue.resource) == (line, label("Patiënt/x1"))
    assert "unknown resourceType" in issue.problem
    _assert_good_patients(_harmonise(fhir_dir, pseudonymise), patients, pseudonymise)


def test_field_of_wrong_type_fails_r4_validation_without_echoing_the_value(site_dir, append_lines,
                                                                           make_patient, write_site,
                                                                           pseudonymise, tmp_path):
    fhir_dir, patients, _ = site_dir
    bad = write_site(tmp_path / "other", [make_patient(7)])["Patient"][0]
    bad["birthDate"] = "13/01/1957"
    (line,) = append_lines(fhir_dir / "Patient.ndjson", json.dumps(bad))
    site = _harmonise(fhir_dir, pseudonymise)
    issue = _only_issue(site)
    assert (issue.line, issue.resource) == (line, label(f"Patient/{bad['id']}"))
    assert "invalid R4 Patient: birthDate" in issue.problem
    assert "13/01/1957" not in str(issue)
    assert pseudonymise(bad["identifier"][0]["value"]) not in site.rows
    _assert_good_patients(site, patients, pseudonymise)


def test_patient_without_mrn_is_left_out_with_one_issue(site_dir, pseudonymise, make_patient,
                                                        write_site, tmp_path):
    fhir_dir, patients, _ = site_dir
    extra = make_patient(5)
    resources = write_site(tmp_path / "x", [extra])
    resources["Patient"][0]["identifier"][0]["type"] = {"text": "national id"}
    with (fhir_dir / "Patient.ndjson").open("a") as fh:
        fh.write(json.dumps(resources["Patient"][0]) + "\n")
    with (fhir_dir / "Observation.ndjson").open("a") as fh:  # its labs: skipped silently
        for obs in resources["Observation"]:
            fh.write(json.dumps(obs) + "\n")
    site = _harmonise(fhir_dir, pseudonymise)
    issue = _only_issue(site)
    assert (issue.line, issue.resource) == (3, label(f"Patient/{resources['Patient'][0]['id']}"))
    assert "no MRN" in issue.problem
    assert len(site.rows) == 2
    _assert_good_patients(site, patients, pseudonymise)


def test_unknown_unit_names_file_and_line_and_leaves_value_empty(site_dir, append_lines, pseudonymise):
    fhir_dir, patients, resources = site_dir
    obs = dict(resources["Observation"][0])  # patient 1's glucose
    obs["id"] = "glucose-in-grams"
    # g/L would convert (UCUM with glucose's molar mass); a plain amount of substance does not.
    obs["valueQuantity"] = {"value": 1.1, "unit": "mmol", "system": "http://unitsofmeasure.org", "code": "mmol"}
    obs["effectiveDateTime"] = patients[0].study_date.isoformat()
    (line,) = append_lines(fhir_dir / "Observation.ndjson", json.dumps(obs))
    site = _harmonise(fhir_dir, pseudonymise)
    issue = _only_issue(site)
    assert (issue.path, issue.line, issue.resource) == (str(fhir_dir / "Observation.ndjson"), line, label("Observation/glucose-in-grams"))
    assert "glucose Observation.valueQuantity unit is missing, not UCUM, or does not convert" in issue.problem
    _assert_good_patients(site, patients, pseudonymise)  # the valid glucose is still used


def test_observation_for_unknown_patient_is_reported(site_dir, append_lines, pseudonymise):
    fhir_dir, patients, resources = site_dir
    obs = dict(resources["Observation"][0], id="orphan", subject={"reference": "Patient/nobody"})
    (line,) = append_lines(fhir_dir / "Observation.ndjson", json.dumps(obs))
    site = _harmonise(fhir_dir, pseudonymise)
    issue = _only_issue(site)
    assert (issue.line, issue.resource) == (line, label("Observation/orphan"))
    assert f"references {label('Patient/nobody')}" in issue.problem and "nobody" not in str(issue)
    _assert_good_patients(site, patients, pseudonymise)


def test_observation_without_subject_is_reported(site_dir, append_lines, pseudonymise):
    fhir_dir, patients, resources = site_dir
    obs = {k: v for k, v in resources["Observation"][1].items() if k != "subject"}
    obs["id"] = "no-subject"
    (line,) = append_lines(fhir_dir / "Observation.ndjson", json.dumps(obs))
    site = _harmonise(fhir_dir, pseudonymise)
    issue = _only_issue(site)
    assert (issue.line, issue.resource) == (line, label("Observation/no-subject"))
    assert "has no subject" in issue.problem
    _assert_good_patients(site, patients, pseudonymise)


def test_imaging_study_without_study_uid_is_reported(site_dir, pseudonymise, make_patient, write_site,
                                                     tmp_path):
    fhir_dir, patients, _ = site_dir
    extra = make_patient(4, consent="active")
    resources = write_site(tmp_path / "x", [extra])
    study = resources["ImagingStudy"][0]
    study["identifier"] = [{"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.3"}]
    lines = (fhir_dir / "ImagingStudy.ndjson").read_text().splitlines()
    lines.insert(1, json.dumps(study))  # between the two good studies
    (fhir_dir / "ImagingStudy.ndjson").write_text("\n".join(lines) + "\n")
    with (fhir_dir / "Patient.ndjson").open("a") as fh:
        fh.write(json.dumps(resources["Patient"][0]) + "\n")
    site = _harmonise(fhir_dir, pseudonymise)
    issue = _only_issue(site)
    assert (issue.line, issue.resource) == (2, label(f"ImagingStudy/{study['id']}"))
    assert "no Study Instance UID" in issue.problem
    assert site.row(pseudonymise(extra.mrn)).study_instance_uid is None
    assert site.row(pseudonymise(extra.mrn)).features["age"] is None
    _assert_good_patients(site, patients, pseudonymise)


def test_consent_for_another_study_or_in_draft_does_not_count(site_dir, pseudonymise, make_patient,
                                                              write_site, tmp_path):
    fhir_dir, patients, _ = site_dir
    other = make_patient(6, consent="active")
    resources = write_site(tmp_path / "x", [other], study_id="another-study")
    draft = json.loads(json.dumps(resources["Consent"][0]))
    draft["id"] = "draft"
    draft["status"] = "draft"
    draft["provision"]["data"][0]["reference"]["identifier"]["value"] = STUDY_ID
    with (fhir_dir / "Patient.ndjson").open("a") as fh:
        fh.write(json.dumps(resources["Patient"][0]) + "\n")
    with (fhir_dir / "Consent.ndjson").open("a") as fh:
        fh.write(json.dumps(resources["Consent"][0]) + "\n" + json.dumps(draft) + "\n")
    site = _harmonise(fhir_dir, pseudonymise)
    assert site.issues == []
    # The draft is reported as a draft (not "none"); the other study's consent does not count.
    assert site.row(pseudonymise(other.mrn)).consent_status == "draft"
    assert site.consents[pseudonymise(other.mrn)].status == "draft"  # not in force, and not "none"
    _assert_good_patients(site, patients, pseudonymise)


def test_blank_lines_are_tolerated_and_line_numbers_stay_true(site_dir, pseudonymise):
    fhir_dir, patients, _ = site_dir
    path = fhir_dir / "Condition.ndjson"
    lines = path.read_text().splitlines()
    path.write_text("\n" + "\n   \n".join(lines) + "\n\n[1, 2]\n\n")
    site = _harmonise(fhir_dir, pseudonymise)
    issue = _only_issue(site)
    assert issue.line == 2 * len(lines) + 2
    assert "not a FHIR resource" in issue.problem
    _assert_good_patients(site, patients, pseudonymise)


def test_invalid_utf8_line_is_reported(site_dir, pseudonymise):
    fhir_dir, patients, _ = site_dir
    with (fhir_dir / "Observation.ndjson").open("ab") as fh:
        fh.write(b'{"resourceType": "Observation", "id": "\xff\xfe"}\n')
    issues = []
    list(iter_ndjson(fhir_dir / "Observation.ndjson", issues.append))
    (issue,) = issues
    assert issue.line == len(site_dir[2]["Observation"]) + 1
    assert "UTF-8" in issue.problem
    _assert_good_patients(_harmonise(fhir_dir, pseudonymise), patients, pseudonymise)


def test_bundle_with_an_invalid_entry_keeps_the_valid_entries(tmp_path, make_patient, write_site,
                                                              pseudonymise):
    patients = [make_patient(1, consent="active"), make_patient(2, consent="revoked")]
    resources = write_site(tmp_path / "src", patients)
    entries = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r}
               for rtype in ("Patient", "ImagingStudy", "Observation", "Consent") for r in resources[rtype]]
    broken = json.loads(json.dumps(resources["Observation"][0]))
    broken["id"] = "broken"
    broken["valueQuantity"]["value"] = "six point one"
    entries.insert(3, {"fullUrl": "urn:uuid:broken", "resource": broken})
    bundle = {"resourceType": "Bundle", "id": "site-export", "type": "collection", "entry": entries}
    path = tmp_path / "bundle.json"
    text = json.dumps(bundle, indent=2)
    path.write_text(text)
    expected_line = next(i + 1 for i, line in enumerate(text.splitlines()) if '"urn:uuid:broken"' in line) - 1
    site = harmonise_site(path, LIVER, pseudonymise)
    issue = _only_issue(site)
    assert (issue.path, issue.line, issue.resource) == (str(path), expected_line, label("Observation/broken"))
    assert "valueQuantity.value" in issue.problem
    assert "six point one" not in str(issue)
    _assert_good_patients(site, patients, pseudonymise)


def test_bundle_that_is_not_valid_json_is_reported_and_other_files_still_read(site_dir, pseudonymise):
    fhir_dir, patients, _ = site_dir
    (fhir_dir / "extra-bundle.json").write_text('{\n "resourceType": "Bundle",\n "entry": [\n {"resource": }\n]}\n')
    site = _harmonise(fhir_dir, pseudonymise)
    issue = _only_issue(site)
    assert (issue.path, issue.line) == (str(fhir_dir / "extra-bundle.json"), 4)
    assert "invalid JSON" in issue.problem
    _assert_good_patients(site, patients, pseudonymise)


def test_duplicate_patient_keeps_the_first_and_reports_the_second(site_dir, append_lines, pseudonymise):
    fhir_dir, patients, resources = site_dir
    dup = dict(resources["Patient"][0], gender="unknown")
    (line,) = append_lines(fhir_dir / "Patient.ndjson", json.dumps(dup))
    site = _harmonise(fhir_dir, pseudonymise)
    issue = _only_issue(site)
    assert (issue.line, issue.resource) == (line, label(f"Patient/{dup['id']}"))
    assert f"duplicate {label('Patient/' + dup['id'])} (first read at {fhir_dir / 'Patient.ndjson'}:1)" in issue.problem
    assert patients[0].sex == "female"
    assert site.row(pseudonymise(patients[0].mrn)).features["sex_female"] == 1  # the first copy's gender
    _assert_good_patients(site, patients, pseudonymise)


def test_two_patient_ids_with_one_mrn_are_merged_and_reported(site_dir, append_lines, pseudonymise):
    fhir_dir, patients, resources = site_dir
    alias = dict(resources["Patient"][0], id="alias-of-first")
    (line,) = append_lines(fhir_dir / "Patient.ndjson", json.dumps(alias))
    grade = dict(resources["Observation"][2], id="grade-via-alias", subject={"reference": "Patient/alias-of-first"},
                 valueCodeableConcept={"coding": [{"system": "http://snomed.info/sct", "code": "54102005"}]},
                 effectiveDateTime=patients[0].study_date.isoformat())
    resources_lines = (fhir_dir / "Observation.ndjson").read_text().splitlines()
    (fhir_dir / "Observation.ndjson").write_text("\n".join([json.dumps(grade)] + resources_lines) + "\n")
    site = _harmonise(fhir_dir, pseudonymise)
    issue = _only_issue(site)
    assert (issue.line, issue.resource) == (line, label("Patient/alias-of-first"))
    assert "same MRN" in issue.problem and "merged" in issue.problem
    assert len(site.rows) == 2
    assert patients[0].high_grade
    # The alias's Grade 1 is read first, on the same date, so it wins: the records were merged.
    assert site.row(pseudonymise(patients[0].mrn)).outcome == 0
    _assert_good_patients(site, patients, pseudonymise)


def test_birth_date_in_the_future_leaves_age_empty(site_dir, append_lines, make_patient, write_site,
                                                   pseudonymise, tmp_path):
    fhir_dir, patients, _ = site_dir
    future = make_patient(8, birth_date=dt.date.today() + dt.timedelta(days=400))
    resources = write_site(tmp_path / "x", [future])
    (line,) = append_lines(fhir_dir / "Patient.ndjson", json.dumps(resources["Patient"][0]))
    append_lines(fhir_dir / "ImagingStudy.ndjson", json.dumps(resources["ImagingStudy"][0]))
    site = _harmonise(fhir_dir, pseudonymise)
    issue = _only_issue(site)
    assert (issue.line, issue.resource) == (line, label(f"Patient/{resources['Patient'][0]['id']}"))
    assert "birthDate is in the future" in issue.problem
    row = site.row(pseudonymise(future.mrn))
    assert row.features["age"] is None and row.study_instance_uid == future.study_uid
    _assert_good_patients(site, patients, pseudonymise)


def test_birth_date_after_the_study_leaves_age_empty(site_dir, append_lines, make_patient, write_site,
                                                     pseudonymise, tmp_path):
    fhir_dir, patients, _ = site_dir
    late = make_patient(9, birth_date=dt.date(2022, 1, 1), study_date=dt.date(2021, 6, 1))
    resources = write_site(tmp_path / "x", [late])
    (line,) = append_lines(fhir_dir / "Patient.ndjson", json.dumps(resources["Patient"][0]))
    append_lines(fhir_dir / "ImagingStudy.ndjson", json.dumps(resources["ImagingStudy"][0]))
    site = _harmonise(fhir_dir, pseudonymise)
    issue = _only_issue(site)
    assert (issue.line, "after the ImagingStudy start" in issue.problem) == (line, True)
    assert site.row(pseudonymise(late.mrn)).features["age"] is None
    _assert_good_patients(site, patients, pseudonymise)


def test_unknown_tumour_grade_code_is_reported(site_dir, append_lines, pseudonymise):
    fhir_dir, patients, resources = site_dir
    grade = dict(resources["Observation"][5], id="grade-x",
                 valueCodeableConcept={"coding": [{"system": "http://snomed.info/sct", "code": "12345678"}]})
    (line,) = append_lines(fhir_dir / "Observation.ndjson", json.dumps(grade))
    site = _harmonise(fhir_dir, pseudonymise)
    issue = _only_issue(site)
    assert (issue.line, issue.resource) == (line, label("Observation/grade-x"))
    assert "high_grade Observation" in issue.problem
    assert site.row(pseudonymise(patients[1].mrn)).outcome == int(patients[1].high_grade)
    _assert_good_patients(site, patients, pseudonymise)


def test_missing_fhir_folder_raises_an_error_naming_it(tmp_path, pseudonymise):
    with pytest.raises(FhirInputError) as info:
        harmonise_site(tmp_path / "nope", LIVER, pseudonymise)
    assert info.value.path == str(tmp_path / "nope")
