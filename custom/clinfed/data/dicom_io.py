"""DICOM in and out: the synthetic scanner writes CT/MR series and SEG files; sites read them back.

Array layout everywhere is ``(X, Y, Z)``: X walks along a row (DICOM columns), Y down the
columns (DICOM rows), Z across slices in ascending position along the slice normal. The affine
maps voxel indices to RAS millimetres, as MONAI's ``PydicomReader`` and NIfTI do.

Readers are strict on purpose: a site operator gets a :class:`DicomInputError` naming the file
(or the folder, when no single file is to blame) instead of a silently wrong volume.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
    MRImageStorage,
    SegmentationStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from clinfed import __version__
from clinfed.data.profiles import SiteProfile, SyntheticPatient
from clinfed.errors import DicomInputError

SUPPORTED_MODALITIES = ("CT", "MR")

_CT_INTERCEPT = -1024.0
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Positions and cosines in real files are rounded to a few decimals by the writer; these
# tolerances accept that rounding but not a real geometric difference.
_COSINE_TOL = 1e-4
_MM_TOL = 1e-3
_SPACING_REL_TOL = 0.01


@dataclass
class ImageVolume:
    """One CT or MR series as a 3D array in real-world units.

    ``sop_uids[k]`` and ``files[k]`` are the instance and file of slice ``array[:, :, k]``.
    """

    array: np.ndarray  # float32, (X, Y, Z), rescaled (HU for CT)
    affine: np.ndarray  # 4x4 float64, voxel index -> RAS mm
    spacing: tuple[float, float, float]  # (sx, sy, sz) mm
    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    sop_uids: list[str]
    files: list[Path]


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------


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
    volume: np.ndarray, out_dir: Path, *, patient: SyntheticPatient, profile: SiteProfile
) -> list[Path]:
    """Writes ``volume`` as one single-frame CT or MR file per slice.

    Args:
        volume: real-world values (HU for CT), shape ``(X, Y, Z)``. Values are rounded to
            integers, the storage precision.
        out_dir: created if missing; files are named ``slice_0001.dcm`` ... in z order.
        patient: identity, dates and the study and series UIDs.
        profile: modality, manufacturer and voxel spacing of the site's scanner.

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
        sop_uid = generate_uid(entropy_srcs=[patient.series_uid, f"/slice/{k}"])
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
        ds.SeriesInstanceUID = patient.series_uid
        ds.SeriesNumber = 1
        ds.SeriesDate = study_date
        ds.SeriesTime = study_time
        ds.SeriesDescription = f"{modality} axial"
        ds.PatientPosition = "HFS"
        # An unpaired body part is what makes omitting Laterality valid.
        ds.BodyPartExamined = "ABDOMEN"
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
        path = out_dir / f"slice_{k + 1:04d}.dcm"
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


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def _read_file(path: Path, *, header_only: bool = False) -> Dataset:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, stop_before_pixels=header_only)
    # pydicom signals broken input with many exception types (InvalidDicomError, EOFError,
    # struct.error, ValueError...); to the operator they all mean "this file is unusable".
    except Exception as exc:  # noqa: BLE001
        raise DicomInputError(
            path, f"not a readable DICOM file ({type(exc).__name__}: {exc})"
        ) from exc
    # pydicom only warns about an early end of file and returns the elements read so far,
    # which would surface later as a misleading "missing attribute".
    for warning in caught:
        if "end of file" in str(warning.message).lower():
            raise DicomInputError(path, f"file is truncated ({warning.message})")
    if not header_only:
        _check_not_truncated(path, ds)
    return ds


def _check_not_truncated(path: Path, ds: Dataset) -> None:
    """Raises if the file ends inside its last data element (which pydicom silently accepts)."""
    if not len(ds):
        raise DicomInputError(path, "file holds no data elements after its header (truncated?)")
    meta = getattr(ds, "file_meta", None) or {}
    if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return  # offsets count the inflated stream, not the file
    last = ds.get_item(max(ds.keys()))
    # Converted elements and undefined lengths carry no reliable end offset; skip those.
    if not isinstance(last, RawDataElement) or last.length == 0xFFFFFFFF:
        return
    end = last.value_tell + last.length
    size = path.stat().st_size
    if end != size:
        raise DicomInputError(
            path, f"file is truncated or damaged: data element {last.tag} ends at byte {end}, "
            f"but the file has {size} bytes"
        )


def _candidate_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomInputError(folder, "is not a folder")
    # Hidden files are OS clutter (.DS_Store), never part of an export.
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _is_seg(ds: Dataset) -> bool:
    return ds.get("Modality") == "SEG" or ds.get("SOPClassUID") == SegmentationStorage


