"""A training case is one imaging study joined to the record by StudyInstanceUID: two studies of
one patient, a patient without an outcome, a patient without an age."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import numpy as np
import pytest
import torch
from data_helpers import active_indices, pseudonyms
from pydicom.uid import generate_uid

from clinfed.data.ingest import NOT_CHOSEN, ingest_site
from clinfed.data.profiles import profile_for_site
from clinfed.data.pseudonym import Pseudonymiser
from clinfed.data.study import SHIPPED_STUDIES_DIR, parse_study, read_yaml
from clinfed.data.synth_dicom import write_seg, write_series
from clinfed.data.synth_fhir import fhir_resources_for
from clinfed.training import PatientDataset, TrainConfig, make_loader, new_model, train_epochs

LIVER_YAML = read_yaml(SHIPPED_STUDIES_DIR / "clinfed-tumour-seg.yml")
FEATURES = ("age", "sex_female", "glucose", "creatinine", "diabetes", "hypertension")
LATER = dt.timedelta(days=200)  # the second study: inside the grade's window, a different age


def liver(studies_per_patient: str = "last"):
    data = json.loads(json.dumps(LIVER_YAML))
    data["imaging"]["studies_per_patient"] = studies_per_patient
    return parse_study(data)


def _ndjson(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _write_ndjson(path, resources):
    path.write_text("".join(json.dumps(r) + "\n" for r in resources))


def _patient_id(site_dir, mrn: str) -> str:
    return next(p["id"] for p in _ndjson(site_dir / "fhir" / "Patient.ndjson")
                if any(i["value"] == mrn for i in p["identifier"]))


@pytest.fixture
def second_study(site_copy):
    """An active patient of site-1 gets a second imaging study, 200 days after the first: its own
    DICOM series and SEG, and its own ImagingStudy in the record. Returns (index, later patient)."""
    index = active_indices(site_copy.truth)[0]
    truth = site_copy.truth[index]
    later = dataclasses.replace(truth.patient, study_date=truth.patient.study_date + LATER,
                                study_uid=generate_uid(), series_uid=generate_uid())
    profile = profile_for_site(0)
    folder = site_copy.dir / "imaging" / "study-later"
    files = write_series(truth.volume, folder, patient=later, profile=profile)
    write_seg(truth.label, files, folder / "seg.dcm", profile=profile)
    studies = site_copy.dir / "fhir" / "ImagingStudy.ndjson"
    _write_ndjson(studies, _ndjson(studies) + fhir_resources_for(later, profile, "clinfed-tumour-seg")["ImagingStudy"])
    return index, later


def _age_input(case) -> float:
    return float(case.ehr[FEATURES.index("age")])


def test_the_last_study_of_a_patient_is_the_case_and_the_first_is_listed_as_not_used(site_copy, second_study):
    index, later = second_study
    pseudonymise = Pseudonymiser.for_site(site_copy.dir)
    me = pseudonyms(site_copy.dir, site_copy.truth)[index]
    result = ingest_site(site_copy.dir, liver("last"))
    (case,) = [c for c in result.cases if c.pseudonym == me]
    assert case.case_id == pseudonymise("study:" + later.study_uid)
    # Features are taken at the case's own study: the patient is 200 days older there.
    assert _age_input(case) == pytest.approx((later.age_at_study - 60.0) / 10.0, abs=1e-4)
    assert case.outcome == int(later.high_grade)  # the grade lies within the window of both studies
    (not_used,) = result.studies_not_used
    assert (not_used.subject, not_used.reason) == (me, NOT_CHOSEN)
    assert site_copy.truth[index].study_dir.name in not_used.detail
    assert len(result.cases) == len(active_indices(site_copy.truth))
    report = result.report()
    assert report["usable"] == report["cases"] == len(active_indices(site_copy.truth))
    assert later.study_uid not in json.dumps(report)


def test_the_first_study_is_the_case_when_the_definition_says_first(site_copy, second_study):
    index, later = second_study
    me = pseudonyms(site_copy.dir, site_copy.truth)[index]
    (case,) = [c for c in ingest_site(site_copy.dir, liver("first")).cases if c.pseudonym == me]
    first = site_copy.truth[index].patient
    assert case.case_id == Pseudonymiser.for_site(site_copy.dir)("study:" + first.study_uid)
    assert _age_input(case) == pytest.approx((first.age_at_study - 60.0) / 10.0, abs=1e-4)


def test_with_all_studies_a_patient_gives_two_cases_but_stays_one_sample(site_copy, second_study):
    index, later = second_study
    me = pseudonyms(site_copy.dir, site_copy.truth)[index]
    result = ingest_site(site_copy.dir, liver("all"))
    mine = [c for c in result.cases if c.pseudonym == me]
    assert len(mine) == 2 and len({c.case_id for c in mine}) == 2
    assert sorted(_age_input(c) for c in mine) == pytest.approx(
        sorted((p.age_at_study - 60.0) / 10.0 for p in (site_copy.truth[index].patient, later)), abs=1e-4)
    assert result.studies_not_used == []
    report = result.report()
    assert report["cases"] == report["usable"] + 1
    # The DP unit is the patient: one item per patient, whichever of its cases a draw takes.
    config = TrainConfig.for_study(liver("all"), roi=(16, 16, 16))
    dataset = PatientDataset(result.cases, config)
    assert len(dataset) == len({c.pseudonym for c in result.cases}) == len(result.cases) - 1
    group = next(g for g in dataset.groups if len(g) == 2)
    assert {result.cases[i].pseudonym for i in group} == {me}


def test_an_imaging_study_missing_from_the_record_is_excluded_naming_the_folder(site_copy, second_study):
    index, later = second_study
    studies = site_copy.dir / "fhir" / "ImagingStudy.ndjson"
    _write_ndjson(studies, [s for s in _ndjson(studies) if later.study_uid not in json.dumps(s)])
    me = pseudonyms(site_copy.dir, site_copy.truth)[index]
    result = ingest_site(site_copy.dir, liver("last"))
    # The study the record knows still trains; the unknown one is reported, not silently dropped.
    assert [c.pseudonym for c in result.cases].count(me) == 1
    (excluded,) = [e for e in result.exclusions if e.subject == me]
    assert excluded.reason == "imaging study not in the FHIR record"
    assert excluded.detail.startswith("study-later:") and "StudyInstanceUID" in excluded.detail


def test_a_patient_without_an_outcome_still_trains_segmentation_with_the_outcome_loss_masked(site_copy):
    index = active_indices(site_copy.truth)[0]
    me = pseudonyms(site_copy.dir, site_copy.truth)[index]
    patient_id = _patient_id(site_copy.dir, site_copy.truth[index].patient.mrn)
    observations = site_copy.dir / "fhir" / "Observation.ndjson"
    _write_ndjson(observations, [o for o in _ndjson(observations)
                                 if not (o["subject"]["reference"] == f"Patient/{patient_id}"
                                         and o["code"]["coding"][0]["code"] == "33732-9")])
    result = ingest_site(site_copy.dir, liver())
    (case,) = [c for c in result.cases if c.pseudonym == me]
    assert case.outcome is None
    assert result.report()["cases_without_outcome"] == 1
    assert all(c.outcome is not None for c in result.cases if c.pseudonym != me)

    # Its batches carry has_outcome 0; a step on it alone moves the segmentation, not the outcome head.
    config = TrainConfig.for_study(liver(), roi=(16, 16, 16), batch_size=1, epochs=1)
    batch = next(iter(make_loader([case], config, train=True)))
    assert float(batch["has_outcome"][0]) == 0.0
    torch.manual_seed(0)
    model = new_model(config.ehr_size)
    head = {k: v.clone() for k, v in model.outcome_head.state_dict().items()}
    unet = {k: v.clone() for k, v in model.unet.state_dict().items()}
    train_epochs(model, [batch], config)
    assert all(torch.equal(head[k], v) for k, v in model.outcome_head.state_dict().items())
    assert any(not torch.equal(unet[k], v) for k, v in model.unet.state_dict().items())
    # The same step on a case with an outcome does move the head: the mask is what held it.
    other = next(c for c in result.cases if c.outcome is not None)
    train_epochs(model, [next(iter(make_loader([other], config, train=True)))], config)
    assert any(not torch.equal(head[k], v) for k, v in model.outcome_head.state_dict().items())


def test_a_missing_age_is_flagged_as_missing_never_filled(site_copy):
    index = active_indices(site_copy.truth)[0]
    me = pseudonyms(site_copy.dir, site_copy.truth)[index]
    mrn = site_copy.truth[index].patient.mrn
    patients = site_copy.dir / "fhir" / "Patient.ndjson"
    edited = _ndjson(patients)
    for resource in edited:
        if any(i["value"] == mrn for i in resource["identifier"]):
            del resource["birthDate"]
    _write_ndjson(patients, edited)
    result = ingest_site(site_copy.dir, liver())
    (case,) = [c for c in result.cases if c.pseudonym == me]
    values, missing = case.ehr[:len(FEATURES)], case.ehr[len(FEATURES):]
    assert values[FEATURES.index("age")] == 0.0 and missing[FEATURES.index("age")] == 1.0
    assert np.count_nonzero(missing) == 1  # only the age is missing; sex and the rest are read
    others = [c for c in result.cases if c.pseudonym != me]
    assert others and all(c.ehr[len(FEATURES) + FEATURES.index("age")] == 0.0 for c in others)
