"""Synthetic multi-site clinical data: a DICOM series + SEG and a FHIR R4 Bulk export per site.

No tumour-labelled data ships in any package we may install, so sites are generated. Each
site follows a ``SiteProfile`` (scanner, spacing, noise, lesion size, units, coding) of its
study's generator profile, and the outcome (high vs low grade) depends on both the image
(lesion size and enhancement) and the EHR (age, a lab), so that an image+EHR fusion model has
signal to find.

- Liver study: an ellipsoidal organ with hypo-enhancing lesions (CT in HU, or T1 MR).
- Brain study: a head (scalp, skull, grey and white matter, ventricles) at the profile's
  spacing with one or two ring-enhancing lesions of 0.2-2.5 ml (a bright rim round a dark
  necrotic core, as contrast T1 shows high-grade gliomas), a receive-coil bias field, and a
  3-slice localizer series beside the T1 series that the study's series choice must skip.

Layout written per site::

    SITE_DIR/site_secret.key          pseudonymisation key (stays at the site)
    SITE_DIR/imaging/study-NNNN/      one folder per imaging study: slices + seg.dcm
    SITE_DIR/fhir/*.ndjson            FHIR Bulk export (Patient, ImagingStudy, ...)
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid
from scipy import ndimage

from clinfed.data.profiles import STUDY_ID, SiteProfile, SyntheticPatient, profile_for_site
from clinfed.data.synth_dicom import write_seg, write_series
from clinfed.data.pseudonym import SECRET_FILE_NAME
from clinfed.data.synth_fhir import fhir_resources_for, write_bulk_export

FAMILY_NAMES = ("Smith", "Jansen", "Müller", "Rossi", "García", "Dubois", "Nowak", "Silva",
                "Kowalski", "Andersen", "Murphy", "Novak", "Costa", "Berg", "Larsen", "Wagner")
GIVEN_NAMES = ("Anna", "Lukas", "Maria", "Jan", "Sofia", "Pierre", "Eva", "Mateo", "Ingrid",
               "Tomas", "Elena", "Noah", "Clara", "Hugo", "Lea", "Oskar")


@dataclass(frozen=True)
class SyntheticCase:
    """One generated patient with the ground truth the tests compare against."""

    patient: SyntheticPatient
    volume: np.ndarray  # (X, Y, Z) real-world values as written
    label: np.ndarray  # (X, Y, Z) uint8 tumour mask
    study_dir: Path


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def _volume_and_label(rng: np.random.Generator, shape: tuple[int, int, int], profile: SiteProfile,
                      radius_frac: float, enhancement: float) -> tuple[np.ndarray, np.ndarray]:
    """An ellipsoidal organ with spherical lesions, plus the site's intensity scale and noise."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = np.array(shape, dtype=np.float32)[:, None, None, None] / 2.0
    semi_axes = np.array(shape, dtype=np.float32)[:, None, None, None] * 0.42
    organ = (((grid - centre) / semi_axes) ** 2).sum(axis=0) <= 1.0

    label = np.zeros(shape, dtype=np.uint8)
    n_lesions = int(rng.integers(profile.lesion_count[0], profile.lesion_count[1] + 1))
    # Lesion radius is a fraction of each side: a lesion covers a similar share of any grid.
    radius = np.maximum(1.5, radius_frac * np.array(shape, dtype=np.float32))
    for i in range(n_lesions):
        r = radius * (1.0 if i == 0 else 0.6)
        # Keep lesions inside the organ: centre within half the organ's semi-axes.
        c = centre[:, 0, 0, 0] + rng.uniform(-0.45, 0.45, size=3) * semi_axes[:, 0, 0, 0]
        dist = np.sqrt((((grid - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(axis=0))
        label[(dist <= 1.0) & organ] = 1

    volume = np.full(shape, profile.background, dtype=np.float32)
    volume[organ] = profile.organ
    # The grade effect strengthens or weakens the lesion's contrast, never flips its sign.
    volume[label == 1] = profile.organ + profile.lesion_contrast * max(0.3, 1.0 + 0.35 * enhancement)
    if profile.blur_mm:  # the scanner's resolution: blur the object, then add the noise
        sigma = [profile.blur_mm / s for s in profile.spacing_mm]
        volume = ndimage.gaussian_filter(volume, sigma, mode="nearest")
    volume += rng.normal(0.0, profile.noise_std, size=shape).astype(np.float32)
    if profile.modality == "MR":
        np.maximum(volume, 0.0, out=volume)  # MR magnitude images are never negative
    # Stored DICOM values are integers; round here so a read-back is voxel-identical.
    return np.round(volume).astype(np.float32), label


def _brain_volume_and_label(rng: np.random.Generator, shape: tuple[int, int, int], profile: SiteProfile,
                            radius_mm: float, enhancement: float) -> tuple[np.ndarray, np.ndarray]:
    """A T1 post-contrast head with ring-enhancing lesions (radius in mm, 0.2-2.5 ml)."""
    spacing = np.array(profile.spacing_mm, dtype=np.float32)[:, None, None, None]
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = (np.array(shape, dtype=np.float32)[:, None, None, None] - 1) / 2.0
    mm = (grid - centre) * spacing  # millimetres from the centre of the field of view
    head_axes = np.array(shape, dtype=np.float32)[:, None, None, None] * spacing * np.array(
        [0.46, 0.46, 0.46], dtype=np.float32)[:, None, None, None]
    r_head = np.sqrt(((mm / head_axes) ** 2).sum(axis=0))
    brain_axes = head_axes - 5.0  # 2 mm scalp + 3 mm skull
    r_brain = np.sqrt(((mm / brain_axes) ** 2).sum(axis=0))
    wm = profile.organ
    volume = np.full(shape, profile.background, dtype=np.float32)
    volume[r_head <= 1.0] = 1.35 * wm  # scalp fat is bright on T1
    volume[(r_head <= 1.0) & (r_brain > 1.0) & (r_head > 0.9)] = 0.2 * wm  # skull
    brain = r_brain <= 1.0
    volume[brain] = 0.8 * wm  # cortical grey matter
    volume[r_brain <= 0.85] = wm  # white matter
    ventricles = (((mm - np.array([0, 4.0, 0], dtype=np.float32)[:, None, None, None])
                   / np.array([5.0, 9.0, 6.0], dtype=np.float32)[:, None, None, None]) ** 2).sum(axis=0) <= 1.0
    volume[ventricles] = 0.3 * wm  # CSF is dark on T1

    label = np.zeros(shape, dtype=np.uint8)
    n_lesions = int(rng.integers(profile.lesion_count[0], profile.lesion_count[1] + 1))
    for i in range(n_lesions):
        r = radius_mm * (1.0 if i == 0 else 0.7)
        # Centre within the white matter, away from the ventricles.
        for _ in range(50):
            c = rng.uniform(-0.55, 0.55, size=3).astype(np.float32) * brain_axes[:, 0, 0, 0]
            if np.linalg.norm((c - [0, 4.0, 0]) / [5.0, 9.0, 6.0]) > 1.6:
                break
        dist = np.sqrt((((mm - c[:, None, None, None]) / r) ** 2).sum(axis=0))
        lesion = (dist <= 1.0) & brain
        label[lesion] = 1
        rim = lesion & (dist > 0.55)
        volume[lesion & ~rim] = 0.45 * wm  # necrotic core
        volume[rim] = wm + profile.lesion_contrast * (1.0 + 0.3 * enhancement)
    x = (grid[0] / max(shape[0] - 1, 1)) - 0.5
    volume *= 1.0 + profile.bias_field * x
    volume += rng.normal(0.0, profile.noise_std, size=shape).astype(np.float32)
    np.maximum(volume, 0.0, out=volume)  # magnitude images are never negative
    return np.round(volume).astype(np.float32), label


def _patient(rng: np.random.Generator, profile: SiteProfile, site_index: int, index: int,
             high_grade: bool, glucose: float, age: float, consent: str, seed: int) -> SyntheticPatient:
    study_date = dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 700)))
    birth_date = study_date - dt.timedelta(days=int(age * 365.25))
    has_diabetes = bool(glucose > 7.0 or rng.random() < 0.05)
    mrn = f"{7 + site_index}{int(rng.integers(1_000_000, 9_999_999)):07d}{index:03d}"
    entropy = [str(seed), profile.name, mrn]
    return SyntheticPatient(
        mrn=mrn,
        family_name=FAMILY_NAMES[int(rng.integers(len(FAMILY_NAMES)))],
        given_name=GIVEN_NAMES[int(rng.integers(len(GIVEN_NAMES)))],
        birth_date=birth_date,
        sex="female" if rng.random() < 0.5 else "male",
        study_date=study_date,
        study_uid=generate_uid(entropy_srcs=entropy + ["study"]),
        series_uid=generate_uid(entropy_srcs=entropy + ["series"]),
        glucose_mmol_l=round(glucose, 2),
        creatinine_umol_l=round(float(rng.normal(80.0, 18.0)), 1),
        has_diabetes=has_diabetes,
        has_hypertension=bool(rng.random() < 0.3 + 0.004 * max(0.0, age - 50)),
        high_grade=high_grade,
        consent=consent,
        sodium_mmol_l=round(float(rng.normal(139.0, 3.0)), 1),
        crp_mg_l=round(float(np.clip(rng.lognormal(1.0, 0.9), 0.1, 200.0)), 1),
        has_epilepsy=bool(rng.random() < 0.25),
    )


