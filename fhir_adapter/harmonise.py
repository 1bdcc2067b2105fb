"""Turn one site's FHIR R4 export into one pseudonymised feature row per patient.

Schema of a row (:data:`FEATURE_COLUMNS`, in this order):

======================  =====================================================================
column                  meaning
======================  =====================================================================
pseudonym               ``pseudonymise(MRN)``; the MRN is the Patient identifier whose type is
                        v2-0203 ``MR`` (or whose system is in ``mrn_systems``).
study_instance_uid      DICOM Study Instance UID of the patient's ImagingStudy (identifier with
                        system ``urn:dicom:uid``, ``urn:oid:`` prefix removed). With several
                        studies, the latest ``started`` wins. None when there is none.
age_at_study            years from ``birthDate`` to that study's ``started``, as
                        ``days / 365.25``. None when either date is missing or partial.
sex_female              1 for ``gender`` female, 0 for male, None otherwise.
glucose_mmol_l          blood/serum glucose in mmol/L (from mg/dL, mmol/L). LOINC 2345-7,
                        2339-0, 15074-8, 14749-6.
creatinine_umol_l       serum creatinine in umol/L (from mg/dL, mmol/L, umol/L, µmol/L). LOINC
                        2160-0, 38483-4, 14682-9, 59826-8.
dx_liver_cancer         1 if a Condition codes liver cancer (SNOMED 25370001, 93870000;
                        ICD-10 C22.x), else 0.
dx_diabetes             1 for diabetes mellitus (SNOMED 73211009, 44054006, 46635009; ICD-10
                        E10-E14 and subcodes), else 0.
dx_hypertension         1 for hypertension (SNOMED 38341003, 59621000; ICD-10 I10-I13, I15),
                        else 0.
outcome_high_grade      tumour grade Observation (LOINC 33732-9): 1 for SNOMED 61026006 Grade 3,
                        0 for 54102005 Grade 1 or 1663004 Grade 2, None when absent.
consent_status          ``"active"``, ``"revoked"`` or ``"none"`` for the given study.
======================  =====================================================================

Rules worth knowing:

- With several lab or grade Observations, the one closest in time to the study wins (without
  a study date, the latest). Ties go to the one read first.
- ICD-10 is read from ``http://hl7.org/fhir/sid/icd-10``, ``-cm`` and the German ``-gm``
  systems; dots are ignored, so E11.9 and E119 both match E11. Conditions whose
  verificationStatus is refuted or entered-in-error do not count; clinicalStatus does not
  matter (history counts).
- A Consent counts for the study only when its ``provision.data`` (at any nesting level)
  references the identifier ``urn:clinfed:study|<study_id>``; the most deeply nested such
  provision's ``type`` applies. ``status`` active with ``permit`` -> active; active with
  ``deny``, ``inactive`` or ``rejected`` -> revoked; draft, proposed and entered-in-error are
  ignored. The latest ``dateTime`` wins (none counts as earliest); on a tie, revoked wins.
- Patient-identifying values (MRN, names, birth date) never reach the rows, the consent list
  or the issue messages.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fhir_adapter import terminology as t
from fhir_adapter.errors import FhirInputError
from fhir_adapter.reader import ParsedResource, fhir_files, iter_fhir_file

FEATURE_COLUMNS: tuple[str, ...] = (
    "pseudonym",
    "study_instance_uid",
    "age_at_study",
    "sex_female",
    "glucose_mmol_l",
    "creatinine_umol_l",
    "dx_liver_cancer",
    "dx_diabetes",
    "dx_hypertension",
    "outcome_high_grade",
    "consent_status",
)

CONSENT_STATUSES = ("active", "revoked", "none")

_DICOM_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_IGNORED_OBSERVATION_STATUS = {"entered-in-error", "cancelled"}
_IGNORED_STUDY_STATUS = {"entered-in-error", "cancelled"}
_IGNORED_VERIFICATION = {"refuted", "entered-in-error"}
_UTC = dt.timezone.utc
_SHOWN_UNITS = {"glucose": ("mmol/L", "mg/dL"), "creatinine": ("umol/L", "mmol/L", "mg/dL")}


@dataclass(frozen=True)
class HarmonisedRow:
    """One patient's features; field names and order are :data:`FEATURE_COLUMNS`."""

    pseudonym: str
    study_instance_uid: str | None
    age_at_study: float | None
    sex_female: int | None
    glucose_mmol_l: float | None
    creatinine_umol_l: float | None
    dx_liver_cancer: int
    dx_diabetes: int
    dx_hypertension: int
    outcome_high_grade: int | None
    consent_status: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ConsentDecision:
    """The consent that decides whether a pseudonym's data may be used for the study.

    ``consent_sha256`` is the SHA-256 (hex) of :func:`canonical_json` of the deciding Consent
    as read from the export; None when the status is ``"none"``.
    """

    pseudonym: str
    status: str
    consent_sha256: str | None


