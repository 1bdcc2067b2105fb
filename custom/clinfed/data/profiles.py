"""What makes each synthetic hospital different (non-IID), and what one synthetic patient is.

The profiles mimic the ways real sites differ: modality and scanner, contrast phase (the HU
of parenchyma and lesion), noise, voxel spacing and reconstruction blur, lesion contrast, lesion
size and count, share of high-grade tumours, lab units and diagnosis coding. The liver sites
differ enough that a model trained at one site loses on another's images (a local-only model of
the portal-venous CT site reads the late-phase site's parenchyma as lesion, and vice versa),
while the lesion is always darker than the parenchyma (same sign of contrast everywhere).
Each shipped study has its own generator profile (:data:`STUDY_SITE_PROFILES`): the liver CT
study (``clinfed-tumour-seg``) and the brain MR study (``brain-mr-tumour``: a head phantom with
ring-enhancing lesions, broad research consents, WHO grade under LOINC 21858-5 in a local code
system, sodium and CRP).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

STUDY_ID = "clinfed-tumour-seg"
"""The demo's default study (the liver study; its Consents name it as a ``urn:clinfed:study`` identifier)."""
BRAIN_STUDY_ID = "brain-mr-tumour"


@dataclass(frozen=True)
class SiteProfile:
    name: str
    modality: str  # "CT" or "MR"
    manufacturer: str
    spacing_mm: tuple[float, float, float]  # column (x), row (y), slice (z)
    # Tissue values in stored units after rescale (HU for CT, arbitrary for MR).
    background: float
    organ: float
    lesion_contrast: float  # lesion = organ + lesion_contrast * (1 + grade effect); never changes sign
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
    anatomy: str = "liver"  # which phantom and FHIR dialect: liver | brain
    body_part: str = "ABDOMEN"  # BodyPartExamined
    series_description: str | None = None  # default "<modality> axial"
    sodium_unit: str = "mmol/L"  # brain study labs: mmol/L or meq/L
    crp_unit: str = "mg/L"  # mg/L or mg/dL
    bias_field: float = 0.0  # MR receive-coil intensity drift across the field of view (brain)
    blur_mm: float = 0.0  # reconstruction kernel / resolution: Gaussian sigma in mm, before the noise
    protocol: str = ""  # one line for the demo's report: what this site's scanner and protocol are like

    def __post_init__(self):
        if not self.mrn_system:
            object.__setattr__(self, "mrn_system", f"urn:clinfed:mrn:{self.name}")


SITE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="site-1", modality="CT", manufacturer="Siemens", spacing_mm=(0.8, 0.8, 2.5),
        background=-80.0, organ=60.0, lesion_contrast=-45.0, noise_std=12.0,
        lesion_radius_frac=(0.14, 0.26), lesion_count=(1, 2), high_grade_bias=0.0,
        glucose_unit="mg/dL", creatinine_unit="mg/dL", diagnosis_system="snomed",
        protocol="CT, unenhanced-like phase (parenchyma 60 HU, lesion 15 HU), sharp kernel, 2.5 mm slices, "
                 "1-2 lesions",
    ),
    SiteProfile(
        name="site-2", modality="MR", manufacturer="Philips", spacing_mm=(1.0, 1.0, 1.0),
        # T1-weighted: the lesion is hypointense, as on the CT sites, but on another scale and noise.
        background=100.0, organ=450.0, lesion_contrast=-170.0, noise_std=40.0,
        lesion_radius_frac=(0.12, 0.22), lesion_count=(1, 3), high_grade_bias=0.6,
        glucose_unit="mmol/L", creatinine_unit="umol/L", diagnosis_system="icd10", blur_mm=0.8,
        protocol="T1 MR (arbitrary units, z-scored), hypointense lesions, 1 mm isotropic, mild blur, up to 3 lesions",
    ),
    SiteProfile(
        name="site-3", modality="CT", manufacturer="GE", spacing_mm=(0.7, 0.7, 5.0),
        # Portal-venous phase: the enhanced parenchyma is brighter than site-1's, and its lesions
        # are about as bright as site-1's parenchyma.
        background=-100.0, organ=115.0, lesion_contrast=-50.0, noise_std=22.0,
        lesion_radius_frac=(0.20, 0.32), lesion_count=(1, 1), high_grade_bias=-0.6,
        glucose_unit="mmol/L", creatinine_unit="mg/dL", diagnosis_system="snomed", blur_mm=1.5,
        protocol="CT, portal-venous phase (parenchyma 115 HU, lesion 65 HU), soft kernel (blur 1.5 mm), "
                 "5 mm slices, noisier, large single lesions",
    ),
)