def _is_dicomdir(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    return meta is not None and meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage


def _floats(ds: Dataset, keyword: str, count: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise DicomInputError(path, f"missing {keyword}, so the slice cannot be placed in 3D")
    try:
        values = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DicomInputError(path, f"{keyword} is not numeric: {value!r}") from exc
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise DicomInputError(path, f"{keyword} must be {count} finite numbers, got {value!r}")
    return values


@dataclass
class _Slice:
    path: Path
    ds: Dataset
    position: np.ndarray  # ImagePositionPatient, LPS mm


def _check_same(path: Path, what: str, value, expected, first: Path, tol: float | None = None):
    """Raises naming ``path`` unless ``value`` equals the first file's (within ``tol`` if given)."""
    same = value == expected if tol is None else np.allclose(value, expected, atol=tol, rtol=0)
    if not same:
        raise DicomInputError(
            path, f"{what} {_fmt(value)} differs from {_fmt(expected)} in {first.name}"
        )


def _fmt(value) -> str:
    if isinstance(value, np.ndarray):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    return str(value)


def read_series(folder: Path) -> ImageVolume:
    """Reads the single CT or MR series in ``folder`` (SEG and DICOMDIR files are skipped).

    Raises:
        DicomInputError: naming the offending file, or the folder when no single file is to
            blame, if the folder does not hold exactly one complete, regular series.
    """
    folder = Path(folder)
    images: list[tuple[Path, Dataset]] = []
    for path in _candidate_files(folder):
        ds = _read_file(path)
        if _is_seg(ds) or _is_dicomdir(ds):
            continue
        modality = ds.get("Modality")
        if modality not in SUPPORTED_MODALITIES:
            raise DicomInputError(
                path, f"unsupported modality {modality!r}; expected one of "
                f"{', '.join(SUPPORTED_MODALITIES)}"
            )
        images.append((path, ds))
    if not images:
        raise DicomInputError(folder, "holds no CT or MR image files")

    first_path, first = images[0]
    for path, ds in images[1:]:
        if ds.get("SeriesInstanceUID") != first.get("SeriesInstanceUID"):
            raise DicomInputError(
                path, f"belongs to series {ds.get('SeriesInstanceUID')}, but "
                f"{first_path.name} belongs to series {first.get('SeriesInstanceUID')}: "
                "the folder must hold exactly one series"
            )
    for path, ds in images:
        for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID"):
            if not ds.get(keyword):
                raise DicomInputError(path, f"missing {keyword}")
        if "PixelData" not in ds:
            raise DicomInputError(path, "has no pixel data (7FE0,0010)")
        if int(ds.get("NumberOfFrames") or 1) != 1:
            raise DicomInputError(
                path, f"is a multi-frame image ({ds.NumberOfFrames} frames); only "
                "single-frame slices are supported"
            )
        if int(ds.get("SamplesPerPixel") or 1) != 1:
            raise DicomInputError(path, "is not a greyscale image (SamplesPerPixel != 1)")
        for keyword in ("Modality", "StudyInstanceUID", "Rows", "Columns"):
            _check_same(path, keyword, ds.get(keyword), first.get(keyword), first_path)

    # Geometry, all in LPS millimetres.
    orientation = _floats(first, "ImageOrientationPatient", 6, first_path)
    pixel_spacing = _floats(first, "PixelSpacing", 2, first_path)
    row_cos, col_cos = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row_cos) - 1) > _COSINE_TOL
        or abs(np.linalg.norm(col_cos) - 1) > _COSINE_TOL
        or abs(row_cos @ col_cos) > _COSINE_TOL
    ):
        raise DicomInputError(
            first_path, f"ImageOrientationPatient {_fmt(orientation)} is not two orthogonal "
            "unit vectors"
        )
    if np.any(pixel_spacing <= 0):
        raise DicomInputError(first_path, f"PixelSpacing {_fmt(pixel_spacing)} is not positive")
    normal = np.cross(row_cos, col_cos)

    slices: list[_Slice] = []
    seen_uids: dict[str, Path] = {}
    for path, ds in images:
        _check_same(
            path, "ImageOrientationPatient", _floats(ds, "ImageOrientationPatient", 6, path),
            orientation, first_path, _COSINE_TOL,
        )
        _check_same(
            path, "PixelSpacing", _floats(ds, "PixelSpacing", 2, path), pixel_spacing,
            first_path, _MM_TOL,
        )
        uid = str(ds.SOPInstanceUID)
        if uid in seen_uids:
            raise DicomInputError(
                path, f"duplicate slice: SOP Instance UID {uid} is also in {seen_uids[uid].name}"
            )
        seen_uids[uid] = path
        slices.append(_Slice(path, ds, _floats(ds, "ImagePositionPatient", 3, path)))

    slices.sort(key=lambda s: float(s.position @ normal))
    depth = np.array([s.position @ normal for s in slices])
    for prev, cur, d_prev, d_cur in zip(slices, slices[1:], depth, depth[1:]):
        if d_cur - d_prev <= _MM_TOL:
            raise DicomInputError(
                cur.path, f"duplicate slice: same position {d_cur:g} mm along the slice normal "
                f"as {prev.path.name}"
            )
    # A stack whose origins drift within the image plane (gantry tilt) is sheared; a plain
    # affine would misplace every slice but the first. Under a tenth of a pixel is rounding.
    for s in slices[1:]:
        offset = s.position - slices[0].position
        in_plane = offset - (offset @ normal) * normal
        if np.linalg.norm(in_plane) > max(_MM_TOL, 0.1 * min(pixel_spacing)):
            raise DicomInputError(
                s.path, f"ImagePositionPatient is offset {np.linalg.norm(in_plane):g} mm within "
                "the image plane from the first slice (gantry tilt or sheared stack); "
                "resample the series to a regular grid first"
            )

    steps = np.diff(depth)
    if len(steps):
        # The median is the spacing most slices agree on; a lone misplaced slice or a gap
        # cannot shift it (the minimum could: a slice moved by half a step halves it).
        nominal = float(np.median(steps))
        for i, step in enumerate(steps):
            if abs(step - nominal) <= _SPACING_REL_TOL * nominal + _MM_TOL:
                continue
            ratio = step / nominal
            between = f"between {slices[i].path.name} and {slices[i + 1].path.name}"
            if round(ratio) >= 2 and abs(ratio - round(ratio)) <= _SPACING_REL_TOL * ratio:
                raise DicomInputError(
                    folder, f"missing slice: gap of {step:g} mm {between}, where slices are "
                    f"{nominal:g} mm apart ({round(ratio) - 1} slice(s) missing)"
                )
            raise DicomInputError(
                slices[i + 1].path, f"inconsistent spacing between slices: {step:g} mm "
                f"{between}, but {nominal:g} mm elsewhere in the series"
            )
        slice_step = (slices[-1].position - slices[0].position) / (len(slices) - 1)
        sz = float(np.linalg.norm(slice_step))
    else:
        spacing_tag = first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0
        sz = float(spacing_tag)
        slice_step = normal * sz

    arrays = []
    for s in slices:
        try:
            pixels = s.ds.pixel_array
        # Decoders raise assorted errors for truncated or corrupt pixel data.
        except Exception as exc:  # noqa: BLE001
            raise DicomInputError(
                s.path, f"pixel data cannot be decoded (transfer syntax "
                f"{s.ds.file_meta.get('TransferSyntaxUID', 'unknown')}: {exc})"
            ) from exc
        if pixels.shape != (first.Rows, first.Columns):
            raise DicomInputError(
                s.path, f"pixel data has shape {pixels.shape}, expected "
                f"({first.Rows}, {first.Columns})"
            )
        slope = float(s.ds.get("RescaleSlope") or 1.0)
        intercept = float(s.ds.get("RescaleIntercept") or 0.0)
        arrays.append(pixels.T.astype(np.float32) * np.float32(slope) + np.float32(intercept))

    sy, sx = (float(v) for v in pixel_spacing)  # PixelSpacing is [row spacing, column spacing]
    lps = np.eye(4)
    lps[:3, 0] = row_cos * sx  # X index walks along a row
    lps[:3, 1] = col_cos * sy
    lps[:3, 2] = slice_step
    lps[:3, 3] = slices[0].position
    return ImageVolume(
        array=np.stack(arrays, axis=-1),
        affine=_LPS_TO_RAS @ lps,
        spacing=(sx, sy, sz),
        patient_id=str(first.get("PatientID", "")),
        study_uid=str(first.StudyInstanceUID),
        series_uid=str(first.SeriesInstanceUID),
        modality=str(first.Modality),
        sop_uids=[str(s.ds.SOPInstanceUID) for s in slices],
        files=[s.path for s in slices],
    )