@dataclass
class HarmonisedSite:
    rows: dict[str, HarmonisedRow]
    consents: dict[str, ConsentDecision]
    issues: list[FhirInputError]
    resources_read: dict[str, int]  # valid resources per resourceType

    def table(self) -> list[dict[str, Any]]:
        """Rows as dicts in :data:`FEATURE_COLUMNS` order, sorted by pseudonym."""
        return [self.rows[p].as_dict() for p in sorted(self.rows)]


def canonical_json(resource: dict[str, Any]) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8 (non-ASCII kept as is)."""
    return json.dumps(resource, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def consent_sha256(resource: dict[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of a FHIR resource (the ledger's consent digest)."""
    return hashlib.sha256(canonical_json(resource)).hexdigest()


# ----------------------------------------------------------------------------- facts
# One pass over the files extracts small facts; they are joined to patients afterwards,
# because a bulk export lists Observation.ndjson before Patient.ndjson.


@dataclass
class _Source:
    path: Path
    line: int
    label: str
    order: int

    def issue(self, problem: str) -> FhirInputError:
        return FhirInputError(self.path, self.line, problem, self.label)


@dataclass
class _Patient:
    src: _Source
    mrn: str
    gender: str | None
    birth_date: dt.date | None


@dataclass
class _Fact:
    src: _Source
    subject: Any  # R4B Reference
    kind: str  # study | dx | glucose | creatinine | grade | consent
    value: Any
    when: dt.date | None = None
    consent_at: dt.datetime | None = None


@dataclass
class _Collected:
    patients: dict[str, _Patient] = field(default_factory=dict)  # "Patient/id" -> patient
    aliases: dict[str, str] = field(default_factory=dict)  # fullUrl -> key
    by_identifier: dict[tuple[str | None, str], str] = field(default_factory=dict)
    unusable: set[str] = field(default_factory=set)  # Patient keys reported already
    facts: list[_Fact] = field(default_factory=list)


def harmonise_site(fhir_dir: Path, study_id: str, pseudonymise: Callable[[str], str],
                   mrn_systems: Iterable[str] = ()) -> HarmonisedSite:
    """Read every ``.ndjson``/``.json`` file in ``fhir_dir`` (or that one file) into rows.

    Args:
        fhir_dir: folder of a FHIR bulk export (NDJSON) and/or JSON Bundles, or one such file.
        study_id: the research study whose Consents count (``urn:clinfed:study`` identifier).
        pseudonymise: maps an MRN to the pseudonym that keys the rows; called once per MRN.
        mrn_systems: identifier systems that are MRNs even without the ``MR`` type, for sites
            whose Patients carry untyped identifiers.

    Unusable resources become ``issues`` and are skipped; the rest is still harmonised.
    """
    fhir_dir = Path(fhir_dir)
    paths = [fhir_dir] if fhir_dir.is_file() else fhir_files(fhir_dir)
    issues: list[FhirInputError] = []
    counts: Counter[str] = Counter()
    collected = _Collected()
    order = 0
    for path in paths:
        for parsed in iter_fhir_file(path, issues.append):
            counts[parsed.resource_type] += 1
            order += 1
            src = _Source(parsed.path, parsed.line, parsed.label, order)
            _collect(parsed, src, study_id, frozenset(mrn_systems), collected, issues)
    rows, consents = _assemble(collected, pseudonymise, issues)
    return HarmonisedSite(rows=rows, consents=consents, issues=issues,
                          resources_read=dict(sorted(counts.items())))


