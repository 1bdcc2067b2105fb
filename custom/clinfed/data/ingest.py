"""Site ingestion: DICOM studies + FHIR export -> the pseudonymised cohort a site trains on.

Every patient ends up either in ``cases`` (usable) or in ``exclusions`` with a reason; nothing
is dropped silently. Only pseudonyms leave this module: cases carry no MRN, name, birth date
or DICOM UID.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from clinfed.data.dicom_io import read_seg, read_series
from clinfed.data.profiles import STUDY_ID
from clinfed.data.pseudonym import Pseudonymiser
from clinfed.errors import DicomInputError
from fhir_adapter import HarmonisedRow, harmonise_site

# Exclusion reasons, in the order the report lists them.
NO_CONSENT = "no consent"
CONSENT_REVOKED = "consent revoked"
BROKEN_SERIES = "broken series"
MISSING_LABEL = "missing or broken label"
INVALID_FHIR = "invalid or missing FHIR record"
NO_IMAGING = "no imaging study"
MISSING_OUTCOME = "missing outcome"
REASONS = (NO_CONSENT, CONSENT_REVOKED, BROKEN_SERIES, MISSING_LABEL, INVALID_FHIR, NO_IMAGING,
           MISSING_OUTCOME)

EHR_FEATURES = ("age_decades", "sex_female", "glucose_z", "creatinine_z", "dx_diabetes",
                "dx_hypertension", "glucose_missing", "creatinine_missing")
"""Model input built from the harmonised FHIR row (see ``ehr_vector``)."""


@dataclass
class Case:
    """One usable patient: everything the site trains on, keyed by pseudonym only."""

    pseudonym: str
    image: np.ndarray  # float32 (X, Y, Z)
    label: np.ndarray  # uint8 (X, Y, Z)
    spacing: tuple[float, float, float]
    ehr: np.ndarray  # float32, EHR_FEATURES
    outcome: int  # 1 = high grade


@dataclass
class Exclusion:
    subject: str  # pseudonym, or the study folder's name when no pseudonym could be read
    reason: str
    detail: str


@dataclass
class SiteIngestion:
    site_dir: Path
    study_id: str
    cases: list[Case] = field(default_factory=list)
    exclusions: list[Exclusion] = field(default_factory=list)
    fhir_issues: list[str] = field(default_factory=list)

    def report(self) -> dict:
        """Machine-readable summary: counts per reason and the exclusions (pseudonyms only)."""
        counts = Counter(e.reason for e in self.exclusions)
        return {
            "site": self.site_dir.name,
            "study": self.study_id,
            "usable": len(self.cases),
            "excluded": len(self.exclusions),
            "excluded_by_reason": {r: counts[r] for r in REASONS if counts[r]},
            "exclusions": [vars(e) for e in self.exclusions],
            "fhir_issues": self.fhir_issues,
        }


def ehr_vector(row: HarmonisedRow) -> np.ndarray:
    """Harmonised FHIR row -> fixed-length model input; missing labs imputed and flagged."""
    glucose = row.glucose_mmol_l
    creatinine = row.creatinine_umol_l
    return np.array([
        (row.age_at_study or 0.0) / 10.0 - 6.0,
        float(row.sex_female or 0),
        0.0 if glucose is None else (glucose - 6.0) / 1.6,
        0.0 if creatinine is None else (creatinine - 80.0) / 20.0,
        float(row.dx_diabetes),
        float(row.dx_hypertension),
        float(glucose is None),
        float(creatinine is None),
    ], dtype=np.float32)


def _pseudonym_of_folder(folder: Path, pseudonymise) -> str | None:
    """Pseudonym of the patient most readable DICOM headers name, to attribute a broken study.

    A folder polluted with another patient's file must not be blamed on that other patient,
    so only a PatientID held by more than half of the readable files counts.
    """
    ids: Counter[str] = Counter()
    for path in sorted(folder.iterdir()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        except Exception:  # any unreadable file: the others decide
            continue
        ids[str(ds.get("PatientID", "")).strip()] += 1
    if not ids:
        return None
    patient_id, count = ids.most_common(1)[0]
    if not patient_id or 2 * count <= sum(ids.values()):
        return None
    return pseudonymise(patient_id)


def _seg_files(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.iterdir()):
        try:
            if pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality") == "SEG":
                found.append(path)
        except Exception:  # unreadable files are reported by read_series
            continue
    return found


def ingest_site(site_dir: Path, study_id: str = STUDY_ID, pseudonymise: Pseudonymiser | None = None,
                progress=None) -> SiteIngestion:
    """Ingest one site folder (``imaging/`` studies and ``fhir/`` export) for ``study_id``."""
    site_dir = Path(site_dir)
    pseudonymise = pseudonymise or Pseudonymiser.for_site(site_dir)
    result = SiteIngestion(site_dir, study_id)

    ehr = harmonise_site(site_dir / "fhir", study_id, pseudonymise)
    result.fhir_issues = [_relative(issue, site_dir) for issue in ehr.issues]
    # A rejected Patient record yields no MRN, so it cannot be matched to a study; naming the
    # Patient records with issues lets the operator find it.
    patient_issues = [_relative_path(issue.path, site_dir) + (f":{issue.line}" if issue.line else "")
                         for issue in ehr.issues if _is_patient_issue(issue)]
    seen: set[str] = set()

    study_dirs = sorted(p for p in (site_dir / "imaging").iterdir() if p.is_dir()) if (site_dir / "imaging").is_dir() else []
    for folder in study_dirs:
        if progress is not None:
            progress.update(1)
        try:
            volume = read_series(folder)
        except DicomInputError as err:
            subject = _pseudonym_of_folder(folder, pseudonymise) or folder.name
            seen.add(subject)
            result.exclusions.append(Exclusion(subject, BROKEN_SERIES, _relative(err, site_dir)))
            continue
        pseudonym = pseudonymise(volume.patient_id)
        seen.add(pseudonym)
        row = ehr.rows.get(pseudonym)
        if row is None:
            see = f"; see FHIR issues at {', '.join(patient_issues)}" if patient_issues else ""
            result.exclusions.append(Exclusion(pseudonym, INVALID_FHIR,
                                               f"{folder.name}: no valid FHIR Patient for this study's patient{see}"))
            continue
        if row.consent_status != "active":
            reason = CONSENT_REVOKED if row.consent_status == "revoked" else NO_CONSENT
            result.exclusions.append(Exclusion(pseudonym, reason, f"consent for study {study_id}: {row.consent_status}"))
            continue
        segs = _seg_files(folder)
        if len(segs) != 1:
            problem = ("no DICOM SEG" if not segs else
                       f"{len(segs)} DICOM SEG files ({', '.join(p.name for p in segs)}), expected one")
            result.exclusions.append(Exclusion(pseudonym, MISSING_LABEL, f"{folder.name}: {problem}"))
            continue
        try:
            label = read_seg(segs[0], volume)
        except DicomInputError as err:
            result.exclusions.append(Exclusion(pseudonym, MISSING_LABEL, _relative(err, site_dir)))
            continue
        if row.outcome_high_grade is None:
            result.exclusions.append(Exclusion(pseudonym, MISSING_OUTCOME, "no tumour grade Observation"))
            continue
        result.cases.append(Case(pseudonym, volume.array, label, tuple(volume.spacing), ehr_vector(row),
                                 int(row.outcome_high_grade)))

    for pseudonym in sorted(set(ehr.rows) - seen):
        result.exclusions.append(Exclusion(pseudonym, NO_IMAGING, "FHIR Patient without an imaging study folder"))
    return result


# Four or more dot-separated numbers: a DICOM UID (never a spacing, a version or a line number).
_DICOM_UID = re.compile(r"(?<![\w.])[0-9]+(?:\.[0-9]+){3,}(?![\w.])")


def _relative_path(path: str, site_dir: Path) -> str:
    return path.replace(str(site_dir) + "/", "")


def _is_patient_issue(issue) -> bool:
    return (issue.resource or "").split("/")[0] == "Patient" or Path(issue.path).name.startswith("Patient.")


def _relative(err: Exception, site_dir: Path) -> str:
    """Error text for the report: paths relative to the site folder (no local layout) and
    DICOM UIDs masked, since Study and Series UIDs identify a patient's examination."""
    return _DICOM_UID.sub("<UID>", _relative_path(str(err), site_dir))
