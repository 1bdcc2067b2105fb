"""The mCODE 4.0.0 examples (HL7's, CC0) harmonise under a study definition that asks for them:
grade, staging and labs of real oncology records nobody here wrote (fixtures/mcode/README.md)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pytest

from clinfed.data.study import load_study
from fhir_adapter import harmonise_site

FIXTURES = Path(__file__).parent / "fixtures"
STUDY = load_study(FIXTURES / "mcode-breast-grade.yml")
LB = 0.45359237  # kg per avoirdupois pound
JENNY, JOHN, BRIAN = "MRN1234", "m123", "MRN5678"


@pytest.fixture
def mcode_dir(tmp_path) -> Path:
    """The examples as a site's FHIR folder (JSON resources only)."""
    folder = tmp_path / "fhir"
    folder.mkdir()
    for path in (FIXTURES / "mcode").glob("*.json"):
        shutil.copy(path, folder / path.name)
    return folder


def test_grade_staging_labs_and_diagnoses_of_the_mcode_patients_harmonise(mcode_dir, pseudonymise, label):
    site = harmonise_site(mcode_dir, STUDY.fhir, pseudonymise)
    assert site.resources_read == {"Condition": 5, "Observation": 9, "Patient": 3}
    assert set(site.rows) == {pseudonymise(m) for m in (JENNY, JOHN, BRIAN)}

    jenny = site.row(pseudonymise(JENNY))
    assert jenny.outcome == 0  # LOINC 44648-4 = LA27824-4, Nottingham grade 2
    assert jenny.features["stage_group"] == 2  # AJCC IIB
    assert jenny.features["hypertensive_disease"] == 1  # SNOMED 77970009
    assert jenny.features["heart_failure"] == 0
    assert jenny.features["sex_female"] == 1
    assert jenny.features["body_weight"] == pytest.approx(150 * LB)  # the later of two, from [lb_av]
    assert jenny.features["neutrophils"] is None  # 3000 x 10^3/uL in the example: reported below

    john = site.row(pseudonymise(JOHN))
    assert john.outcome == 0  # NCIt C18000 = SNOMED 1286893008, intermediate histologic grade
    assert john.features["stage_group"] == 3  # AJCC IIIC
    assert john.features["heart_failure"] == 1  # ICD-10-CM I50.32 under the ICD-10 category I50
    assert john.features["hemoglobin"] is None and john.features["sex_female"] == 0

    brian = site.row(pseudonymise(BRIAN))
    assert brian.outcome is None  # no grade: segmentation only
    assert brian.features["hemoglobin"] == pytest.approx(67.0)  # 6.7 g/dL in g/L
    assert brian.features["white_cells"] == pytest.approx(88.5)
    assert {row.consent_status for rows in site.rows.values() for row in rows} == {"none"}

    (issue,) = site.issues
    assert issue.path == str(mcode_dir / "Observation-us-core-observation-lab-neutrophils-jenny-m.json")
    assert issue.line == 1 and issue.resource == label("Observation/us-core-observation-lab-neutrophils-jenny-m")
    assert "neutrophils Observation.valueQuantity.value is outside the plausible range 0-100 10*3/uL" in issue.problem
    assert "3000" not in str(issue)  # the value itself is never echoed


def test_the_grade_class_follows_the_definitions_value_map(mcode_dir, pseudonymise):
    grade = mcode_dir / "Observation-histologic-grade-intermediate.json"
    resource = json.loads(grade.read_text())
    resource["valueCodeableConcept"]["coding"][0].update(code="1155707008", display="High histologic grade")
    grade.write_text(json.dumps(resource))
    site = harmonise_site(mcode_dir, STUDY.fhir, pseudonymise)
    assert site.row(pseudonymise(JOHN)).outcome == 1
    assert site.row(pseudonymise(JENNY)).outcome == 0


def test_features_are_taken_relative_to_the_imaging_study_date(mcode_dir, pseudonymise):
    # An ImagingStudy of Jenny on 2018-03-20: the weight of 2018-03-06 (155 lb) is in the lab
    # window [180 days before, 30 after]; the one of 2018-04-22 (150 lb) is 33 days after.
    study = {"resourceType": "ImagingStudy", "id": "jenny-ct", "status": "available",
             "subject": {"reference": "Patient/cancer-patient-jenny-m"}, "started": "2018-03-20T10:00:00Z",
             "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:2.25.1234567890"}]}
    (mcode_dir / "ImagingStudy-jenny-ct.json").write_text(json.dumps(study))
    site = harmonise_site(mcode_dir, STUDY.fhir, pseudonymise)
    jenny = site.row(pseudonymise(JENNY))
    assert jenny.study_instance_uid == "2.25.1234567890" and site.by_study["2.25.1234567890"] is jenny
    assert jenny.features["body_weight"] == pytest.approx(155 * LB)
    assert jenny.features["age"] == pytest.approx((dt.date(2018, 3, 20) - dt.date(1965, 1, 1)).days / 365.25)
    assert jenny.outcome == 0  # the grade of 2018-04-01 is inside the outcome window (90 days after)