def _collect(parsed: ParsedResource, src: _Source, study_id: str, mrn_systems: frozenset[str],
             out: _Collected, issues: list[FhirInputError]) -> None:
    model = parsed.model
    rtype = parsed.resource_type
    if rtype == "Patient":
        _collect_patient(parsed, src, mrn_systems, out, issues)
    elif rtype == "ImagingStudy":
        if model.status in _IGNORED_STUDY_STATUS:
            return
        uid = _study_uid(model)
        if uid is None:
            issues.append(src.issue("ImagingStudy has no Study Instance UID: expected an "
                                    f"identifier with system {t.DICOM_UID_SYSTEM}"))
        elif not _DICOM_UID.match(uid) or len(uid) > 64:
            issues.append(src.issue("ImagingStudy identifier is not a valid DICOM UID "
                                    "(digits and dots, at most 64 characters)"))
        else:
            out.facts.append(_Fact(src, model.subject, "study", uid, when=_to_date(model.started)))
    elif rtype == "Condition":
        if _codes(model.verificationStatus) & _IGNORED_VERIFICATION:
            return
        flags = _dx_flags(model.code)
        if flags:
            out.facts.append(_Fact(src, model.subject, "dx", flags))
    elif rtype == "Observation":
        _collect_observation(model, src, out, issues)
    elif rtype == "Consent":
        status = _consent_status(model, study_id)
        if status is None:
            return
        if model.patient is None:
            issues.append(src.issue("Consent for the study has no patient reference"))
            return
        out.facts.append(_Fact(src, model.patient, "consent", (status, consent_sha256(parsed.raw)),
                               consent_at=_to_utc(model.dateTime)))


def _collect_patient(parsed: ParsedResource, src: _Source, mrn_systems: frozenset[str],
                     out: _Collected, issues: list[FhirInputError]) -> None:
    model = parsed.model
    key = f"Patient/{model.id}" if model.id else (parsed.full_url or f"{src.path}:{src.line}")
    if key in out.patients or key in out.unusable:
        first = out.patients.get(key)
        where = f" (first read at {first.src.path}:{first.src.line})" if first else ""
        issues.append(src.issue(f"duplicate {key}{where}; this copy is ignored"))
        return
    if parsed.full_url:
        out.aliases[parsed.full_url] = key
    identifier = _mrn_identifier(model, mrn_systems)
    if identifier is None:
        out.unusable.add(key)
        issues.append(src.issue("Patient has no MRN: expected an identifier with type MR "
                                f"({t.V2_0203}) and a value; the patient is left out"))
        return
    birth_date = _to_date(model.birthDate)
    if birth_date is not None and birth_date > dt.date.today():
        issues.append(src.issue("birthDate is in the future; age is left empty"))
        birth_date = None
    out.patients[key] = _Patient(src, identifier.value, model.gender, birth_date)
    out.by_identifier.setdefault((identifier.system, identifier.value), key)


def _collect_observation(model: Any, src: _Source, out: _Collected,
                         issues: list[FhirInputError]) -> None:
    if model.status in _IGNORED_OBSERVATION_STATUS:
        return
    loinc = _codes(model.code, t.LOINC)
    if loinc & t.GLUCOSE_LOINC:
        kind, table, label = "glucose", t.GLUCOSE_TO_MMOL_L, "glucose"
    elif loinc & t.CREATININE_LOINC:
        kind, table, label = "creatinine", t.CREATININE_TO_UMOL_L, "creatinine"
    elif t.TUMOUR_GRADE_LOINC[0] in loinc:
        kind, table, label = "grade", None, "tumour grade"
    else:
        return
    if model.subject is None:
        issues.append(src.issue(f"{label} Observation has no subject: expected a Patient reference"))
        return
    when = _to_date(model.effectiveDateTime or model.effectiveInstant
                    or (model.effectivePeriod.start if model.effectivePeriod else None)
                    or model.issued)
    if kind == "grade":
        grades = {c: t.GRADE_TO_HIGH[c] for c in _codes(model.valueCodeableConcept, t.SNOMED)
                  if c in t.GRADE_TO_HIGH}
        if len(set(grades.values())) != 1:
            issues.append(src.issue("tumour grade is not one known SNOMED grade: expected "
                                    "valueCodeableConcept 54102005 (Grade 1), 1663004 (Grade 2) "
                                    "or 61026006 (Grade 3)"))
            return
        out.facts.append(_Fact(src, model.subject, kind, next(iter(grades.values())), when=when))
        return
    quantity = model.valueQuantity
    if (quantity is None or quantity.value is None) and model.dataAbsentReason is not None:
        return  # the lab said why there is no value; nothing to report
    if quantity is None or quantity.value is None:
        issues.append(src.issue(f"{label} Observation has no valueQuantity.value"))
        return
    unit = quantity.code if quantity.code and quantity.system in (None, t.UCUM) else quantity.unit
    factor = table.get(t.normalise_unit(unit)) if unit else None
    if factor is None:
        # The unit itself is not echoed: free text from the source may carry patient data.
        issues.append(src.issue(f"{label} valueQuantity unit is missing or not known: expected "
                                f"UCUM code or unit {' or '.join(_SHOWN_UNITS[kind])}"))
        return
    out.facts.append(_Fact(src, model.subject, kind, float(quantity.value) * factor, when=when))