def read_seg(seg_path: Path, volume: ImageVolume) -> np.ndarray:
    """Reads a DICOM SEG as a label array aligned with ``volume``.

    Frames are placed by the source instance they reference, never by their order in the file.
    Voxels carry the segment number (1 for clinfed's single "Tumour" segment), 0 elsewhere.

    Raises:
        DicomInputError: naming ``seg_path`` if it is not a SEG, has no segment, refers to
            another study or series, refers to instances outside the series, or its frame
            size differs from the series.
    """
    seg_path = Path(seg_path)
    ds = _read_file(seg_path)
    if not _is_seg(ds):
        raise DicomInputError(
            seg_path, f"is not a DICOM SEG (Modality {ds.get('Modality')!r}, SOP Class "
            f"{ds.get('SOPClassUID')})"
        )
    segments = ds.get("SegmentSequence") or []
    if not segments:
        raise DicomInputError(seg_path, "has no segment (SegmentSequence is empty)")
    seg_type = ds.get("SegmentationType")
    if seg_type not in ("BINARY", "FRACTIONAL"):
        raise DicomInputError(
            seg_path, f"SegmentationType {seg_type!r} is not supported (BINARY or FRACTIONAL)"
        )

    referenced_series = [str(item.get("SeriesInstanceUID")) for item in
                         ds.get("ReferencedSeriesSequence") or []]
    if referenced_series and volume.series_uid not in referenced_series:
        raise DicomInputError(
            seg_path, f"references series {', '.join(referenced_series)}, not the image series "
            f"{volume.series_uid} it was given with"
        )
    if str(ds.get("StudyInstanceUID")) != volume.study_uid:
        raise DicomInputError(
            seg_path, f"belongs to study {ds.get('StudyInstanceUID')}, not the image series' "
            f"study {volume.study_uid}"
        )
    n_x, n_y, n_z = volume.array.shape
    if (ds.get("Rows"), ds.get("Columns")) != (n_y, n_x):
        raise DicomInputError(
            seg_path, f"frame size {ds.get('Rows')}x{ds.get('Columns')} (rows x columns) differs "
            f"from the series' {n_y}x{n_x}"
        )

    frames_info = ds.get("PerFrameFunctionalGroupsSequence") or []
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if len(frames_info) != n_frames:
        raise DicomInputError(
            seg_path, f"has {n_frames} frames but {len(frames_info)} per-frame descriptions"
        )
    z_of_uid = {uid: k for k, uid in enumerate(volume.sop_uids)}
    segment_numbers = {int(s.SegmentNumber) for s in segments}
    placements = []
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]

    def group(item: Dataset, keyword: str) -> Dataset:
        # A functional group is either per frame or, when equal for all frames, shared.
        return (item.get(keyword) or shared.get(keyword))[0]

    for i, item in enumerate(frames_info, start=1):
        try:
            segment = int(group(item, "SegmentIdentificationSequence").ReferencedSegmentNumber)
            source = group(item, "DerivationImageSequence").SourceImageSequence[0]
            uid = str(source.ReferencedSOPInstanceUID)
        except (AttributeError, IndexError, TypeError) as exc:
            raise DicomInputError(
                seg_path, f"frame {i} lacks its segment number or source image reference"
            ) from exc
        if segment not in segment_numbers:
            raise DicomInputError(seg_path, f"frame {i} refers to undefined segment {segment}")
        if uid not in z_of_uid:
            raise DicomInputError(
                seg_path, f"frame {i} references SOP instance {uid}, which is not in the image "
                f"series {volume.series_uid}"
            )
        placements.append((z_of_uid[uid], segment))

    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001  (see read_series)
        raise DicomInputError(seg_path, f"pixel data cannot be decoded ({exc})") from exc
    pixels = pixels.reshape(n_frames, n_y, n_x)
    if seg_type == "FRACTIONAL":
        present = pixels >= (float(ds.get("MaximumFractionalValue") or 255) / 2)
    else:
        present = pixels != 0
    label = np.zeros((n_x, n_y, n_z), dtype=np.uint8)
    for (z, segment), mask in zip(placements, present):
        label[:, :, z][mask.T] = segment
    return label


def read_study(folder: Path) -> tuple[ImageVolume, np.ndarray]:
    """Reads a study folder: one image series plus exactly one SEG file of it.

    Raises:
        DicomInputError: naming the folder when it holds no SEG or more than one, or as
            :func:`read_series` and :func:`read_seg` do.
    """
    folder = Path(folder)
    segs = [p for p in _candidate_files(folder) if _is_seg(_read_file(p, header_only=True))]
    if not segs:
        raise DicomInputError(folder, "holds no SEG file (Modality SEG); one is required")
    if len(segs) > 1:
        raise DicomInputError(
            folder, f"holds {len(segs)} SEG files ({', '.join(p.name for p in segs)}); "
            "exactly one is required"
        )
    volume = read_series(folder)
    return volume, read_seg(segs[0], volume)
