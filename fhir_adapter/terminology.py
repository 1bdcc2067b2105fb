"""Code systems, codes and units the adapter understands, in one place.

The synthetic writer (``clinfed.data.synth_fhir``) uses the same tables, so what we write and
what we read cannot drift apart.
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
"""System of the identifier that names a research study in ``Consent.provision.data``."""

DIAGNOSIS_SYSTEMS = {"snomed": SNOMED, "icd10": ICD10}
"""SiteProfile.diagnosis_system -> FHIR code system URL."""

# Diagnoses: (SNOMED code, ICD-10 code, display) that the synthetic writer emits.
DX_LIVER_CANCER = ("25370001", "C22.0", "Hepatocellular carcinoma")
DX_DIABETES = ("44054006", "E11.9", "Type 2 diabetes mellitus without complications")
DX_HYPERTENSION = ("38341003", "I10", "Hypertensive disorder")

# What the reader accepts for each flag: SNOMED codes, and ICD-10 category prefixes (any
# subcode such as E11.65 or E1165 matches "E11").
DX_FLAGS: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "dx_liver_cancer": (
        frozenset({"25370001", "93870000"}),  # hepatocellular carcinoma, malignant neoplasm of liver
        ("C22",),
    ),
    "dx_diabetes": (
        frozenset({"73211009", "44054006", "46635009"}),  # diabetes mellitus, type 2, type 1
        ("E10", "E11", "E12", "E13", "E14"),
    ),
    "dx_hypertension": (
        frozenset({"38341003", "59621000"}),  # hypertensive disorder, essential hypertension
        ("I10", "I11", "I12", "I13", "I15"),
    ),
}

# Laboratory results: LOINC code -> (display, UCUM code) the writer uses per site unit.
GLUCOSE_LOINC_BY_UNIT = {
    "mg/dL": ("2345-7", "Glucose [Mass/volume] in Serum or Plasma"),
    "mmol/L": ("15074-8", "Glucose [Moles/volume] in Blood"),
}
CREATININE_LOINC_BY_UNIT = {
    "mg/dL": ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma"),
    "umol/L": ("14682-9", "Creatinine [Moles/volume] in Serum or Plasma"),
}
# Every LOINC code the reader takes as glucose / creatinine (blood, serum or plasma).
GLUCOSE_LOINC = frozenset({"2345-7", "2339-0", "15074-8", "14749-6"})
CREATININE_LOINC = frozenset({"2160-0", "38483-4", "14682-9", "59826-8"})

GLUCOSE_MG_DL_PER_MMOL_L = 18.016
CREATININE_UMOL_L_PER_MG_DL = 88.42

# Unit (UCUM code, or the printed unit when no code is given) -> factor to canonical units.
# Keys are compared case-insensitively after mapping the micro sign and Greek mu to "u".
GLUCOSE_TO_MMOL_L = {
    "mmol/l": 1.0,
    "mg/dl": 1.0 / GLUCOSE_MG_DL_PER_MMOL_L,
}
CREATININE_TO_UMOL_L = {
    "umol/l": 1.0,
    "mmol/l": 1000.0,
    "mg/dl": CREATININE_UMOL_L_PER_MG_DL,
}

TUMOUR_GRADE_LOINC = ("33732-9", "Histology grade [Identifier] in Cancer specimen")
GRADE_HIGH = ("61026006", "Grade 3")
GRADE_LOW = ("54102005", "Grade 1")
# SNOMED grade qualifier -> outcome_high_grade. Grade 2 counts as low grade.
GRADE_TO_HIGH = {"54102005": 0, "1663004": 0, "61026006": 1}

CONSENT_CATEGORY_LOINC = ("57016-8", "Privacy policy acknowledgement Document")


def normalise_unit(unit: str) -> str:
    """Case-folded unit with the micro sign and Greek mu spelled as ``u``."""
    return unit.strip().replace("\u00b5", "u").replace("\u03bc", "u").lower()