# ----------------------------------------------------------------------------- assembly


def _assemble(c: _Collected, pseudonymise: Callable[[str], str],
              issues: list[FhirInputError]) -> tuple[dict[str, HarmonisedRow], dict[str, ConsentDecision]]:
    pseudonyms: dict[str, str] = {}  # MRN -> pseudonym
    patient_of: dict[str, str] = {}  # Patient key -> pseudonym
    first_patient: dict[str, _Patient] = {}
    for key, patient in c.patients.items():
        if patient.mrn not in pseudonyms:
            pseudonyms[patient.mrn] = pseudonymise(patient.mrn)
        pseudonym = pseudonyms[patient.mrn]
        patient_of[key] = pseudonym
        if pseudonym in first_patient:
            other = first_patient[pseudonym].src
            issues.append(patient.src.issue(f"has the same MRN as {other.label} ({other.path}:"
                                            f"{other.line}); their records are merged"))
        else:
            first_patient[pseudonym] = patient

    facts_of: dict[str, list[_Fact]] = {p: [] for p in first_patient}
    for fact in c.facts:
        key = _resolve(fact.subject, c)
        if key in patient_of:
            facts_of[patient_of[key]].append(fact)
        elif key not in c.unusable:  # a Patient without MRN was reported already
            shown = key if key and len(key) <= 80 else "the subject"
            issues.append(fact.src.issue(f"references {shown}, which is not a Patient in this "
                                         "export; the resource is skipped"))

    rows: dict[str, HarmonisedRow] = {}
    consents: dict[str, ConsentDecision] = {}
    for pseudonym, patient in first_patient.items():
        facts = facts_of[pseudonym]
        by_kind: dict[str, list[_Fact]] = {}
        for fact in facts:
            by_kind.setdefault(fact.kind, []).append(fact)
        study = max(by_kind.get("study", []), default=None,
                    key=lambda f: (f.when or dt.date.min, -f.src.order))
        study_date = study.when if study else None
        age = None
        if patient.birth_date and study_date:
            age = (study_date - patient.birth_date).days / 365.25
            if age < 0:
                issues.append(patient.src.issue("birthDate is after the ImagingStudy start; "
                                                "age is left empty"))
                age = None
        flags = set().union(*(f.value for f in by_kind.get("dx", [])))
        consent = max(by_kind.get("consent", []), default=None,
                      key=lambda f: (f.consent_at or dt.datetime.min.replace(tzinfo=_UTC),
                                     f.value[0] == "revoked", f.src.order))
        status, digest = consent.value if consent else ("none", None)
        rows[pseudonym] = HarmonisedRow(
            pseudonym=pseudonym,
            study_instance_uid=study.value if study else None,
            age_at_study=age,
            sex_female={"female": 1, "male": 0}.get(patient.gender or ""),
            glucose_mmol_l=_closest(by_kind.get("glucose"), study_date),
            creatinine_umol_l=_closest(by_kind.get("creatinine"), study_date),
            dx_liver_cancer=int("dx_liver_cancer" in flags),
            dx_diabetes=int("dx_diabetes" in flags),
            dx_hypertension=int("dx_hypertension" in flags),
            outcome_high_grade=_closest(by_kind.get("grade"), study_date),
            consent_status=status,
        )
        consents[pseudonym] = ConsentDecision(pseudonym, status, digest)
    return rows, consents


