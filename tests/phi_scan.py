"""The patient identifiers a site's input files hold, for tests that scan outputs for leaks
(shared by several test folders: on the path through pytest's ``pythonpath``)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pydicom


def date_spellings(value: str) -> set[str]:
    """A date in both spellings the inputs use: FHIR YYYY-MM-DD and DICOM YYYYMMDD."""
    day = dt.date.fromisoformat(value) if "-" in value else dt.datetime.strptime(value, "%Y%m%d").date()
    return {day.isoformat(), day.strftime("%Y%m%d")}


def identifiers_in_input(site_dir: Path) -> set[str]:
    """Every patient identifier the site's files hold (MRNs, names, birth dates, DICOM UIDs,
    accession numbers), read from the files themselves; a DICOM file a test damaged is skipped."""
    found: set[str] = set()
    for path in (site_dir / "imaging").rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - damaged on purpose by the test
            continue
        found |= {str(ds.PatientID), *str(ds.PatientName).split("^"), *date_spellings(ds.PatientBirthDate),
                  str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                  str(ds.get("AccessionNumber", ""))}
    for line in (site_dir / "fhir" / "Patient.ndjson").read_text(encoding="utf-8").splitlines():
        patient = json.loads(line)
        found |= {str(i["value"]) for i in patient["identifier"]}
        found |= {n["family"] for n in patient["name"]} | {g for n in patient["name"] for g in n["given"]}
        found |= date_spellings(patient["birthDate"])
    for line in (site_dir / "fhir" / "ImagingStudy.ndjson").read_text(encoding="utf-8").splitlines():
        study = json.loads(line)
        found |= {i["value"].removeprefix("urn:oid:") for i in study["identifier"]}
        found |= {s["uid"] for s in study["series"]}
    return {value for value in found if value}
