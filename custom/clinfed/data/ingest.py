"""Site ingestion: DICOM studies + FHIR export -> the pseudonymised cases a site trains on, under a study.

A case is one imaging study (a folder under ``imaging/``): its series (chosen by the study
definition's series choice), its label (the chosen SEG segment), joined to the FHIR record by
the StudyInstanceUID of an ``ImagingStudy``, with the features taken relative to that study's
date. With several studies per patient, the definition says which count (first, last, all);
the patient stays the privacy unit (``Case.pseudonym``). A case without an outcome still
trains segmentation (``outcome`` None: its outcome loss is masked).

Every patient ends up either in ``cases`` or in ``exclusions`` with a reason; nothing is dropped
silently. Only pseudonyms leave this module: cases carry no MRN, name, birth date or DICOM UID.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from clinfed.data.dicom_io import read_seg, read_series, seg_files, seg_references_series
from clinfed.data.profiles import STUDY_ID
from clinfed.data.pseudonym import Pseudonymiser
from clinfed.data.study import StudyDefinition, load_study
from clinfed.errors import DicomInputError
from fhir_adapter import HarmonisedRow, harmonise_site
from fhir_adapter.rules import FhirRules

# Exclusion reasons, in the order the report lists them.
NO_CONSENT = "no consent"
CONSENT_REVOKED = "consent revoked"
CONSENT_NOT_IN_FORCE = "consent not in force (draft or proposed)"
CONSENT_PERIOD = "consent period does not cover the imaging date"
BROKEN_SERIES = "broken series"
MISSING_LABEL = "missing or broken label"
INVALID_FHIR = "invalid or missing FHIR record"
NOT_IN_RECORD = "imaging study not in the FHIR record"
NO_IMAGING = "no imaging study"
REASONS = (NO_CONSENT, CONSENT_REVOKED, CONSENT_NOT_IN_FORCE, CONSENT_PERIOD, BROKEN_SERIES, MISSING_LABEL,
           INVALID_FHIR, NOT_IN_RECORD, NO_IMAGING)
NOT_CHOSEN = "another study of the patient is the one the study definition takes"


@dataclass
class Case:
    """One usable imaging study: everything the site trains on, keyed by pseudonym only."""

    pseudonym: str  # the patient: the privacy unit
    image: np.ndarray  # float32 (X, Y, Z), real-world values (HU for CT)
    label: np.ndarray  # uint8 (X, Y, Z), 1 = the study's label segment
    spacing: tuple[float, float, float]
    ehr: np.ndarray  # float32: each feature's model input, then each feature's missing-indicator
    outcome: int | None  # None: no outcome in the window (segmentation only for this case)
    affine: np.ndarray | None = None  # 4x4 voxel -> RAS mm; None means diag(spacing)
    modality: str = "CT"
    case_id: str = ""  # pseudonym of the imaging study (names the case in errors, never a UID)

    def __post_init__(self):
        if not self.case_id:
            self.case_id = self.pseudonym


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
    studies_not_used: list[Exclusion] = field(default_factory=list)  # a patient's other studies

    def report(self) -> dict:
        """Machine-readable summary: counts per reason and the exclusions (pseudonyms only)."""
        counts = Counter(e.reason for e in self.exclusions)
        return {
            "site": self.site_dir.name,
            "study": self.study_id,
            "usable": len({c.pseudonym for c in self.cases}),
            "cases": len(self.cases),
            "cases_without_outcome": sum(c.outcome is None for c in self.cases),
            "excluded": len(self.exclusions),
            "excluded_by_reason": {r: counts[r] for r in REASONS if counts[r]},
            "exclusions": [vars(e) for e in self.exclusions],
            "studies_not_used": [vars(e) for e in self.studies_not_used],
            "fhir_issues": self.fhir_issues,
        }


def ehr_vector(row: HarmonisedRow, rules: FhirRules) -> np.ndarray:
    """A harmonised row -> the model's EHR input: every feature scaled ((value - centre) /
    scale, 0 when missing), then every feature's missing-indicator. Nothing is imputed silently:
    a missing value is 0 *and* flagged."""
    scaling = rules.scaling()
    values, missing = [], []
    for name in rules.feature_names:
        value = row.features.get(name)
        centre, scale = scaling[name]
        values.append(0.0 if value is None else (value - centre) / scale)
        missing.append(float(value is None))
    return np.array(values + missing, dtype=np.float32)


def _pseudonym_of_folder(folder: Path, pseudonymise) -> str | None:
    """Pseudonym of the patient most readable DICOM headers name, to attribute a broken study.

    A folder polluted with another patient's file must not be blamed on that other patient,
    so only a PatientID held by more than half of the readable files counts.
    """
    ids: Counter[str] = Counter()
    for path in sorted(folder.iterdir()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        except Exception:  # noqa: BLE001  (any unreadable file: the others decide)
            continue
        ids[str(ds.get("PatientID", "")).strip()] += 1
    if not ids:
        return None
    patient_id, count = ids.most_common(1)[0]
    if not patient_id or 2 * count <= sum(ids.values()):
        return None
    return pseudonymise(patient_id)


def ingest_site(site_dir: Path, study: StudyDefinition | str = STUDY_ID, pseudonymise: Pseudonymiser | None = None,
                progress=None) -> SiteIngestion:
    """Ingest one site folder (``imaging/`` studies and ``fhir/`` export) under a study definition
    (or the name of one, see :func:`clinfed.data.study.load_study`)."""
    site_dir = Path(site_dir)
    study = study if isinstance(study, StudyDefinition) else load_study(study)
    pseudonymise = pseudonymise or Pseudonymiser.for_site(site_dir)
    result = SiteIngestion(site_dir, study.id)
    rules = study.fhir

    ehr = harmonise_site(site_dir / "fhir", rules, pseudonymise)
    result.fhir_issues = [_relative(issue, site_dir) for issue in ehr.issues]
    # A rejected Patient record yields no MRN, so it cannot be matched to a study; naming the
    # Patient records with issues lets the operator find it.
    patient_issues = [_relative_path(issue.path, site_dir) + (f":{issue.line}" if issue.line else "")
                      for issue in ehr.issues if _is_patient_issue(issue)]
    seen: set[str] = set()
    candidates: dict[str, list[tuple[HarmonisedRow, Case, str]]] = {}

    imaging = site_dir / "imaging"
    study_dirs = sorted(p for p in imaging.iterdir() if p.is_dir()) if imaging.is_dir() else []
    for folder in study_dirs:
        if progress is not None:
            progress.update(1)
        try:
            volume = read_series(folder, study.imaging.series)
        except DicomInputError as err:
            subject = _pseudonym_of_folder(folder, pseudonymise) or folder.name
            seen.add(subject)
            result.exclusions.append(Exclusion(subject, BROKEN_SERIES, _relative(err, site_dir)))
            continue
        pseudonym = pseudonymise(volume.patient_id)
        seen.add(pseudonym)
        if pseudonym not in ehr.rows:
            see = f"; see FHIR issues at {', '.join(patient_issues)}" if patient_issues else ""
            result.exclusions.append(Exclusion(pseudonym, INVALID_FHIR,
                                               f"{folder.name}: no valid FHIR Patient for this study's patient{see}"))
            continue
        row = ehr.by_study.get(volume.study_uid)
        if row is None or row.pseudonym != pseudonym:
            problem = ("no ImagingStudy in the record has this folder's StudyInstanceUID" if row is None else
                       "the record's ImagingStudy with this StudyInstanceUID belongs to another patient than the "
                       "series' PatientID")
            result.exclusions.append(Exclusion(pseudonym, NOT_IN_RECORD, f"{folder.name}: {problem}"))
            continue
        decision = ehr.consents[pseudonym]
        if decision.status != "active":
            reason = {"revoked": CONSENT_REVOKED, "draft": CONSENT_NOT_IN_FORCE,
                      "proposed": CONSENT_NOT_IN_FORCE}.get(decision.status, NO_CONSENT)
            result.exclusions.append(Exclusion(pseudonym, reason, f"consent for study {study.id}: {decision.status}"))
            continue
        if rules.consent.period_must_cover_imaging and decision.period is not None:
            start, end = decision.period
            day = row.study_date
            if day is None or (start and day < start) or (end and day > end):
                result.exclusions.append(Exclusion(pseudonym, CONSENT_PERIOD,
                                                   f"{folder.name}: the deciding Consent's period does not cover "
                                                   "the imaging study's date"))
                continue
        all_segs = seg_files(folder)
        segs = [p for p in all_segs if seg_references_series(p, volume.series_uid)]
        if not segs and len(all_segs) == 1:
            segs = all_segs  # the folder's one SEG is of another series: read_seg says so, naming it
        if len(segs) != 1:
            problem = ("no DICOM SEG" if not segs else
                       f"{len(segs)} DICOM SEG files ({', '.join(p.name for p in segs)}), expected one")
            result.exclusions.append(Exclusion(pseudonym, MISSING_LABEL, f"{folder.name}: {problem}"))
            continue
        try:
            label = read_seg(segs[0], volume, study.imaging.label)
        except DicomInputError as err:
            result.exclusions.append(Exclusion(pseudonym, MISSING_LABEL, _relative(err, site_dir)))
            continue
        case = Case(pseudonym, volume.array, label, tuple(volume.spacing), ehr_vector(row, rules), row.outcome,
                    affine=volume.affine, modality=volume.modality,
                    case_id=pseudonymise("study:" + volume.study_uid))
        candidates.setdefault(pseudonym, []).append((row, case, folder.name))

    choice = study.imaging.studies_per_patient
    for pseudonym, found in candidates.items():
        found.sort(key=lambda item: (item[0].study_date is None, item[0].study_date, item[2]))
        chosen = found if choice == "all" else [found[0] if choice == "first" else found[-1]]
        for row, case, name in found:
            if any(case is c for _, c, _ in chosen):
                result.cases.append(case)
            else:
                result.studies_not_used.append(Exclusion(pseudonym, NOT_CHOSEN, f"{name}: studies_per_patient is "
                                                                                f"{choice}"))

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
