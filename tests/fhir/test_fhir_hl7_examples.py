"""The adapter reads the official HL7 R4 examples, not only what our own writer produces."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import pytest

from clinfed.data.study import load_study
from fhir_adapter import harmonise_site, iter_fhir_file


def label(raw: str) -> str:
    """How an issue names a resource: type and the pseudonym of the logical id (see conftest)."""
    return f"{raw.split('/', 1)[0]}/pid-" + hashlib.sha256(b"test-key|fhir-id:" + raw.encode()).hexdigest()[:20]


STUDY = "clinfed-tumour-seg"
EXPECTED_COUNTS = {  # resources per fixture file that must come back valid
    "Bundle-ghp.json": 55,
    "Bundle-bundle-references.json": 11,
    "Bundle-bundle-transaction.json": 6,
    "Bundle-3a0707d3-549e-4467-b8b8-5a2ab3800efe.json": 4,
}

LIVER = load_study("clinfed-tumour-seg").fhir


def test_every_hl7_example_validates_as_r4_through_the_parser(hl7_dir):
    files = sorted(hl7_dir.glob("*.json"))
    assert len(files) >= 20
    types = set()
    for path in files:
        issues = []
        parsed = list(iter_fhir_file(path, issues.append))
        assert issues == [], path.name
        assert len(parsed) == EXPECTED_COUNTS.get(path.name, 1), path.name
        types.update(p.resource_type for p in parsed)
        for p in parsed:
            assert type(p.model).__module__.startswith("fhir.resources.R4B.")
    assert {"Patient", "Observation", "Condition", "ImagingStudy", "Consent"} <= types


def test_bundle_entries_report_the_line_where_the_entry_starts(hl7_dir):
    path = hl7_dir / "Bundle-ghp.json"
    lines = path.read_text(encoding="utf-8").splitlines()
    parsed = list(iter_fhir_file(path, pytest.fail))
    for p in parsed:
        assert lines[p.line - 1].strip() == "{"
        window = "\n".join(lines[p.line - 1:p.line + 4])
        assert f'"id": "{p.raw["id"]}"' in window
    assert len({p.line for p in parsed}) == len(parsed)


def test_hl7_bundle_labs_in_mmol_per_litre_harmonise_to_canonical_units(tmp_path, hl7_dir, pseudonymise):
    # Bundle-ghp gives glucose 7.4 mmol/L and creatinine 0.09 mmol/L with a printed unit only.
    for name in ("Patient-pat2.json", "Bundle-ghp.json"):
        shutil.copy(hl7_dir / name, tmp_path / name)
    site = harmonise_site(tmp_path, LIVER, pseudonymise)
    assert site.issues == []
    row = site.row(pseudonymise("123456"))
    assert row.features["glucose"] == pytest.approx(7.4, rel=1e-9)
    assert row.features["creatinine"] == pytest.approx(90.0, rel=1e-9)
    assert row.consent_status == "none"
    assert site.resources_read == {"DiagnosticReport": 1, "Observation": 51, "Patient": 1, "Specimen": 3}


def _ndjson_from_examples(hl7_dir, tmp_path, names):
    path = tmp_path / "examples.ndjson"
    with path.open("w", encoding="utf-8") as fh:
        for name in names:
            fh.write(json.dumps(json.loads((hl7_dir / name).read_text(encoding="utf-8"))) + "\n")
    return path


EXAMPLES_FOR_NDJSON = [
    "Observation-f001.json", "Observation-unsat.json", "Patient-f001.json", "Patient-example.json",
    "Patient-dicom.json", "ImagingStudy-example.json", "ImagingStudy-example-xr.json",
    "Condition-example.json", "Consent-consent-example-basic.json", "Observation-example.json",
]


def test_ndjson_of_hl7_examples_harmonises_with_untyped_mrn_systems(tmp_path, hl7_dir, pseudonymise):
    path = _ndjson_from_examples(hl7_dir, tmp_path, EXAMPLES_FOR_NDJSON)
    site = harmonise_site(path, dataclasses.replace(LIVER, mrn_systems=frozenset((
        "urn:oid:2.16.840.1.113883.2.4.6.3", "http://nema.org/examples/patients"))), pseudonymise)
    assert site.issues == []
    assert set(site.rows) == {pseudonymise("738472983"), pseudonymise("12345"), pseudonymise("MINT1234")}
    f001 = site.row(pseudonymise("738472983"))
    assert f001.features["glucose"] == pytest.approx(6.3)  # the cancelled re-test does not count
    assert f001.consent_status == "none"  # consent-example-basic is not a research consent
    # Two ImagingStudies of one patient: two rows, one per study, in study-date order (the 2017
    # X-ray last), each with the patient's demographics.
    dicom = site.rows[pseudonymise("MINT1234")]
    assert [r.study_instance_uid for r in dicom] == ["2.16.124.113543.6003.1154777499.30246.19789.3503430045",
                                                     "2.16.124.113543.6003.1154777499.30246.19789.3503430046"]
    assert [r.features["sex_female"] for r in dicom] == [0, 0]
    assert set(site.by_study) == {r.study_instance_uid for r in dicom} | {f001.study_instance_uid} - {None}
    example = site.row(pseudonymise("12345"))
    assert example.features["age"] is None and example.study_instance_uid is None
    assert site.resources_read["Observation"] == 3


def test_ndjson_of_hl7_examples_reports_patients_without_typed_mrn(tmp_path, hl7_dir, pseudonymise):
    path = _ndjson_from_examples(hl7_dir, tmp_path, EXAMPLES_FOR_NDJSON)
    site = harmonise_site(path, LIVER, pseudonymise)
    assert set(site.rows) == {pseudonymise("12345")}
    no_mrn = {(i.line, i.resource) for i in site.issues if "no MRN" in i.problem}
    assert no_mrn == {(3, label("Patient/f001")), (5, label("Patient/dicom"))}
    assert all(i.path == str(path) for i in site.issues)
    # Resources of a patient already reported are skipped without a second issue each.
    assert len(site.issues) == 2


def test_hl7_references_resolve_absolute_urn_history_and_identifier_forms(tmp_path, hl7_dir, pseudonymise):
    bundle = json.loads((hl7_dir / "Bundle-bundle-references.json").read_text(encoding="utf-8"))
    value = 5.0
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Observation":
            resource["valueQuantity"] = {"value": value, "system": "http://unitsofmeasure.org",
                                         "code": "mmol/L"}
            resource["effectiveDateTime"] = f"2020-01-{int(value):02d}"
            value += 1
        elif resource["resourceType"] == "Patient" and "identifier" not in resource:
            resource["identifier"] = [{"system": "http://example.org/ids",
                                       "value": f"mrn-{resource.get('id', 'anon')}"}]
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(bundle, indent=1), encoding="utf-8")
    site = harmonise_site(path, dataclasses.replace(LIVER, mrn_systems=frozenset(("http://example.org/ids",))),
                          pseudonymise)
    # Patient/23 (MRN 1234567) is referenced relatively (5), absolutely (6), by the second
    # Observation/14 (9) and by identifier (11): the latest effective date wins.
    assert site.row(pseudonymise("1234567")).features["glucose"] == 11.0
    assert site.row(pseudonymise("mrn-anon")).features["glucose"] == 7.0  # via urn:uuid fullUrl
    assert site.row(pseudonymise("mrn-45")).features["glucose"] == 10.0  # Patient/45/_history/2
    unresolved = sorted(i.resource for i in site.issues if "not a Patient in this export" in i.problem)
    assert unresolved == [label("Observation/14")]  # http://example.org/fhir-2/Patient/1
    assert any(i.resource == label("Patient/45") and "duplicate" in i.problem for i in site.issues)