BRAIN_SITE_PROFILES: tuple[SiteProfile, ...] = (
    # background is air; organ is white matter; lesion_contrast is the enhancing rim over white matter.
    SiteProfile(
        name="site-1", modality="MR", manufacturer="Siemens", spacing_mm=(1.0, 1.0, 1.0),
        background=0.0, organ=420.0, lesion_contrast=380.0, noise_std=22.0,
        lesion_radius_frac=(3.6, 8.4), lesion_count=(1, 1), high_grade_bias=0.3,
        glucose_unit="mmol/L", creatinine_unit="umol/L", diagnosis_system="snomed",
        anatomy="brain", body_part="BRAIN", series_description="T1 MPRAGE post-contrast", bias_field=0.10,
        protocol="3D T1 MPRAGE post-contrast, 1 mm isotropic, mild coil bias, single lesions",
    ),
    SiteProfile(
        name="site-2", modality="MR", manufacturer="GE", spacing_mm=(0.9, 0.9, 1.2),
        background=0.0, organ=900.0, lesion_contrast=700.0, noise_std=55.0,
        lesion_radius_frac=(3.6, 7.0), lesion_count=(1, 2), high_grade_bias=-0.4,
        glucose_unit="mmol/L", creatinine_unit="umol/L", diagnosis_system="icd10",
        anatomy="brain", body_part="BRAIN", series_description="Ax T1 BRAVO +C", sodium_unit="meq/L",
        crp_unit="mg/dL", bias_field=0.20,
        protocol="Ax T1 BRAVO post-contrast, about twice the signal scale and noise, strong coil bias, up to 2 lesions",
    ),
    SiteProfile(
        name="site-3", modality="MR", manufacturer="Philips", spacing_mm=(1.1, 1.1, 1.0),
        background=0.0, organ=300.0, lesion_contrast=230.0, noise_std=18.0,
        lesion_radius_frac=(4.5, 8.4), lesion_count=(1, 1), high_grade_bias=0.6,
        glucose_unit="mmol/L", creatinine_unit="umol/L", diagnosis_system="snomed",
        anatomy="brain", body_part="BRAIN", series_description="T1W_3D_TFE gd", bias_field=0.05,
        protocol="T1W 3D TFE gadolinium, low signal scale, quiet coil, larger single lesions",
    ),
)
"""Brain study sites; ``lesion_radius_frac`` is the lesion radius in mm here (0.2-2.5 ml)."""

STUDY_SITE_PROFILES = {STUDY_ID: SITE_PROFILES, BRAIN_STUDY_ID: BRAIN_SITE_PROFILES}


def profile_for_site(index: int, study: str = STUDY_ID) -> SiteProfile:
    """Profile of the site with 0-based ``index`` in a study's generator; more sites than
    profiles cycle with new names."""
    if study not in STUDY_SITE_PROFILES:
        raise ValueError(f"no synthetic generator profile for study {study!r} "
                         f"(known: {', '.join(STUDY_SITE_PROFILES)})")
    profiles = STUDY_SITE_PROFILES[study]
    base = profiles[index % len(profiles)]
    if index < len(profiles):
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
    sodium_mmol_l: float = 140.0  # brain study labs, canonical units
    crp_mg_l: float = 3.0
    has_epilepsy: bool = False

    @property
    def age_at_study(self) -> float:
        return (self.study_date - self.birth_date).days / 365.25
