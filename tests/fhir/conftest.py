"""Shared helpers for the FHIR tests: synthetic patients, a pseudonymiser, site folders."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import pytest

from clinfed.data.profiles import SITE_PROFILES, STUDY_ID, SyntheticPatient
from clinfed.data.synth_fhir import fhir_resources_for, merge_resources, write_bulk_export

HL7_DIR = Path(__file__).parent / "fixtures" / "hl7_r4"


def pseudonymise(mrn: str) -> str:
    return "pid-" + hashlib.sha256(b"test-key|" + mrn.encode()).hexdigest()[:20]


def make_patient(i: int, **overrides) -> SyntheticPatient:
    values = dict(
        mrn=f"HOSPMRN-{i:05d}",
        family_name=f"Vandersloot{chr(65 + i % 26)}",
        given_name=f"Ottilie{chr(65 + i % 26)}",
        birth_date=dt.date(1950 + i, 1 + i % 12, 1 + i % 27),
        sex="female" if i % 2 else "male",
        study_date=dt.date(2021, 1 + i % 12, 10),
        study_uid=f"1.2.826.0.1.3680043.8.498.{1000 + i}",
        series_uid=f"1.2.826.0.1.3680043.8.498.{2000 + i}",
        glucose_mmol_l=4.7 + 0.37 * i,
        creatinine_umol_l=61.3 + 7.9 * i,
        has_diabetes=i % 2 == 0,
        has_hypertension=i % 3 == 0,
        high_grade=i % 2 == 1,
        consent=("active", "revoked", "none")[i % 3],
    )
    values.update(overrides)
    return SyntheticPatient(**values)


def write_site(fhir_dir: Path, patients, profile=SITE_PROFILES[0], study_id=STUDY_ID) -> dict:
    resources = merge_resources([fhir_resources_for(p, profile, study_id) for p in patients])
    write_bulk_export(resources, fhir_dir)
    return resources


def append_lines(path: Path, *lines: str) -> list[int]:
    """Append raw lines to an NDJSON file; returns their 1-based line numbers."""
    existing = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    with path.open("a", encoding="utf-8") as fh:
        for line in lines:
            fh.write(line + "\n")
    return list(range(len(existing) + 1, len(existing) + 1 + len(lines)))


@pytest.fixture
def site_dir(tmp_path):
    """A site export with two good patients; returns (folder, patients, resources)."""
    patients = [make_patient(1, consent="active"), make_patient(2, consent="active")]
    fhir_dir = tmp_path / "fhir"
    resources = write_site(fhir_dir, patients)
    return fhir_dir, patients, resources


# Helpers reach the tests as fixtures, so the tests do not depend on pytest's import mode.

@pytest.fixture(name="pseudonymise")
def _pseudonymise_fixture():
    return pseudonymise


@pytest.fixture(name="make_patient")
def _make_patient_fixture():
    return make_patient


@pytest.fixture(name="write_site")
def _write_site_fixture():
    return write_site


@pytest.fixture(name="append_lines")
def _append_lines_fixture():
    return append_lines


@pytest.fixture(name="hl7_dir")
def _hl7_dir_fixture():
    return HL7_DIR


@pytest.fixture(name="label")
def _label_fixture():
    """How an issue names a resource: its type and the pseudonym of its logical id (ids are
    the hospital's own identifiers, never shown in clear)."""
    return lambda raw: f"{raw.split('/', 1)[0]}/{pseudonymise('fhir-id:' + raw)}"
