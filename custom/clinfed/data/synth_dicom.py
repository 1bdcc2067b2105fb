"""The synthetic scanner: writes CT/MR series (one single-frame file per slice) and DICOM SEG labels.

Only the synthesis (``clinfed data synth``, the demo, tests) writes DICOM; a site runs the reader
(:mod:`clinfed.data.dicom_io`). Files are deterministic for a patient's UIDs, so regenerating a
study is byte-identical, and they pass ``dciodvfy``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from clinfed import __version__
from clinfed.data.profiles import SiteProfile, SyntheticPatient

SUPPORTED_MODALITIES = ("CT", "MR")
_CT_INTERCEPT = -1024.0



def _ds(value: float) -> str:
    # DS is limited to 16 characters; repr() of e.g. 0.1 * 3 would exceed it.
    return format_number_as_ds(float(value))


def _study_time(study_uid: str) -> str:
    # A stable, plausible daytime (08:00-17:59) so that re-generating a study is byte-identical.
    seconds = 8 * 3600 + int(hashlib.sha256(study_uid.encode()).hexdigest(), 16) % (10 * 3600)
    return f"{seconds // 3600:02d}{seconds % 3600 // 60:02d}{seconds % 60:02d}"


def _accession_number(study_uid: str) -> str:
    return "A" + hashlib.sha256(study_uid.encode()).hexdigest()[:12].upper()


def _stored_values(volume: np.ndarray, modality: str) -> tuple[np.ndarray, dict]:
    """Converts real-world values to stored pixel values plus the attributes describing them."""
    values = np.rint(volume)
    if modality == "CT":
        stored = values - _CT_INTERCEPT
        info = np.iinfo(np.int16)
        if stored.min() < info.min or stored.max() > info.max:
            raise ValueError(
                f"CT values must lie in [{info.min + _CT_INTERCEPT:.0f}, "
                f"{info.max + _CT_INTERCEPT:.0f}] HU to fit int16 storage"
            )
        return stored.astype(np.int16), {
            "RescaleIntercept": _ds(_CT_INTERCEPT),
            "RescaleSlope": "1",
            "RescaleType": "HU",
        }
    if values.max() > np.iinfo(np.uint16).max or values.min() < 0:
        raise ValueError(f"MR values must be within [0, 65535] to fit uint16 storage, got "
                         f"[{values.min():.0f}, {values.max():.0f}]")
    return values.astype(np.uint16), {}


def write_series(
    volume: np.ndarray, out_dir: Path, *, patient: SyntheticPatient, profile: SiteProfile,
    series_uid: str | None = None, series_number: int = 1, description: str | None = None,
    name_prefix: str = "slice",
) -> list[Path]:
    """Writes ``volume`` as one single-frame CT or MR file per slice.

    Args:
        volume: real-world values (HU for CT), shape ``(X, Y, Z)``. Values are rounded to
            integers, the storage precision.
        out_dir: created if missing; files are named ``slice_0001.dcm`` ... in z order.
        patient: identity, dates and the study and series UIDs.
        profile: modality, manufacturer, voxel spacing, body part and series description of the
            site's scanner.
        series_uid, series_number, description, name_prefix: for a second series in the same
            study (default: the patient's series, number 1, the profile's description, ``slice``).

    Returns:
        The written files, index k holding ``volume[:, :, k]``.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D (X, Y, Z), got shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise ValueError("volume contains non-finite values")
    modality = profile.modality
    if modality not in SUPPORTED_MODALITIES:
        raise ValueError(f"profile {profile.name}: unsupported modality {modality!r}")

    n_x, n_y, n_z = volume.shape
    sx, sy, sz = (float(s) for s in profile.spacing_mm)
    stored, rescale = _stored_values(volume, modality)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    study_date = patient.study_date.strftime("%Y%m%d")
    study_time = _study_time(patient.study_uid)
    frame_of_reference = generate_uid(entropy_srcs=[patient.study_uid, "/frame-of-reference"])
    # Centre the volume on the scanner isocentre, as a real acquisition roughly would be.
    origin = (-(n_x - 1) * sx / 2, -(n_y - 1) * sy / 2, -(n_z - 1) * sz / 2)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n_z):
        sop_uid = generate_uid(entropy_srcs=[series_uid or patient.series_uid, f"/slice/{k}"])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        # Value 3 is modality specific: AXIAL is a CT defined term, MR has none for it.
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.InstanceCreationDate = study_date
        ds.InstanceCreationTime = study_time
        # Patient
        ds.PatientName = f"{patient.family_name}^{patient.given_name}"
        ds.PatientID = patient.mrn
        ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
        ds.PatientSex = {"male": "M", "female": "F"}.get(patient.sex, "O")
        # Study
        ds.StudyInstanceUID = patient.study_uid
        ds.StudyDate = study_date
        ds.StudyTime = study_time
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = _accession_number(patient.study_uid)
        ds.StudyDescription = "Tumour staging"
        # Series
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid or patient.series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDate = study_date
        ds.SeriesTime = study_time
        ds.SeriesDescription = description or profile.series_description or f"{modality} axial"
        ds.PatientPosition = "HFS"
        # An unpaired body part is what makes omitting Laterality valid.
        ds.BodyPartExamined = profile.body_part
        # Equipment
        ds.Manufacturer = profile.manufacturer
        ds.InstitutionName = profile.name
        ds.ManufacturerModelName = "clinfed synthetic scanner"
        ds.SoftwareVersions = __version__
        # Frame of reference
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        # Image
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate = study_date
        ds.ContentTime = study_time
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        z = origin[2] + k * sz
        ds.ImagePositionPatient = [_ds(origin[0]), _ds(origin[1]), _ds(z)]
        ds.SliceLocation = _ds(z)
        ds.PixelSpacing = [_ds(sy), _ds(sx)]  # row spacing first: (0028,0030) is [Y, X]
        ds.SliceThickness = _ds(sz)
        ds.SpacingBetweenSlices = _ds(sz)
        if modality == "CT":
            ds.KVP = "120"
            for keyword, value in rescale.items():
                setattr(ds, keyword, value)
        else:
            ds.ScanningSequence = "SE"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime = "500"
            ds.EchoTime = "15"
            ds.EchoTrainLength = 1
            ds.MagneticFieldStrength = "1.5"
        # A DICOM frame is (rows=Y, columns=X).
        ds.set_pixel_data(
            np.ascontiguousarray(stored[:, :, k].T), photometric_interpretation="MONOCHROME2",
            bits_stored=16, generate_instance_uid=False,  # keep the deterministic UID
        )
        path = out_dir / f"{name_prefix}_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_seg(
    label: np.ndarray, series_files: list[Path], out_path: Path, *, profile: SiteProfile
) -> Path:
    """Writes a binary DICOM SEG with one segment "Tumour" over the given series.

    Args:
        label: nonzero where tumour, shape ``(X, Y, Z)`` like the volume.
        series_files: the series' files with ``series_files[k]`` holding slice ``label[:, :, k]``,
            as :func:`write_series` returns them.
        out_path: the SEG file to write; its folder is created if missing.
        profile: the site; recorded as the SEG's device serial number.

    Returns:
        ``out_path``.
    """
    import highdicom as hd  # heavy import, only the generator needs it

    label = np.asarray(label)
    sources = [pydicom.dcmread(p) for p in series_files]
    if label.ndim != 3 or label.shape[2] != len(sources):
        raise ValueError(
            f"label shape {label.shape} does not match {len(sources)} series files"
        )
    first = sources[0]
    if label.shape[:2] != (first.Columns, first.Rows):
        raise ValueError(
            f"label shape {label.shape} does not match the series' "
            f"{first.Columns} columns x {first.Rows} rows"
        )
    source_series = str(first.SeriesInstanceUID)
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Tumour",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="clinfed synthetic lesion generator",
            version=__version__,
            family=codes.cid7162.MorphologicalOperations,
        ),
        tracking_uid=generate_uid(entropy_srcs=[source_series, "/segment-1"]),
        tracking_id="Tumour",
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        # highdicom wants (frames, rows, columns) in the order of source_images.
        pixel_array=np.ascontiguousarray((label != 0).transpose(2, 1, 0).astype(np.uint8)),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(entropy_srcs=[source_series, "/seg-series"]),
        series_number=100,
        sop_instance_uid=generate_uid(entropy_srcs=[source_series, "/seg-instance"]),
        instance_number=1,
        manufacturer="clinfed",
        manufacturer_model_name="clinfed synthetic data generator",
        software_versions=__version__,
        device_serial_number=profile.name,
        content_label="TUMOUR",
        content_description="Tumour ground truth",
        # Keep empty slices so every source slice has a frame, which is what a site's
        # ingestion would see from a radiologist's SEG of the whole series.
        omit_empty_frames=False,
    )
    # highdicom stamps "now" and random UIDs into these; pin them for reproducible files.
    content_date = first.get("ContentDate") or first.StudyDate
    content_time = first.get("ContentTime") or first.get("StudyTime") or "000000"
    seg.ContentDate = content_date
    seg.ContentTime = content_time
    for keyword in ("SeriesDate", "InstanceCreationDate"):
        if keyword in seg:
            setattr(seg, keyword, content_date)
    for keyword in ("SeriesTime", "InstanceCreationTime"):
        if keyword in seg:
            setattr(seg, keyword, content_time)
    for item in seg.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = f"{content_date}{content_time}"
    dimension_uid = generate_uid(entropy_srcs=[source_series, "/seg-dimension-organization"])
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dimension_uid
    for item in seg.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = dimension_uid

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path, enforce_file_format=True)
    return out_path
