"""Implausible values are issues naming file, line and field, and count as missing, never as
numbers (issue 14's silently accepted FHIR values: glucose 1e308, negative glucose, age 134,
gender "femal"). The other patients still harmonise."""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest

from clinfed.data.study import load_study
from fhir_adapter import harmonise_site

LIVER = load_study("clinfed-tumour-seg").fhir


def _assert_good_patients(site, patients, pseudonymise):
    for p in patients:
        row = site.row(pseudonymise(p.mrn))
        assert row.features["glucose"] == pytest.approx(p.glucose_mmol_l, rel=1e-6)
        assert row.features["creatinine"] == pytest.approx(p.creatinine_umol_l, rel=1e-6)


def _only_issue(site):
    assert len(site.issues) == 1, [str(i) for i in site.issues]
    return site.issues[0]


def _lab(resources, index: int, rid: str, value: float, unit: str, day: dt.date) -> str:
    obs = json.loads(json.dumps(resources["Observation"][index]))
    obs.update(id=rid, effectiveDateTime=day.isoformat(),
               valueQuantity={"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit})
    return json.dumps(obs)


@pytest.mark.parametrize(("value", "unit", "problem"), [
    (1e308, "mmol/L", "outside the plausible range 0.5-50 mmol/L"),
    (-4.2, "mmol/L", "outside the plausible range 0.5-50 mmol/L"),
    (1e308, "mg/dL", "outside the plausible range 0.5-50 mmol/L"),
])
def test_implausible_glucose_is_an_issue_and_missing(tmp_path, make_patient, write_site, append_lines, pseudonymise,
                                                     label, value, unit, problem):
    lonely = make_patient(3, consent="active")  # the bad value is the patient's only glucose
    good = [make_patient(1, consent="active"), make_patient(2, consent="active")]
    fhir_dir = tmp_path / "fhir"
    resources = write_site(fhir_dir, good + [lonely])
    lines = [json.loads(x) for x in (fhir_dir / "Observation.ndjson").read_text().splitlines()]
    kept = [o for o in lines if not (o["id"] == resources["Observation"][6]["id"])]  # lonely's own glucose
    (fhir_dir / "Observation.ndjson").write_text("".join(json.dumps(o) + "\n" for o in kept))
    (line,) = append_lines(fhir_dir / "Observation.ndjson",
                           _lab(resources, 6, "glucose-bad", value, unit, lonely.study_date))
    site = harmonise_site(fhir_dir, LIVER, pseudonymise)
    issue = _only_issue(site)
    assert (issue.path, issue.line, issue.resource) == (str(fhir_dir / "Observation.ndjson"), line,
                                                        label("Observation/glucose-bad"))
    assert f"glucose Observation.valueQuantity.value is {problem}" in issue.problem
    assert "treated as missing" in issue.problem and str(value) not in str(issue)
    assert site.row(pseudonymise(lonely.mrn)).features["glucose"] is None
    _assert_good_patients(site, good, pseudonymise)


def test_a_value_that_overflows_in_conversion_is_not_finite_and_missing(site_dir, append_lines, pseudonymise, label):
    fhir_dir, patients, resources = site_dir
    # 1e308 mmol/L of creatinine is 1e311 umol/L: infinity after conversion, never a number.
    (line,) = append_lines(fhir_dir / "Observation.ndjson",
                           _lab(resources, 1, "creatinine-inf", 1e308, "mmol/L", patients[0].study_date))
    site = harmonise_site(fhir_dir, LIVER, pseudonymise)
    issue = _only_issue(site)
    assert (issue.line, issue.resource) == (line, label("Observation/creatinine-inf"))
    assert "creatinine Observation.valueQuantity.value is not a finite number; treated as missing" in issue.problem
    row = site.row(pseudonymise(patients[0].mrn))
    assert all(v is None or math.isfinite(v) for v in row.features.values())
    _assert_good_patients(site, patients, pseudonymise)  # the patient's valid creatinine is used


def test_age_of_134_at_the_study_is_an_issue_and_missing(site_dir, make_patient, write_site, append_lines,
                                                         pseudonymise, label, tmp_path):
    fhir_dir, patients, _ = site_dir
    old = make_patient(5, birth_date=dt.date(1887, 1, 1), study_date=dt.date(2021, 6, 1))
    resources = write_site(tmp_path / "x", [old])
    (line,) = append_lines(fhir_dir / "Patient.ndjson", json.dumps(resources["Patient"][0]))
    append_lines(fhir_dir / "ImagingStudy.ndjson", json.dumps(resources["ImagingStudy"][0]))
    site = harmonise_site(fhir_dir, LIVER, pseudonymise)
    issue = _only_issue(site)
    assert (issue.line, issue.resource) == (line, label(f"Patient/{resources['Patient'][0]['id']}"))
    assert "age at the imaging study is outside the plausible range 0-120 years (Patient.birthDate)" in issue.problem
    assert site.row(pseudonymise(old.mrn)).features["age"] is None
    _assert_good_patients(site, patients, pseudonymise)


def test_gender_outside_the_fhir_value_set_is_an_issue_and_sex_missing(site_dir, make_patient, write_site,
                                                                       append_lines, pseudonymise, label, tmp_path):
    fhir_dir, patients, _ = site_dir
    typo = make_patient(7)
    resources = write_site(tmp_path / "x", [typo])
    patient = dict(resources["Patient"][0], gender="femal")
    (line,) = append_lines(fhir_dir / "Patient.ndjson", json.dumps(patient))
    site = harmonise_site(fhir_dir, LIVER, pseudonymise)
    issue = _only_issue(site)
    assert (issue.line, issue.resource) == (line, label(f"Patient/{patient['id']}"))
    assert "Patient.gender is not in the FHIR administrative-gender value set" in issue.problem
    assert "femal" not in str(issue).replace("female", "")
    assert site.row(pseudonymise(typo.mrn)).features["sex_female"] is None  # neither female nor male
    _assert_good_patients(site, patients, pseudonymise)
