"""FHIR R4 resources for a synthetic patient, written as a bulk-data export (NDJSON).

Each site writes in its own dialect (``SiteProfile``): lab units, LOINC codes that go with
them, and SNOMED or ICD-10 diagnoses, so ``fhir_adapter.harmonise_site`` has real work to do.
The code tables here are the writer's own; what a study reads comes from its definition.

Liver study consent encoding (a study reference):

- ``"active"``: one Consent, status active, scope research, ``provision.type`` permit.
- ``"revoked"``: that same grant, plus a later Consent (status active, ``provision.type``
  deny, ``policyRule`` OPTOUT). The export keeps the history, so the digest of the original
  grant stays verifiable; the latest ``dateTime`` decides.
- ``"none"``: no Consent.

The study is named in ``provision.data``: ``{"meaning": "related", "reference":
{"identifier": {"system": "urn:clinfed:study", "value": study_id}}}``.

Brain study (another hospital network's dialect): broad research consents (scope research,
purpose HRESCH, a five-year period from two weeks before the scan, no study reference; a
revocation is a later Consent with status inactive), the WHO grade as LOINC 21858-5 valued in a
local code system (G1-G4), sodium and CRP, epilepsy as a diagnosis.

Ids are UUIDv5 of the site's MRN system and MRN, so the same patient always yields the same
resources byte for byte.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

from fhir_adapter import terminology as t

from clinfed.data.profiles import SiteProfile, SyntheticPatient

DIAGNOSIS_SYSTEMS = {"snomed": t.SNOMED, "icd10": t.ICD10}
"""SiteProfile.diagnosis_system -> FHIR code system URL."""
# Diagnoses: (SNOMED code, ICD-10 code, display) that the writer emits.
DX_LIVER_CANCER = ("25370001", "C22.0", "Hepatocellular carcinoma")
DX_DIABETES = ("44054006", "E11.9", "Type 2 diabetes mellitus without complications")
DX_HYPERTENSION = ("38341003", "I10", "Hypertensive disorder")
DX_BRAIN_TUMOUR = ("393563007", "C71.9", "Glioblastoma multiforme")
DX_EPILEPSY = ("84757009", "G40.9", "Epilepsy")
# Laboratory results: LOINC code and display the writer uses per site unit.
GLUCOSE_LOINC_BY_UNIT = {"mg/dL": ("2345-7", "Glucose [Mass/volume] in Serum or Plasma"),
                         "mmol/L": ("15074-8", "Glucose [Moles/volume] in Blood")}
CREATININE_LOINC_BY_UNIT = {"mg/dL": ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma"),
                            "umol/L": ("14682-9", "Creatinine [Moles/volume] in Serum or Plasma")}
SODIUM_LOINC = ("2951-2", "Sodium [Moles/volume] in Serum or Plasma")
CRP_LOINC = ("1988-5", "C reactive protein [Mass/volume] in Serum or Plasma")
GLUCOSE_MG_DL_PER_MMOL_L = 18.016
CREATININE_UMOL_L_PER_MG_DL = 10_000 / 113.12  # creatinine 113.12 g/mol, as the liver study converts
# Liver study grade: LOINC 33732-9 valued in SNOMED. Brain study: 21858-5 in a local system.
TUMOUR_GRADE_LOINC = ("33732-9", "Histology grade [Identifier] in Cancer specimen")
GRADE_HIGH = ("61026006", "Grade 3")
GRADE_LOW = ("54102005", "Grade 1")
WHO_GRADE_LOINC = ("21858-5", "Grade Cancer")
WHO_GRADE_SYSTEM = "http://neuro-hospital.example.org/fhir/CodeSystem/who-cns-grade"
CONSENT_CATEGORY_LOINC = ("57016-8", "Privacy policy acknowledgement Document")
_BROAD_CONSENT_YEARS = 5

RESOURCE_TYPES = ("Patient", "ImagingStudy", "Condition", "Observation", "Consent")

_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:clinfed:synthetic-fhir")
_CONSENT_BEFORE_STUDY = dt.timedelta(days=14)
_REVOCATION_AFTER_STUDY = dt.timedelta(days=60)


def fhir_resources_for(patient: SyntheticPatient, profile: SiteProfile,
                       study_id: str) -> dict[str, list[dict]]:
    """All R4 resources of one patient, keyed by resourceType (every key in RESOURCE_TYPES)."""
    patient_id = _id(profile.mrn_system, patient.mrn)
    subject = {"reference": f"Patient/{patient_id}"}
    day = patient.study_date.isoformat()
    brain = profile.anatomy == "brain"
    return {
        "Patient": [_patient(patient, profile, patient_id)],
        "ImagingStudy": [_imaging_study(patient, profile, patient_id, subject, day)],
        "Condition": _conditions(patient, profile, patient_id, subject, day),
        "Observation": (_brain_observations if brain else _observations)(patient, profile, patient_id, subject, day),
        "Consent": (_broad_consents(patient, patient_id, subject) if brain
                    else _consents(patient, patient_id, subject, study_id)),
    }


def merge_resources(parts: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """Concatenate per-patient resource dicts into one per-site dict, keeping order."""
    merged: dict[str, list[dict]] = {rtype: [] for rtype in RESOURCE_TYPES}
    for part in parts:
        for rtype, resources in part.items():
            merged.setdefault(rtype, []).extend(resources)
    return merged


def write_bulk_export(resources: dict[str, list[dict]], fhir_dir: Path) -> None:
    """One ``<Type>.ndjson`` per resource type (empty if none), one compact resource a line."""
    fhir_dir = Path(fhir_dir)
    fhir_dir.mkdir(parents=True, exist_ok=True)
    for rtype in sorted(set(RESOURCE_TYPES) | set(resources)):
        with (fhir_dir / f"{rtype}.ndjson").open("w", encoding="utf-8", newline="\n") as fh:
            for resource in resources.get(rtype, ()):
                fh.write(json.dumps(resource, separators=(",", ":"), ensure_ascii=False))
                fh.write("\n")


def _id(*parts: str) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, "|".join(parts)))


def _coding(system: str, code: str, display: str | None = None) -> dict:
    coding = {"system": system, "code": code}
    if display:
        coding["display"] = display
    return coding


def _concept(system: str, code: str, display: str | None = None) -> dict:
    return {"coding": [_coding(system, code, display)]}


def _patient(patient: SyntheticPatient, profile: SiteProfile, patient_id: str) -> dict:
    return {
        "resourceType": "Patient",
        "id": patient_id,
        "identifier": [{
            "use": "usual",
            "type": _concept(t.V2_0203, "MR", "Medical record number"),
            "system": profile.mrn_system,
            "value": patient.mrn,
        }],
        "name": [{"use": "official", "family": patient.family_name, "given": [patient.given_name]}],
        "gender": patient.sex,
        "birthDate": patient.birth_date.isoformat(),
    }


def _imaging_study(patient: SyntheticPatient, profile: SiteProfile, patient_id: str,
                   subject: dict, day: str) -> dict:
    modality = _coding(t.DICOM_DCM, profile.modality)
    return {
        "resourceType": "ImagingStudy",
        "id": _id(patient_id, "ImagingStudy", patient.study_uid),
        "identifier": [{"system": t.DICOM_UID_SYSTEM, "value": f"urn:oid:{patient.study_uid}"}],
        "status": "available",
        "modality": [modality],
        "subject": subject,
        "started": day,
        "numberOfSeries": 1,
        "series": [{"uid": patient.series_uid, "modality": modality}],
    }


def _conditions(patient: SyntheticPatient, profile: SiteProfile, patient_id: str,
                subject: dict, day: str) -> list[dict]:
    system = DIAGNOSIS_SYSTEMS[profile.diagnosis_system]
    if profile.anatomy == "brain":
        diagnoses = [DX_BRAIN_TUMOUR] + ([DX_EPILEPSY] if patient.has_epilepsy else [])
    else:
        diagnoses = [DX_LIVER_CANCER]
        if patient.has_diabetes:
            diagnoses.append(DX_DIABETES)
        if patient.has_hypertension:
            diagnoses.append(DX_HYPERTENSION)
    conditions = []
    for snomed, icd10, display in diagnoses:
        code = snomed if system == t.SNOMED else icd10
        conditions.append({
            "resourceType": "Condition",
            "id": _id(patient_id, "Condition", snomed),
            "clinicalStatus": _concept(t.CONDITION_CLINICAL, "active"),
            "verificationStatus": _concept(t.CONDITION_VER_STATUS, "confirmed"),
            "category": [_concept(t.CONDITION_CATEGORY, "problem-list-item")],
            "code": _concept(system, code, display),
            "subject": subject,
            "recordedDate": day,
        })
    return conditions


def _observation(patient_id: str, subject: dict, day: str, code: tuple[str, str], **value: dict) -> dict:
    """A laboratory Observation: ``code`` is the LOINC (code, display), ``value`` its value[x]."""
    return {
        "resourceType": "Observation",
        "id": _id(patient_id, "Observation", code[0]),
        "status": "final",
        "category": [_concept(t.OBSERVATION_CATEGORY, "laboratory", "Laboratory")],
        "code": _concept(t.LOINC, *code),
        "subject": subject,
        "effectiveDateTime": day,
        **value,
    }


def _observations(patient: SyntheticPatient, profile: SiteProfile, patient_id: str,
                  subject: dict, day: str) -> list[dict]:
    glucose = patient.glucose_mmol_l
    if profile.glucose_unit == "mg/dL":
        glucose *= GLUCOSE_MG_DL_PER_MMOL_L
    creatinine = patient.creatinine_umol_l
    if profile.creatinine_unit == "mg/dL":
        creatinine /= CREATININE_UMOL_L_PER_MG_DL
    labs = [
        (GLUCOSE_LOINC_BY_UNIT[profile.glucose_unit], profile.glucose_unit, glucose),
        (CREATININE_LOINC_BY_UNIT[profile.creatinine_unit], profile.creatinine_unit, creatinine),
    ]
    observations = [_observation(patient_id, subject, day, loinc, valueQuantity={
        "value": value, "unit": unit.replace("umol", "\u00b5mol"), "system": t.UCUM, "code": unit})
        for loinc, unit, value in labs]
    grade = GRADE_HIGH if patient.high_grade else GRADE_LOW
    observations.append(_observation(patient_id, subject, day, TUMOUR_GRADE_LOINC,
                                     valueCodeableConcept=_concept(t.SNOMED, *grade)))
    return observations


def _brain_observations(patient: SyntheticPatient, profile: SiteProfile, patient_id: str,
                        subject: dict, day: str) -> list[dict]:
    crp = patient.crp_mg_l / (10.0 if profile.crp_unit == "mg/dL" else 1.0)
    labs = [(SODIUM_LOINC, profile.sodium_unit, patient.sodium_mmol_l), (CRP_LOINC, profile.crp_unit, round(crp, 3))]
    observations = [_observation(patient_id, subject, day, loinc, valueQuantity={
        "value": value, "unit": unit, "system": t.UCUM, "code": unit}) for loinc, unit, value in labs]
    grade = ("G4" if patient.crp_mg_l > 8 else "G3") if patient.high_grade else ("G2" if patient.has_epilepsy else "G1")
    observations.append(_observation(patient_id, subject, day, WHO_GRADE_LOINC, valueCodeableConcept=_concept(
        WHO_GRADE_SYSTEM, grade, f"WHO CNS grade {grade[1]}")))
    return observations


def _broad_consents(patient: SyntheticPatient, patient_id: str, subject: dict) -> list[dict]:
    if patient.consent == "none":
        return []
    granted = patient.study_date - _CONSENT_BEFORE_STUDY
    until = granted.replace(year=granted.year + _BROAD_CONSENT_YEARS)
    grant = {
        "resourceType": "Consent",
        "id": _id(patient_id, "Consent", "broad-research"),
        "status": "active",
        "scope": _concept(t.CONSENT_SCOPE, "research", "Research"),
        "category": [_concept(t.LOINC, *CONSENT_CATEGORY_LOINC)],
        "patient": subject,
        "dateTime": f"{granted.isoformat()}T10:30:00+01:00",
        "policy": [{"uri": "https://neuro-hospital.example.org/policies/broad-research-consent-v2"}],
        "provision": {
            "type": "permit",
            "period": {"start": granted.isoformat(), "end": until.isoformat()},
            "purpose": [_coding(t.V3_ACT_REASON, "HRESCH", "healthcare research")],
        },
    }
    consents = [grant]
    if patient.consent == "revoked":
        revoked = patient.study_date + _REVOCATION_AFTER_STUDY
        withdrawal = json.loads(json.dumps(grant))
        withdrawal.update(id=_id(patient_id, "Consent", "broad-research-withdrawn"), status="inactive",
                          dateTime=f"{revoked.isoformat()}T10:30:00+01:00")
        consents.append(withdrawal)
    return consents


def _consents(patient: SyntheticPatient, patient_id: str, subject: dict,
              study_id: str) -> list[dict]:
    if patient.consent == "none":
        return []
    granted = patient.study_date - _CONSENT_BEFORE_STUDY
    consents = [_consent(patient_id, subject, study_id, "permit", granted)]
    if patient.consent == "revoked":
        revoked = patient.study_date + _REVOCATION_AFTER_STUDY
        consents.append(_consent(patient_id, subject, study_id, "deny", revoked))
    return consents


def _consent(patient_id: str, subject: dict, study_id: str, provision_type: str,
             day: dt.date) -> dict:
    return {
        "resourceType": "Consent",
        "id": _id(patient_id, "Consent", study_id, provision_type),
        "status": "active",
        "scope": _concept(t.CONSENT_SCOPE, "research", "Research"),
        "category": [_concept(t.LOINC, *CONSENT_CATEGORY_LOINC)],
        "patient": subject,
        "dateTime": f"{day.isoformat()}T09:00:00Z",
        "policyRule": _concept(t.V3_ACT_CODE, "OPTIN" if provision_type == "permit" else "OPTOUT"),
        "provision": {
            "type": provision_type,
            "period": {"start": day.isoformat()},
            "purpose": [_coding(t.V3_ACT_REASON, "HRESCH", "healthcare research")],
            "data": [{
                "meaning": "related",
                "reference": {"identifier": {"system": t.STUDY_IDENTIFIER_SYSTEM, "value": study_id}},
            }],
        },
    }