def synthesise_site(site_dir: Path, profile: SiteProfile, site_index: int, n_patients: int,
                    shape: tuple[int, int, int], seed: int, study_id: str = STUDY_ID,
                    progress=None, held_out: bool = False) -> list[SyntheticCase]:
    """Write one site's DICOM studies, SEGs, FHIR export and pseudonymisation key. ``held_out``:
    other patients of the same site (a random stream of their own), for a test set."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, site_index, *([1] if held_out else [])]))
    site_dir.mkdir(parents=True, exist_ok=True)
    key_path = site_dir / SECRET_FILE_NAME
    if not key_path.exists():
        # The key is a real secret (not derived from the seed): pseudonyms must not be recomputable.
        key_path.write_text(secrets.token_hex(32) + "\n")
        key_path.chmod(0o600)

    cases: list[SyntheticCase] = []
    resources: dict[str, list[dict]] = {}
    brain = profile.anatomy == "brain"
    for i in range(n_patients):
        radius_frac = float(rng.uniform(*profile.lesion_radius_frac))
        enhancement = float(rng.normal())
        age = float(np.clip(rng.normal(62.0, 12.0), 25.0, 90.0))
        glucose = float(np.clip(rng.normal(6.2, 1.6), 3.0, 16.0))
        size_z = (radius_frac - 6.0) / 1.4 if brain else (radius_frac - 0.21) / 0.05
        logit = 1.6 * size_z + 1.0 * enhancement + 1.1 * (age - 62.0) / 12.0 + 0.9 * (glucose - 6.2) / 1.6
        high_grade = bool(rng.random() < _sigmoid(logit + profile.high_grade_bias))
        u = rng.random()
        consent = ("none" if u < profile.no_consent_share
                   else "revoked" if u < profile.no_consent_share + profile.revoked_share else "active")
        patient = _patient(rng, profile, site_index, i, high_grade, glucose, age, consent, seed)
        make = _brain_volume_and_label if brain else _volume_and_label
        volume, label = make(rng, shape, profile, radius_frac, enhancement)

        study_dir = site_dir / "imaging" / f"study-{i:04d}"
        files = write_series(volume, study_dir, patient=patient, profile=profile)
        if brain:  # the scanner's localizer: another series of the study, which must not be taken
            write_series(volume[:, :, shape[2] // 2 - 1: shape[2] // 2 + 2], study_dir, patient=patient,
                         profile=profile, series_uid=generate_uid(entropy_srcs=[patient.series_uid, "localizer"]),
                         series_number=99, description="3-plane localizer", name_prefix="localizer")
        write_seg(label, files, study_dir / "seg.dcm", profile=profile)
        for kind, items in fhir_resources_for(patient, profile, study_id).items():
            resources.setdefault(kind, []).extend(items)
        cases.append(SyntheticCase(patient, volume, label, study_dir))
        if progress is not None:
            progress.update(1)
    write_bulk_export(resources, site_dir / "fhir")
    return cases


def synthesise(out_dir: Path, n_sites: int, n_patients: int, shape: tuple[int, int, int], seed: int,
               study_id: str = STUDY_ID, progress=None, held_out: bool = False) -> dict[str, list[SyntheticCase]]:
    """Write ``n_sites`` non-IID sites of ``study_id``'s generator profile under ``out_dir``;
    returns the ground truth per site name. ``held_out``: each site's test patients instead
    (same profiles, other patients)."""
    out = {}
    for s in range(n_sites):
        profile = profile_for_site(s, study_id)
        out[profile.name] = synthesise_site(out_dir / profile.name, profile, s, n_patients, shape,
                                            seed, study_id, progress, held_out)
    return out