def _closest(facts: list[_Fact] | None, reference: dt.date | None) -> Any:
    if not facts:
        return None
    if reference is not None:
        best = min(facts, key=lambda f: (f.when is None,
                                         abs((f.when - reference).days) if f.when else 0,
                                         f.src.order))
    else:
        best = min(facts, key=lambda f: (f.when is None,
                                         -f.when.toordinal() if f.when else 0, f.src.order))
    return best.value


def _resolve(reference: Any, c: _Collected) -> str | None:
    """Patient key a Reference points to: relative, absolute, urn:uuid or by identifier."""
    if reference is None:
        return None
    ref = reference.reference
    if ref:
        if ref in c.aliases:
            return c.aliases[ref]
        parts = re.sub(r"/_history/[^/]*$", "", ref).split("/")
        if len(parts) >= 2 and parts[-2] == "Patient":
            return f"Patient/{parts[-1]}"
        return ref
    ident = reference.identifier
    if ident is not None and ident.value:
        return c.by_identifier.get((ident.system, ident.value))
    return None


# ----------------------------------------------------------------------------- helpers


def _mrn_identifier(patient: Any, mrn_systems: frozenset[str]) -> Any:
    for ident in patient.identifier or ():
        if not ident.value or ident.use == "old":
            continue
        if (ident.type is not None and "MR" in _codes(ident.type, t.V2_0203)) \
                or ident.system in mrn_systems:
            return ident
    return None


def _study_uid(study: Any) -> str | None:
    for ident in study.identifier or ():
        if ident.system == t.DICOM_UID_SYSTEM and ident.value:
            value = ident.value
            return value[len("urn:oid:"):] if value.startswith("urn:oid:") else value
    return None


def _codes(concept: Any, system: str | None = None) -> set[str]:
    """Codes of a CodeableConcept, optionally only those of one system."""
    if concept is None:
        return set()
    return {c.code for c in concept.coding or () if c.code and (system is None or c.system == system)}


def _dx_flags(concept: Any) -> set[str]:
    flags: set[str] = set()
    for coding in (concept.coding or ()) if concept is not None else ():
        if not coding.code:
            continue
        for flag, (snomed, icd_prefixes) in t.DX_FLAGS.items():
            if coding.system == t.SNOMED and coding.code in snomed:
                flags.add(flag)
            elif coding.system in t.ICD10_SYSTEMS:
                code = coding.code.replace(".", "").upper()
                if any(code.startswith(p) for p in icd_prefixes):
                    flags.add(flag)
    return flags


def _consent_status(consent: Any, study_id: str) -> str | None:
    """``"active"``/``"revoked"`` if this Consent is about the study, None if it does not count."""
    provision_type = _study_provision_type(consent.provision, study_id)
    if provision_type is None:
        return None
    if consent.status == "active":
        return "revoked" if provision_type == "deny" else "active"
    if consent.status in ("inactive", "rejected"):
        return "revoked"
    return None  # draft, proposed, entered-in-error


def _study_provision_type(provision: Any, study_id: str, inherited: str | None = None) -> str | None:
    """``type`` of the most deeply nested provision that names the study, None if none does."""
    if provision is None:
        return None
    own_type = provision.type or inherited or "permit"
    for child in provision.provision or ():
        found = _study_provision_type(child, study_id, own_type)
        if found is not None:
            return found
    for data in provision.data or ():
        ident = data.reference.identifier if data.reference is not None else None
        if ident is not None and ident.system == t.STUDY_IDENTIFIER_SYSTEM and ident.value == study_id:
            return own_type
    return None


def _to_date(value: Any) -> dt.date | None:
    """The local calendar date of a FHIR date/dateTime/instant; None if absent or partial."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return None


def _to_utc(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value.astimezone(_UTC) if value.tzinfo else value.replace(tzinfo=_UTC)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=_UTC)
    if isinstance(value, str):  # partial date: "2020" or "2020-05"
        parts = [int(p) for p in value.split("-")[:2]]
        return dt.datetime(parts[0], parts[1] if len(parts) > 1 else 1, 1, tzinfo=_UTC)
    return None
