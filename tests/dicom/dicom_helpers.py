"""Builders of small synthetic studies for the DICOM tests.

Volumes are deliberately non-square with unequal x/y spacing, so a swapped axis or a
transposed slice cannot pass unnoticed.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from clinfed.data.synth_dicom import write_seg, write_series
from clinfed.data.profiles import SITE_PROFILES, SiteProfile, SyntheticPatient

SHAPE = (16, 12, 8)  # (X columns, Y rows, Z slices)
CT_PROFILE = replace(SITE_PROFILES[0], spacing_mm=(0.8, 0.9, 2.5))
MR_PROFILE = replace(SITE_PROFILES[1], spacing_mm=(1.0, 1.2, 1.5))
assert CT_PROFILE.modality == "CT" and MR_PROFILE.modality == "MR"


def make_patient(key: str, sex: str = "female") -> SyntheticPatient:
    return SyntheticPatient(
        mrn=f"MRN-{key}",
        family_name="Müller",
        given_name="Anna",
        birth_date=dt.date(1961, 3, 4),
        sex=sex,
        study_date=dt.date(2024, 5, 6),
        study_uid=generate_uid(entropy_srcs=[f"test-study-{key}"]),
        series_uid=generate_uid(entropy_srcs=[f"test-series-{key}"]),
        glucose_mmol_l=5.4,
        creatinine_umol_l=80.0,
        has_diabetes=False,
        has_hypertension=False,
        high_grade=True,
        consent="active",
    )


def integer_volume(modality: str, seed: int = 0) -> np.ndarray:
    """Integer-valued real-world values, exactly representable after the stored rescale."""
    rng = np.random.default_rng(seed)
    if modality == "CT":
        return rng.integers(-1024, 2000, size=SHAPE).astype(np.float64)
    return rng.integers(0, 4000, size=SHAPE).astype(np.float64)


def asymmetric_label() -> np.ndarray:
    """A lesion whose shape differs under any flip or transpose of the three axes."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[2:7, 1:4, 1:3] = 1
    label[9:12, 6:11, 4:7] = 1
    label[13, 10, 7] = 1
    return label


@dataclass
class Study:
    folder: Path
    files: list[Path]
    volume: np.ndarray
    label: np.ndarray
    patient: SyntheticPatient
    profile: SiteProfile
    seg: Path | None = None


def write_study(folder: Path, *, modality: str = "CT", key: str = "a", with_seg: bool = False,
                seed: int = 0) -> Study:
    profile = CT_PROFILE if modality == "CT" else MR_PROFILE
    patient = make_patient(key)
    volume = integer_volume(modality, seed)
    files = write_series(volume, folder, patient=patient, profile=profile)
    study = Study(folder, files, volume, asymmetric_label(), patient, profile)
    if with_seg:
        study.seg = write_seg(study.label, files, folder / "tumour_seg.dcm", profile=profile)
    return study


def edit(path: Path, **changes) -> None:
    """Rewrites attributes of one file in place; a value of None deletes the attribute."""
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def copy_testdata(name: str, folder: Path) -> Path:
    """Copies one of pydicom's bundled test files (real files nobody here wrote) into folder."""
    source = get_testdata_file(name)
    assert source is not None, f"pydicom does not ship {name}"
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(source, folder / name))
