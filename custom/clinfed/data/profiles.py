"""What makes each synthetic hospital different (non-IID), and what one synthetic patient is.

The profiles mimic the ways real sites differ: scanner and intensity scale, noise, voxel
spacing, lesion size and count, share of high-grade tumours, lab units and diagnosis coding.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

STUDY_ID = "clinfed-tumour-seg"
"""The research study every synthetic Consent covers (``urn:clinfed:study`` identifier)."""


@dataclass(frozen=True)
class SiteProfile:
    name: str
    modality: str  # "CT" or "MR"
    manufacturer: str
    spacing_mm: tuple[float, float, float]  # column (x), row (y), slice (z)
    # Tissue values in stored units after rescale (HU for CT, arbitrary for MR).
    background: float
    organ: float
    lesion_contrast: float  # lesion = organ + lesion_contrast * (1 + grade effect)
    noise_std: float
    lesion_radius_frac: tuple[float, float]  # lesion radius as a fraction of the smallest side
    lesion_count: tuple[int, int]  # inclusive range
    high_grade_bias: float  # shifts the share of high-grade outcomes
    glucose_unit: str  # "mg/dL" or "mmol/L"
    creatinine_unit: str  # "mg/dL" or "umol/L"
    diagnosis_system: str  # "snomed" or "icd10"
    revoked_share: float = 0.08
    no_consent_share: float = 0.07
    mrn_system: str = field(default="")  # Patient.identifier system for this hospital's MRNs

    def __post_init__(self):
        if not self.mrn_system:
            object.__setattr__(self, "mrn_system", f"urn:clinfed:mrn:{self.name}")


SITE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="site-1", modality="CT", manufacturer="Siemens", spacing_mm=(0.8, 0.8, 2.5),
        background=-80.0, organ=60.0, lesion_contrast=-45.0, noise_std=12.0,
        lesion_radius_frac=(0.14, 0.26), lesion_count=(1, 2), high_grade_bias=0.0,
        glucose_unit="mg/dL", creatinine_unit="mg/dL", diagnosis_system="snomed",
    ),
    SiteProfile(
        name="site-2", modality="MR", manufacturer="Philips", spacing_mm=(1.0, 1.0, 1.0),
        # T1-weighted: the lesion is hypointense, as on the CT sites, but on another scale and noise.
        background=100.0, organ=450.0, lesion_contrast=-170.0, noise_std=40.0,
        lesion_radius_frac=(0.12, 0.22), lesion_count=(1, 3), high_grade_bias=0.6,
        glucose_unit="mmol/L", creatinine_unit="umol/L", diagnosis_system="icd10",
    ),
    SiteProfile(
        name="site-3", modality="CT", manufacturer="GE", spacing_mm=(0.7, 0.7, 5.0),
        background=-100.0, organ=55.0, lesion_contrast=-35.0, noise_std=20.0,
        lesion_radius_frac=(0.18, 0.30), lesion_count=(1, 1), high_grade_bias=-0.6,
        glucose_unit="mmol/L", creatinine_unit="mg/dL", diagnosis_system="snomed",
    ),
)


def profile_for_site(index: int) -> SiteProfile:
    """Profile of the site with 0-based ``index``; more sites than profiles cycle with new names."""
    base = SITE_PROFILES[index % len(SITE_PROFILES)]
    if index < len(SITE_PROFILES):
        return base
    from dataclasses import replace

    name = f"site-{index + 1}"
    return replace(base, name=name, mrn_system=f"urn:clinfed:mrn:{name}")


@dataclass(frozen=True)
class SyntheticPatient:
    """Ground truth for one synthetic patient. Identifiers here are site-internal PHI."""

    mrn: str
    family_name: str
    given_name: str
    birth_date: dt.date
    sex: str  # "male" or "female"
    study_date: dt.date
    study_uid: str
    series_uid: str
    glucose_mmol_l: float  # canonical units; written in the site's unit
    creatinine_umol_l: float
    has_diabetes: bool
    has_hypertension: bool
    high_grade: bool  # the outcome label
    consent: str  # "active", "revoked" or "none"

    @property
    def age_at_study(self) -> float:
        return (self.study_date - self.birth_date).days / 365.25
