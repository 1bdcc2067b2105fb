"""The patient identifiers a site's input files hold, for tests that scan outputs for leaks
(shared by several test folders: on the path through pytest's ``pythonpath``)."""

from __future__ import annotations

import datetime as dt
import json
import re
import zipfile
from pathlib import Path

import pydicom


def date_spellings(value: str) -> set[str]:
    """A date in both spellings the inputs use: FHIR YYYY-MM-DD and DICOM YYYYMMDD."""
    day = dt.date.fromisoformat(value) if "-" in value else dt.datetime.strptime(value, "%Y%m%d").date()
    return {day.isoformat(), day.strftime("%Y%m%d")}


def fhir_logical_ids(site_dir: Path) -> set[str]:
    """The logical id of every FHIR resource in the site's export, bare and as ``Type/id``: the
    hospital's own identifiers of its records (a line a test damaged is skipped)."""
    found: set[str] = set()
    for path in sorted((site_dir / "fhir").glob("*.ndjson")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                resource = json.loads(line)
            except ValueError:
                continue
            if isinstance(resource, dict) and resource.get("id"):
                found |= {str(resource["id"]), f"{resource.get('resourceType')}/{resource['id']}"}
    return found


def identifiers_in_input(site_dir: Path) -> set[str]:
    """Every patient identifier the site's files hold (MRNs, names, birth dates, DICOM UIDs,
    accession numbers, FHIR logical ids), read from the files themselves; a DICOM file a test
    damaged is skipped."""
    found: set[str] = fhir_logical_ids(site_dir)
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


# Shorter identifiers (names, say) are matched as whole words only: a 4-letter name occurs inside
# longer words of any log. Binary content is searched for the long ones only (random bytes).
LONG = 8


def leaks_in_text(identifiers: set[str], text: str) -> set[str]:
    """The identifiers that occur in ``text``."""
    found = {v for v in identifiers if len(v) >= LONG and v in text}
    short = [v for v in identifiers if len(v) < LONG]
    if short:
        pattern = re.compile(r"(?<![\w])(" + "|".join(map(re.escape, short)) + r")(?![\w])")
        found |= set(pattern.findall(text))
    return found


def leaks_in_tree(identifiers: set[str], root: Path, skip: tuple[Path, ...] = ()) -> dict[str, set[str]]:
    """Identifiers found in every file under ``root`` (zip archives opened, members searched),
    by file; folders in ``skip`` (the input data itself) are not searched."""
    found: dict[str, set[str]] = {}
    long_only = {v for v in identifiers if len(v) >= LONG}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(path.is_relative_to(s) for s in skip):
            continue
        members = [(str(path), path.read_bytes())]
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                members = [(f"{path}!{name}", archive.read(name)) for name in archive.namelist()
                           if not name.endswith("/")]
        for where, data in members:
            if b"\0" in data[:8192]:  # binary: models, SQLite pages, images
                hits = {v for v in long_only if v.encode() in data}
            else:
                hits = leaks_in_text(identifiers, data.decode("utf-8", errors="replace"))
            if hits:
                found[where] = hits
    return found
