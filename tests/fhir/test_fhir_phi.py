"""Harmonised output carries pseudonyms and ages, never MRNs, names or birth dates."""

from __future__ import annotations

import dataclasses
import json

from clinfed.data.profiles import SITE_PROFILES, STUDY_ID
from clinfed.data.study import load_study
from fhir_adapter import harmonise_site

LIVER = load_study("clinfed-tumour-seg").fhir


def test_harmonised_output_contains_no_mrn_name_or_birth_date(tmp_path, make_patient, write_site,
                                                              append_lines, pseudonymise):
    patients = [make_patient(i) for i in range(9)]
    resources = write_site(tmp_path, patients, SITE_PROFILES[1])
    # Issues are output too: provoke some that concern patients.
    dup = dict(resources["Patient"][0])
    no_mrn = dict(resources["Patient"][1], id="no-mrn", identifier=[
        {"system": "urn:x", "value": patients[1].mrn}])
    bad_date = dict(resources["Patient"][2], id="bad-date", birthDate=f"{patients[2].birth_date:%d.%m.%Y}")
    append_lines(tmp_path / "Patient.ndjson", json.dumps(dup), json.dumps(no_mrn), json.dumps(bad_date))
    append_lines(tmp_path / "Observation.ndjson", json.dumps(dict(
        resources["Observation"][0], id="odd-unit", valueQuantity={"value": 3, "unit": patients[3].mrn})))

    site = harmonise_site(tmp_path, LIVER, pseudonymise)
    assert len(site.rows) == 9 and len(site.issues) == 4

    output = "\n".join([
        json.dumps(site.table()),
        json.dumps([dataclasses.asdict(c) for c in site.consents.values()], default=str),
        json.dumps(site.resources_read),
        repr(site),
        *(str(i) for i in site.issues),
        *(repr(i) for i in site.issues),
        *(json.dumps(vars(i)) for i in site.issues),
    ])
    for p in patients:
        for secret in (p.mrn, p.family_name, p.given_name, p.birth_date.isoformat(),
                       f"{p.birth_date:%d.%m.%Y}"):
            assert secret not in output, secret
        assert pseudonymise(p.mrn) in output
