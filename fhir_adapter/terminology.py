"""Code systems the adapter itself reads (identifier types, statuses, DICOM links).

Study-specific codes (labs, diagnoses, grades, consent policies) come from the study definition
(:mod:`fhir_adapter.rules`); codes only the synthetic writer uses live with it
(``clinfed.data.synth_fhir``).
"""

from __future__ import annotations

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10"
ICD10_SYSTEMS = frozenset({
    ICD10,
    "http://hl7.org/fhir/sid/icd-10-cm",
    "http://fhir.de/CodeSystem/bfarm/icd-10-gm",
    "http://fhir.de/CodeSystem/dimdi/icd-10-gm",
})
NCIT = "http://ncicb.nci.nih.gov/xml/owl/EVS/Thesaurus.owl"
UCUM = "http://unitsofmeasure.org"
DICOM_DCM = "http://dicom.nema.org/resources/ontology/DCM"
DICOM_UID_SYSTEM = "urn:dicom:uid"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"  # identifier types; "MR" = MRN
CONSENT_SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_ACT_REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VER_STATUS = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
STUDY_IDENTIFIER_SYSTEM = "urn:clinfed:study"
"""Default system of the identifier that names a research study in ``Consent.provision.data``."""

SYSTEM_ALIASES = {"loinc": LOINC, "snomed": SNOMED, "icd10": ICD10, "ncit": NCIT, "ucum": UCUM,
                  "consentscope": CONSENT_SCOPE, "v3-ActReason": V3_ACT_REASON, "v3-ActCode": V3_ACT_CODE}
"""Short names a study definition may use for a code system instead of its URL."""

ADMINISTRATIVE_GENDERS = ("male", "female", "other", "unknown")
"""The FHIR R4 administrative-gender value set (required binding of ``Patient.gender``)."""
