"""One patient's data broken inside a whole site: that patient is reported with a reason and
a detail naming the file; every other patient still ingests."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pydicom
import pytest
from data_helpers import CONSENT_REASON, active_indices, assert_only_these_excluded, exclusion_of, pseudonyms

from clinfed.cli import main
from clinfed.data.ingest import (
    BROKEN_SERIES,
    INVALID_FHIR,
    MISSING_LABEL,
    NO_IMAGING,
    ingest_site,
)


def _victims(site_copy, count=1):
    """Consented patients (consent is checked before the label, so only they reach it)."""
    chosen = active_indices(site_copy.truth)[1:1 + count]
    assert len(chosen) == count
    return chosen


def _pseudonym(site_copy, index):
    return pseudonyms(site_copy.dir, site_copy.truth)[index]


def _break_patient_record(site_copy, index) -> int:
    """Give the patient's FHIR Patient an impossible birthDate; returns its line number."""
    path = site_copy.dir / "fhir" / "Patient.ndjson"
    lines = path.read_text(encoding="utf-8").splitlines()
    mrn = site_copy.truth[index].patient.mrn
    (lineno,) = [n for n, line in enumerate(lines, 1) if mrn in line]
    record = json.loads(lines[lineno - 1])
    record["birthDate"] = "1960-13-45"
    lines[lineno - 1] = json.dumps(record)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lineno


def test_missing_slice_excludes_that_patient_naming_the_gap(site_copy):
    (victim,) = _victims(site_copy)
    study = site_copy.study(victim)
    (study / "slice_0004.dcm").unlink()

    result = ingest_site(site_copy.dir)

    assert_only_these_excluded(result, site_copy.dir, site_copy.truth, {victim: BROKEN_SERIES})
    detail = exclusion_of(result, _pseudonym(site_copy, victim)).detail
    assert f"imaging/{study.name}" in detail and "missing slice" in detail
    assert "slice_0003.dcm" in detail and "slice_0005.dcm" in detail


def test_truncated_slice_excludes_that_patient_naming_the_file(site_copy):
    (victim,) = _victims(site_copy)
    path = site_copy.study(victim) / "slice_0005.dcm"
    path.write_bytes(path.read_bytes()[:-100])

    result = ingest_site(site_copy.dir)

    assert_only_these_excluded(result, site_copy.dir, site_copy.truth, {victim: BROKEN_SERIES})
    detail = exclusion_of(result, _pseudonym(site_copy, victim)).detail
    assert detail.startswith(f"imaging/{path.parent.name}/slice_0005.dcm: ") and "truncated" in detail


def test_study_folder_of_unreadable_files_is_reported_by_folder_name(site_copy):
    """No header names the patient, so the folder is listed, and the patient's FHIR record
    is listed as lacking imaging."""
    (victim,) = _victims(site_copy)
    study = site_copy.study(victim)
    for path in study.iterdir():
        path.write_bytes(b"this is not DICOM")

    result = ingest_site(site_copy.dir)

    by_subject = {(e.subject, e.reason): e for e in result.exclusions}
    assert "not a readable DICOM file" in by_subject[(study.name, BROKEN_SERIES)].detail
    assert f"imaging/{study.name}/seg.dcm" in by_subject[(study.name, BROKEN_SERIES)].detail
    assert (_pseudonym(site_copy, victim), NO_IMAGING) in by_subject
    others = {i for i in active_indices(site_copy.truth) if i != victim}
    names = pseudonyms(site_copy.dir, site_copy.truth)
    assert {c.pseudonym for c in result.cases} == {names[i] for i in others}


@pytest.mark.parametrize("intruder", ["slice_0009.dcm", "IM_0000.dcm"])  # sorts last / first
def test_slice_of_another_patient_is_blamed_on_the_folder_owner_naming_the_intruder(site_copy, intruder):
    victim, donor = _victims(site_copy, 2)
    study = site_copy.study(victim)
    shutil.copy(site_copy.study(donor) / "slice_0002.dcm", study / intruder)

    result = ingest_site(site_copy.dir)

    # The donor's own study is intact: it still ingests, and is not blamed for the victim's folder.
    assert_only_these_excluded(result, site_copy.dir, site_copy.truth, {victim: BROKEN_SERIES})
    detail = exclusion_of(result, _pseudonym(site_copy, victim)).detail
    assert detail.startswith(f"imaging/{study.name}/") and intruder in detail
    assert "exactly one series" in detail


