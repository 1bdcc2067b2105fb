"""Turn one site's FHIR R4 export into pseudonymised rows, one per imaging study, under a study's rules.

What is read comes from the study definition (:class:`~fhir_adapter.rules.FhirRules`); this
module holds no code list. A row (:class:`HarmonisedRow`) is one ImagingStudy of one patient,
joined by its StudyInstanceUID (identifier system ``urn:dicom:uid``, ``urn:oid:`` prefix
removed); every feature is taken relative to that study's ``started`` date:

- ``age``: years from ``birthDate`` to the study date (days / 365.25); ``sex_female``: 1 for
  gender female, 0 for male, missing for other and unknown.
- labs: quantity Observations coded in the lab's value set, converted to its canonical UCUM unit
  (:mod:`fhir_adapter.units`), the one closest to the study date within the lab's window (an
  undated one only when no dated one is in the window).
- coded features (e.g. staging): the value map of the closest coded Observation in the window.
- diagnoses: 1 when a Condition in the value set is dated within the window before the study
  (an undated Condition counts as history), else 0; missing when the patient has no Condition.
- the outcome: the class its value map gives the closest outcome Observation in the window.

A patient without any ImagingStudy gets one row with no study UID, its values the latest.
A value that is absent, implausible (outside the study's range, age outside 0-120, gender
outside the FHIR value set, not a finite number) or in a unit that does not convert is missing
(``None``), and every implausible or unconvertible one is an issue naming file, line and field.

Consent is the patient's, decided by :mod:`fhir_adapter.consent`. Issues never carry patient
data: logical ids appear pseudonymised (``Patient/<pseudonym of the id>``), like MRNs; values,
MRNs, names and dates are never echoed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir_adapter import terminology as t
from fhir_adapter.consent import ConsentFact, Decision, decide, read_consent
from fhir_adapter.errors import FhirInputError
from fhir_adapter.reader import ParsedResource, fhir_files, iter_fhir_file
from fhir_adapter.rules import FhirRules, Window
from fhir_adapter.units import UnitError, conversion_factor, normalise_printed_unit

_DICOM_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_IGNORED_OBSERVATION_STATUS = {"entered-in-error", "cancelled"}
_IGNORED_STUDY_STATUS = {"entered-in-error", "cancelled"}
_IGNORED_VERIFICATION = {"refuted", "entered-in-error"}


@dataclass(frozen=True)
class HarmonisedRow:
    """One imaging study of one patient (or the patient alone, ``study_instance_uid`` None).

    ``features`` maps every name of ``FhirRules.feature_names`` to a value or None (missing).
    ``study_date`` stays at the site: it never enters a case, a report or a log.
    """

    pseudonym: str
    study_instance_uid: str | None
    study_date: dt.date | None
    features: dict[str, float | None]
    outcome: int | None
    consent_status: str

    def as_dict(self) -> dict[str, Any]:
        return {"pseudonym": self.pseudonym, "study_instance_uid": self.study_instance_uid,
                **self.features, "outcome": self.outcome, "consent_status": self.consent_status}


@dataclass(frozen=True)
class ConsentDecision:
    """The consent that decides whether a pseudonym's data may be used for the study.

    ``consent_resource`` is the deciding Consent exactly as read (canonical JSON, bytes): the
    evidence the site relied on, for the ledger's keyed commitment; ``consent_source`` its
    ``file:line``. ``consent_sha256`` is the SHA-256 of ``consent_resource``. All None for
    ``"none"``.
    """

    pseudonym: str
    status: str  # active | revoked | draft | proposed | none
    consent_sha256: str | None
    consent_resource: bytes | None = None
    consent_source: str | None = None
    period: tuple[dt.date | None, dt.date | None] | None = None


@dataclass
class HarmonisedSite:
    rows: dict[str, tuple[HarmonisedRow, ...]]  # pseudonym -> its rows, by study date
    consents: dict[str, ConsentDecision]
    issues: list[FhirInputError]
    resources_read: dict[str, int]  # valid resources per resourceType
    feature_names: tuple[str, ...] = ()
    by_study: dict[str, HarmonisedRow] = field(default_factory=dict)  # StudyInstanceUID -> row

    def table(self) -> list[dict[str, Any]]:
        """Every row as a dict (pseudonym, study UID, features, outcome, consent), sorted."""
        return [row.as_dict() for p in sorted(self.rows) for row in self.rows[p]]

    def row(self, pseudonym: str) -> HarmonisedRow:
        """The single row of a patient with exactly one (tests and one-study exports)."""
        (only,) = self.rows[pseudonym]
        return only


def canonical_json(resource: dict[str, Any]) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8 (non-ASCII kept as is)."""
    return json.dumps(resource, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def consent_sha256(resource: dict[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of a FHIR resource."""
    return hashlib.sha256(canonical_json(resource)).hexdigest()


# ----------------------------------------------------------------------------- facts
# One pass over the files extracts small facts; they are joined to patients afterwards,
# because a bulk export lists Observation.ndjson before Patient.ndjson.


@dataclass
class _Source:
    path: Path
    line: int
    label: str  # already pseudonymised
    order: int

    def issue(self, problem: str) -> FhirInputError:
        return FhirInputError(self.path, self.line, problem, self.label)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


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
    kind: str  # study | dx | lab | coded | outcome | consent | condition
    name: str | None
    value: Any
    when: dt.date | None = None


@dataclass
class _Collected:
    patients: dict[str, _Patient] = field(default_factory=dict)  # "Patient/id" -> patient
    aliases: dict[str, str] = field(default_factory=dict)  # fullUrl -> key
    by_identifier: dict[tuple[str | None, str], str] = field(default_factory=dict)
    unusable: set[str] = field(default_factory=set)  # Patient keys reported already
    facts: list[_Fact] = field(default_factory=list)


class _Harmoniser:
    def __init__(self, rules: FhirRules, pseudonymise: Callable[[str], str]):
        self.rules = rules
        self.pseudonymise = pseudonymise
        self.issues: list[FhirInputError] = []
        self.c = _Collected()
        self._labels: dict[str, str] = {}
        # (system, code) -> ("lab"|"coded"|"outcome", feature): one dict lookup per coding.
        self.observation_codes: dict[tuple[str, str], tuple[str, Any]] = {}
        for kind, features in (("lab", rules.labs), ("coded", rules.coded),
                               ("outcome", [rules.outcome] if rules.outcome else [])):
            for feature in features:
                for coding in feature.codes.codes:
                    self.observation_codes[coding] = (kind, feature)

    # -- ids never appear in clear: Type/<pseudonym of the logical id>
    def label(self, raw_label: str | None) -> str | None:
        if raw_label is None or "/" not in raw_label:
            return raw_label
        if raw_label not in self._labels:
            rtype = raw_label.split("/", 1)[0]
            self._labels[raw_label] = f"{rtype}/{self.pseudonymise('fhir-id:' + raw_label)}"
        return self._labels[raw_label]

    def add_issue(self, issue: FhirInputError) -> None:
        if issue.resource:
            issue = FhirInputError(issue.path, issue.line, issue.problem, self.label(issue.resource))
        self.issues.append(issue)

    # -- one resource
    def collect(self, parsed: ParsedResource, order: int) -> None:
        src = _Source(parsed.path, parsed.line, self.label(parsed.label), order)
        model, rtype = parsed.model, parsed.resource_type
        if rtype == "Patient":
            self._patient(parsed, src)
        elif rtype == "ImagingStudy":
            if model.status in _IGNORED_STUDY_STATUS:
                return
            uid = _study_uid(model)
            if uid is None:
                self.issues.append(src.issue("ImagingStudy has no Study Instance UID: expected an identifier "
                                             f"with system {t.DICOM_UID_SYSTEM}"))
            elif not _DICOM_UID.match(uid) or len(uid) > 64:
                self.issues.append(src.issue("ImagingStudy identifier is not a valid DICOM UID (digits and dots, "
                                             "at most 64 characters)"))
            else:
                self.c.facts.append(_Fact(src, model.subject, "study", None, uid, _to_date(model.started)))
        elif rtype == "Condition":
            self._condition(model, src)
        elif rtype == "Observation":
            self._observation(model, src)
        elif rtype == "Consent":
            fact = read_consent(model, parsed.raw, self.rules.consent, order, src.where)
            if fact is None:
                return
            if model.patient is None:
                self.issues.append(src.issue("Consent for the study has no patient reference"))
                return
            self.c.facts.append(_Fact(src, model.patient, "consent", None, fact))

    def _patient(self, parsed: ParsedResource, src: _Source) -> None:
        model, c = parsed.model, self.c
        key = f"Patient/{model.id}" if model.id else (parsed.full_url or f"{src.path}:{src.line}")
        if key in c.patients or key in c.unusable:
            first = c.patients.get(key)
            where = f" (first read at {first.src.where})" if first else ""
            self.issues.append(src.issue(f"duplicate {self.label(key)}{where}; this copy is ignored"))
            return
        if parsed.full_url:
            c.aliases[parsed.full_url] = key
        identifier = _mrn_identifier(model, self.rules.mrn_systems)
        if identifier is None:
            c.unusable.add(key)
            self.issues.append(src.issue("Patient has no MRN: expected an identifier with type MR "
                                         f"({t.V2_0203}) and a value; the patient is left out"))
            return
        birth_date = _to_date(model.birthDate)
        if birth_date is not None and birth_date > dt.date.today():
            self.issues.append(src.issue("Patient.birthDate is in the future; age is treated as missing"))
            birth_date = None
        gender = model.gender
        if gender is not None and gender not in t.ADMINISTRATIVE_GENDERS:
            self.issues.append(src.issue("Patient.gender is not in the FHIR administrative-gender value set "
                                         f"({', '.join(t.ADMINISTRATIVE_GENDERS)}); sex is treated as missing"))
            gender = None
        c.patients[key] = _Patient(src, identifier.value, gender, birth_date)
        c.by_identifier.setdefault((identifier.system, identifier.value), key)

    def _condition(self, model: Any, src: _Source) -> None:
        if _codes(model.verificationStatus) & _IGNORED_VERIFICATION:
            return
        when = _to_date(model.recordedDate or model.onsetDateTime
                        or (model.onsetPeriod.start if model.onsetPeriod else None))
        self.c.facts.append(_Fact(src, model.subject, "condition", None, None, when))
        for feature in self.rules.diagnoses:
            if feature.codes.matches_concept(model.code):
                self.c.facts.append(_Fact(src, model.subject, "dx", feature.name, 1.0, when))

    def _observation(self, model: Any, src: _Source) -> None:
        if model.status in _IGNORED_OBSERVATION_STATUS or model.code is None:
            return
        found = None
        for coding in model.code.coding or ():
            found = self.observation_codes.get((coding.system, coding.code))
            if found:
                break
        if found is None:
            return
        kind, feature = found
        if model.subject is None:
            self.issues.append(src.issue(f"{feature.name} Observation has no subject: expected a Patient reference"))
            return
        when = _to_date(model.effectiveDateTime or model.effectiveInstant
                        or (model.effectivePeriod.start if model.effectivePeriod else None) or model.issued)
        if kind == "lab":
            value = self._lab_value(model, src, feature)
        else:
            table = feature.classes if kind == "outcome" else feature.values
            values = {table[(cd.system, cd.code)] for cd in (model.valueCodeableConcept.coding or ())
                      if (cd.system, cd.code) in table} if model.valueCodeableConcept else set()
            if len(values) != 1:
                if model.dataAbsentReason is None:
                    self.issues.append(src.issue(
                        f"{feature.name} Observation: valueCodeableConcept is not one of the study's "
                        f"{len(table)} mapped codes (Observation.valueCodeableConcept); treated as missing"))
                return
            value = values.pop()
        if value is not None:
            self.c.facts.append(_Fact(src, model.subject, kind, feature.name, value, when))

    def _lab_value(self, model: Any, src: _Source, lab) -> float | None:
        quantity = model.valueQuantity
        if quantity is None or quantity.value is None:
            if model.dataAbsentReason is None:
                self.issues.append(src.issue(f"{lab.name} Observation has no valueQuantity.value"))
            return None
        unit = quantity.code if quantity.code and quantity.system in (None, t.UCUM) else quantity.unit
        try:
            if not unit:
                raise UnitError("no unit")
            factor = conversion_factor(normalise_printed_unit(unit), lab.unit, lab.molar_mass_g_per_mol)
        except UnitError:
            # The unit itself is not echoed: free text from the source may carry patient data.
            self.issues.append(src.issue(f"{lab.name} Observation.valueQuantity unit is missing, not UCUM, or "
                                         f"does not convert to {lab.unit}; treated as missing"))
            return None
        value = float(quantity.value) * factor
        if not math.isfinite(value):
            self.issues.append(src.issue(f"{lab.name} Observation.valueQuantity.value is not a finite number; "
                                         "treated as missing"))
            return None
        low, high = lab.plausible
        if not low <= value <= high:
            self.issues.append(src.issue(f"{lab.name} Observation.valueQuantity.value is outside the plausible range "
                                         f"{low:g}-{high:g} {lab.unit}; treated as missing"))
            return None
        return value

    # -- assembly
    def assemble(self) -> tuple[dict[str, tuple[HarmonisedRow, ...]], dict[str, ConsentDecision]]:
        c = self.c
        pseudonyms: dict[str, str] = {}  # MRN -> pseudonym
        patient_of: dict[str, str] = {}  # Patient key -> pseudonym
        first_patient: dict[str, _Patient] = {}
        for key, patient in c.patients.items():
            if patient.mrn not in pseudonyms:
                pseudonyms[patient.mrn] = self.pseudonymise(patient.mrn)
            pseudonym = pseudonyms[patient.mrn]
            patient_of[key] = pseudonym
            if pseudonym in first_patient:
                other = first_patient[pseudonym].src
                self.issues.append(patient.src.issue(f"has the same MRN as {other.label} ({other.where}); their "
                                                     "records are merged"))
            else:
                first_patient[pseudonym] = patient

        facts_of: dict[str, list[_Fact]] = {p: [] for p in first_patient}
        for fact in c.facts:
            key = _resolve(fact.subject, c)
            if key in patient_of:
                facts_of[patient_of[key]].append(fact)
            elif key not in c.unusable:  # a Patient without MRN was reported already
                shown = self.label(key) if key and len(key) <= 80 else "the subject"
                self.issues.append(fact.src.issue(f"references {shown}, which is not a Patient in this export; "
                                                  "the resource is skipped"))

        rows: dict[str, tuple[HarmonisedRow, ...]] = {}
        consents: dict[str, ConsentDecision] = {}
        for pseudonym, patient in first_patient.items():
            by_kind: dict[str, list[_Fact]] = {}
            for fact in facts_of[pseudonym]:
                by_kind.setdefault(fact.kind, []).append(fact)
            decision = decide([f.value for f in by_kind.get("consent", [])])
            consents[pseudonym] = _consent_decision(pseudonym, decision)
            studies = sorted(by_kind.get("study", []), key=lambda f: (f.when or dt.date.min, f.src.order))
            seen: set[str] = set()
            patient_rows = []
            for study in studies or [None]:
                if study is not None and study.value in seen:
                    continue  # the same study listed twice: one case
                if study is not None:
                    seen.add(study.value)
                patient_rows.append(self._row(pseudonym, patient, by_kind, study, decision.status))
            rows[pseudonym] = tuple(patient_rows)
        return rows, consents

    def _row(self, pseudonym: str, patient: _Patient, by_kind: dict[str, list[_Fact]], study: _Fact | None,
             consent_status: str) -> HarmonisedRow:
        rules = self.rules
        day = study.when if study else None
        features: dict[str, float | None] = {}
        if rules.demographics.age:
            age = None
            if patient.birth_date and day and patient.birth_date > day:
                self.issues.append(patient.src.issue("Patient.birthDate is after the ImagingStudy start "
                                                     "(ImagingStudy.started); age is treated as missing"))
            elif patient.birth_date and day:
                age = (day - patient.birth_date).days / 365.25
                low, high = rules.demographics.age_range
                if not low <= age <= high:
                    self.issues.append(patient.src.issue(
                        f"age at the imaging study is outside the plausible range {low:g}-{high:g} years "
                        "(Patient.birthDate); age is treated as missing"))
                    age = None
            features["age"] = age
        if rules.demographics.sex:
            features["sex_female"] = {"female": 1.0, "male": 0.0}.get(patient.gender or "")
        for kind, group in (("lab", rules.labs), ("coded", rules.coded)):
            for feature in group:
                candidates = [f for f in by_kind.get(kind, []) if f.name == feature.name]
                features[feature.name] = _closest(candidates, day, feature.window)
        has_conditions = bool(by_kind.get("condition"))
        for feature in rules.diagnoses:
            hits = [f for f in by_kind.get("dx", []) if f.name == feature.name
                    and (day is None or f.when is None or feature.window.contains((f.when - day).days))]
            features[feature.name] = (1.0 if hits else 0.0) if has_conditions else None
        outcome = None
        if rules.outcome is not None:
            outcome = _closest(by_kind.get("outcome", []), day, rules.outcome.window)
        return HarmonisedRow(pseudonym, study.value if study else None, day, features,
                             None if outcome is None else int(outcome), consent_status)


def harmonise_site(fhir_dir: Path, rules: FhirRules, pseudonymise: Callable[[str], str]) -> HarmonisedSite:
    """Read every FHIR file in ``fhir_dir`` (or that one file) into rows under ``rules``.

    Args:
        fhir_dir: folder of a FHIR bulk export (NDJSON) and/or JSON Bundles, or one such file.
        rules: the study's FHIR rules (``StudyDefinition.fhir``).
        pseudonymise: maps an MRN (or a ``fhir-id:Type/id``) to its pseudonym; called once per value.

    Unusable resources become ``issues`` and are skipped; the rest is still harmonised. Files
    that are not FHIR exports are listed once each as ignored.
    """
    fhir_dir = Path(fhir_dir)
    work = _Harmoniser(rules, pseudonymise)
    if fhir_dir.is_file():
        paths = [fhir_dir]
    else:
        paths, ignored = fhir_files(fhir_dir)
        for path, why in ignored:
            work.issues.append(FhirInputError(path, None, f"ignored: {why}"))
    counts: Counter[str] = Counter()
    order = 0
    for path in paths:
        for parsed in iter_fhir_file(path, work.add_issue):
            counts[parsed.resource_type] += 1
            order += 1
            work.collect(parsed, order)
    rows, consents = work.assemble()
    by_study = {row.study_instance_uid: row for patient_rows in rows.values() for row in patient_rows
                if row.study_instance_uid}
    return HarmonisedSite(rows=rows, consents=consents, issues=work.issues, resources_read=dict(sorted(counts.items())),
                          feature_names=rules.feature_names, by_study=by_study)


def _consent_decision(pseudonym: str, decision: Decision) -> ConsentDecision:
    fact: ConsentFact | None = decision.fact
    if fact is None:
        return ConsentDecision(pseudonym, decision.status, None)
    resource = canonical_json(fact.resource)
    return ConsentDecision(pseudonym, decision.status, hashlib.sha256(resource).hexdigest(), resource,
                           fact.source, fact.period)


def _closest(facts: list[_Fact], day: dt.date | None, window: Window) -> Any:
    """Value of the fact closest to ``day`` within ``window`` (without a day: the latest)."""
    if not facts:
        return None
    if day is not None:
        inside = [f for f in facts if f.when is not None and window.contains((f.when - day).days)]
        if not inside:  # an undated result cannot be placed: it counts only when no dated one does
            undated = [f for f in facts if f.when is None]
            return min(undated, key=lambda f: f.src.order).value if undated else None
        return min(inside, key=lambda f: (abs((f.when - day).days), f.src.order)).value
    return min(facts, key=lambda f: (f.when is None, -f.when.toordinal() if f.when else 0, f.src.order)).value


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


def _mrn_identifier(patient: Any, mrn_systems: frozenset[str]) -> Any:
    for ident in patient.identifier or ():
        if not ident.value or ident.use == "old":
            continue
        if (ident.type is not None and "MR" in _codes(ident.type, t.V2_0203)) or ident.system in mrn_systems:
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


def _to_date(value: Any) -> dt.date | None:
    """The local calendar date of a FHIR date/dateTime/instant; None if absent or partial."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return None
