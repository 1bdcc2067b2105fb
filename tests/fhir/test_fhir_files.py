"""What lands in a site's fhir/ folder besides NDJSON: a Bundle on one NDJSON line is read, a
pretty-printed document in an .ndjson file is one issue (not one per line), and files that are
not FHIR are listed once each as ignored (issue 14). The rest of the export still harmonises."""

from __future__ import annotations

import gzip
import json

import pytest

from clinfed.data.study import load_study
from fhir_adapter import harmonise_site

LIVER = load_study("clinfed-tumour-seg").fhir


def _assert_good_patients(site, patients, pseudonymise):
    for p in patients:
        row = site.row(pseudonymise(p.mrn))
        assert row.study_instance_uid == p.study_uid
        assert row.features["glucose"] == pytest.approx(p.glucose_mmol_l, rel=1e-6)
        assert row.outcome == int(p.high_grade)


def _bundle_of(resources) -> dict:
    entries = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for rs in resources.values() for r in rs]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


@pytest.fixture
def extra(make_patient, write_site, tmp_path):
    """A third patient's whole record, to be delivered in an unusual file."""
    patient = make_patient(4, consent="active")
    return patient, write_site(tmp_path / "extra", [patient])


def test_a_bundle_on_one_ndjson_line_is_read_with_all_its_observations(site_dir, extra, pseudonymise):
    fhir_dir, patients, _ = site_dir
    patient, resources = extra
    (fhir_dir / "Extra.ndjson").write_text(json.dumps(_bundle_of(resources)) + "\n")
    site = harmonise_site(fhir_dir, LIVER, pseudonymise)
    assert site.issues == []
    _assert_good_patients(site, patients + [patient], pseudonymise)
    assert site.row(pseudonymise(patient.mrn)).consent_status == "active"


def test_a_pretty_printed_bundle_in_an_ndjson_file_is_one_issue_and_still_read(site_dir, extra, pseudonymise):
    fhir_dir, patients, _ = site_dir
    patient, resources = extra
    path = fhir_dir / "Extra.ndjson"
    path.write_text(json.dumps(_bundle_of(resources), indent=2) + "\n")
    assert len(path.read_text().splitlines()) > 100
    site = harmonise_site(fhir_dir, LIVER, pseudonymise)
    (issue,) = site.issues
    assert issue.path == str(path) and issue.line is None
    assert "pretty-printed JSON document, not NDJSON" in issue.problem and "read as a JSON file" in issue.problem
    _assert_good_patients(site, patients + [patient], pseudonymise)


def test_a_pretty_printed_file_that_is_not_json_either_is_one_issue_and_skipped(site_dir, pseudonymise):
    fhir_dir, patients, _ = site_dir
    path = fhir_dir / "Broken.ndjson"
    path.write_text('{\n  "resourceType": "Bundle",\n  "entry": [\n    {"resource": }\n  ]\n}\n')
    site = harmonise_site(fhir_dir, LIVER, pseudonymise)
    (issue,) = site.issues
    assert (issue.path, issue.line) == (str(path), 4)
    assert "not NDJSON (one resource per line) and not a valid JSON document either" in issue.problem
    assert "the file is skipped" in issue.problem
    _assert_good_patients(site, patients, pseudonymise)


def test_files_that_are_not_fhir_are_listed_once_each_as_ignored(site_dir, extra, pseudonymise):
    fhir_dir, patients, _ = site_dir
    _, resources = extra
    (fhir_dir / "notes.csv").write_text("mrn,note\n" * 50)
    with gzip.open(fhir_dir / "Extra.ndjson.gz", "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for rs in resources.values() for r in rs))
    (fhir_dir / ".DS_Store").write_bytes(b"\0\1")
    site = harmonise_site(fhir_dir, LIVER, pseudonymise)
    ignored = sorted((issue.path, issue.problem) for issue in site.issues)
    assert ignored == [
        (str(fhir_dir / "Extra.ndjson.gz"),
         "ignored: a compressed export is not read; decompress it (gunzip) into this folder"),
        (str(fhir_dir / "notes.csv"), "ignored: not a FHIR export file (expected .ndjson or .json)"),
    ]
    assert all(issue.line is None for issue in site.issues)
    _assert_good_patients(site, patients, pseudonymise)