def test_missing_seg_excludes_that_patient_naming_the_folder(site_copy):
    (victim,) = _victims(site_copy)
    study = site_copy.study(victim)
    (study / "seg.dcm").unlink()

    result = ingest_site(site_copy.dir)

    assert_only_these_excluded(result, site_copy.dir, site_copy.truth, {victim: MISSING_LABEL})
    assert exclusion_of(result, _pseudonym(site_copy, victim)).detail == f"{study.name}: no DICOM SEG"


def test_second_seg_excludes_that_patient_naming_both_files(site_copy):
    (victim,) = _victims(site_copy)
    study = site_copy.study(victim)
    shutil.copy(study / "seg.dcm", study / "seg_reviewed.dcm")

    result = ingest_site(site_copy.dir)

    assert_only_these_excluded(result, site_copy.dir, site_copy.truth, {victim: MISSING_LABEL})
    detail = exclusion_of(result, _pseudonym(site_copy, victim)).detail
    assert detail.startswith(f"{study.name}: 2 DICOM SEG files")
    assert "seg.dcm" in detail and "seg_reviewed.dcm" in detail


def test_seg_of_another_patient_excludes_that_patient_naming_the_seg(site_copy):
    victim, donor = _victims(site_copy, 2)
    study = site_copy.study(victim)
    shutil.copy(site_copy.study(donor) / "seg.dcm", study / "seg.dcm")

    result = ingest_site(site_copy.dir)

    assert_only_these_excluded(result, site_copy.dir, site_copy.truth, {victim: MISSING_LABEL})
    detail = exclusion_of(result, _pseudonym(site_copy, victim)).detail
    assert detail.startswith(f"imaging/{study.name}/seg.dcm: references series")
    # The UIDs themselves stay out of the report (they identify the examination).
    donor_series = str(pydicom.dcmread(site_copy.study(donor) / "slice_0001.dcm").SeriesInstanceUID)
    assert donor_series not in detail and "<UID>" in detail


def test_invalid_fhir_patient_excludes_that_patient_naming_file_and_line(site_copy):
    (victim,) = _victims(site_copy)
    lineno = _break_patient_record(site_copy, victim)

    result = ingest_site(site_copy.dir)

    assert_only_these_excluded(result, site_copy.dir, site_copy.truth, {victim: INVALID_FHIR})
    detail = exclusion_of(result, _pseudonym(site_copy, victim)).detail
    assert f"fhir/Patient.ndjson:{lineno}" in detail
    patient_issues = [i for i in result.fhir_issues if i.startswith(f"fhir/Patient.ndjson:{lineno} ")]
    assert len(patient_issues) == 1 and "birthDate" in patient_issues[0]
    assert "1960-13-45" not in json.dumps(result.report())  # the bad value may be a real date


def test_fhir_patient_without_imaging_is_reported(site_copy):
    (victim,) = _victims(site_copy)
    shutil.rmtree(site_copy.study(victim))

    result = ingest_site(site_copy.dir)

    assert_only_these_excluded(result, site_copy.dir, site_copy.truth, {victim: NO_IMAGING})
    assert "imaging" in exclusion_of(result, _pseudonym(site_copy, victim)).detail


def test_check_command_counts_exclusions_per_reason(site_copy, capsys):
    no_slice, no_seg, bad_record, no_study = _victims(site_copy, 4)
    (site_copy.study(no_slice) / "slice_0003.dcm").unlink()
    (site_copy.study(no_seg) / "seg.dcm").unlink()
    _break_patient_record(site_copy, bad_record)
    shutil.rmtree(site_copy.study(no_study))

    assert main(["data", "check", str(site_copy.dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    consent = Counter(CONSENT_REASON[c.patient.consent] for c in site_copy.truth
                      if c.patient.consent != "active")
    assert report["excluded_by_reason"] == {
        **consent, BROKEN_SERIES: 1, MISSING_LABEL: 1, INVALID_FHIR: 1, NO_IMAGING: 1}
    assert report["usable"] == len(active_indices(site_copy.truth)) - 4
    assert report["excluded"] == len(site_copy.truth) - report["usable"]
    assert report["site"] == "site-1" and len(report["exclusions"]) == report["excluded"]
