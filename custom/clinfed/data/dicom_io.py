"""DICOM in at a site: CT/MR series (single-frame slices or one enhanced multi-frame file) and SEG labels.

Array layout everywhere is ``(X, Y, Z)``: X walks along a row (DICOM columns), Y down the
columns (DICOM rows), Z across slices in ascending position along the slice normal. The affine
maps voxel indices to RAS millimetres, as MONAI's ``PydicomReader`` and NIfTI do.

Readers are strict on purpose: a site operator gets a :class:`DicomInputError` naming the file
(or the folder, when no single file is to blame) instead of a silently wrong volume. The
synthetic writers live with the synthesis code (:mod:`clinfed.data.synth_dicom`): a site runs
only this reader.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, MediaStorageDirectoryStorage, SegmentationStorage

from clinfed.errors import DicomInputError

SUPPORTED_MODALITIES = ("CT", "MR")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Positions and cosines in real files are rounded to a few decimals by the writer; these
# tolerances accept that rounding but not a real geometric difference.
_COSINE_TOL = 1e-4
_MM_TOL = 1e-3
_SPACING_REL_TOL = 0.01


@dataclass
class ImageVolume:
    """One CT or MR series as a 3D array in real-world units.

    ``sop_uids[k]`` and ``files[k]`` are the instance and file of slice ``array[:, :, k]``
    (``frames[k]`` its frame, for an enhanced multi-frame file).
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
    frames: list[int | None] | None = None  # frame of a multi-frame file (0-based); None for single-frame

    def slice_index(self) -> dict[tuple[str, int | None], int]:
        """(SOP Instance UID, 1-based frame number or None) -> z index, for placing SEG frames."""
        frames = self.frames or [None] * len(self.sop_uids)
        return {(uid, None if f is None else f + 1): z for z, (uid, f) in enumerate(zip(self.sop_uids, frames))}


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
    """One 2D image: a single-frame file, or one frame of an enhanced multi-frame file."""

    path: Path
    ds: Dataset  # the file's dataset (shared by the frames of a multi-frame file)
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    frame: int | None = None  # 0-based frame of a multi-frame file
    rescale: tuple[float, float] = (1.0, 0.0)  # slope, intercept
    distinguishing: tuple = ()  # attributes that tell volumes at one position apart

    @property
    def name(self) -> str:
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame + 1}"

    @property
    def uid(self) -> str:
        return str(self.ds.SOPInstanceUID)


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


# Attributes that tell apart several volumes acquired at the same positions in one series.
_VOLUME_ATTRIBUTES = ("EchoTime", "DiffusionBValue", "TemporalPositionIndex", "TriggerTime", "AcquisitionNumber",
                      "ImageType")


def _distinguishing(ds: Dataset, frame_group: Dataset | None = None) -> tuple:
    values = []
    for keyword in _VOLUME_ATTRIBUTES:
        value = ds.get(keyword)
        if frame_group is not None:
            if keyword == "EchoTime" and frame_group.get("MREchoSequence"):
                value = frame_group.MREchoSequence[0].get("EffectiveEchoTime")
            elif keyword == "DiffusionBValue" and frame_group.get("MRDiffusionSequence"):
                value = frame_group.MRDiffusionSequence[0].get("DiffusionBValue")
            elif keyword == "TemporalPositionIndex" and frame_group.get("FrameContentSequence"):
                value = frame_group.FrameContentSequence[0].get("TemporalPositionIndex")
        values.append((keyword, None if value is None else str(value)))
    return tuple(values)


def _series_matches(ds: Dataset, choice) -> bool:
    if choice is None:
        return True
    if ds.get("Modality") not in choice.modalities:
        return False
    if choice.description is not None and not choice.description.search(str(ds.get("SeriesDescription", ""))):
        return False
    if choice.body_part is not None and str(ds.get("BodyPartExamined", "")).upper() != choice.body_part.upper():
        return False
    return True


def _choose_series(folder: Path, images: list[tuple[Path, Dataset]], choice) -> list[tuple[Path, Dataset]]:
    """The files of the one series that ``choice`` (a ``SeriesChoice``; None: any CT/MR) selects."""
    if choice is None:
        for path, ds in images:
            if ds.get("Modality") not in SUPPORTED_MODALITIES:
                raise DicomInputError(path, f"unsupported modality {ds.get('Modality')!r}; expected one of "
                                            f"{', '.join(SUPPORTED_MODALITIES)}")
    series: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, ds in images:
        series.setdefault(str(ds.get("SeriesInstanceUID")), []).append((path, ds))
    matching = {uid: files for uid, files in series.items() if _series_matches(files[0][1], choice)}
    if not matching:
        wanted = "a CT or MR series" if choice is None else (
            f"a {'/'.join(choice.modalities)} series"
            + (f" whose SeriesDescription matches {choice.description.pattern!r}" if choice.description else "")
            + (f" with BodyPartExamined {choice.body_part}" if choice.body_part else ""))
        raise DicomInputError(folder, f"holds {len(series)} series, none of them {wanted} (the study's series choice)")
    if len(matching) > 1:
        groups = sorted(matching.values(), key=len)
        intruder, first = groups[0][0], groups[-1][0]
        raise DicomInputError(
            intruder[0], f"belongs to series {intruder[1].get('SeriesInstanceUID')}, but {first[0].name} belongs to "
            f"series {first[1].get('SeriesInstanceUID')}: the folder must hold exactly one series that the study's "
            f"series choice selects ({len(matching)} do)")
    return next(iter(matching.values()))


def _frames_of(path: Path, ds: Dataset) -> list[_Slice]:
    """The frames of an enhanced multi-frame CT or MR file as slices, placed by their per-frame
    (or shared) functional groups."""
    n_frames = int(ds.get("NumberOfFrames") or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]
    if len(per_frame) != n_frames:
        raise DicomInputError(path, f"is a multi-frame image ({n_frames} frames) without per-frame functional groups "
                                    f"(PerFrameFunctionalGroupsSequence has {len(per_frame)} items), so its frames "
                                    "cannot be placed in 3D")

    def group(item: Dataset, keyword: str, field: str, count: int, frame: int) -> np.ndarray:
        found = item.get(keyword) or shared.get(keyword)
        if not found:
            raise DicomInputError(path, f"frame {frame + 1} has no {keyword} (per-frame or shared), so it cannot "
                                        "be placed in 3D")
        return _floats(found[0], field, count, path)

    slices = []
    for i, item in enumerate(per_frame):
        transform = item.get("PixelValueTransformationSequence") or shared.get("PixelValueTransformationSequence")
        slope = float(transform[0].get("RescaleSlope") or 1.0) if transform else float(ds.get("RescaleSlope") or 1.0)
        intercept = (float(transform[0].get("RescaleIntercept") or 0.0) if transform
                     else float(ds.get("RescaleIntercept") or 0.0))
        slices.append(_Slice(
            path, ds, group(item, "PlanePositionSequence", "ImagePositionPatient", 3, i),
            group(item, "PlaneOrientationSequence", "ImageOrientationPatient", 6, i),
            group(item, "PixelMeasuresSequence", "PixelSpacing", 2, i), frame=i, rescale=(slope, intercept),
            distinguishing=_distinguishing(ds, item)))
    return slices


def read_series(folder: Path, choice=None) -> ImageVolume:
    """Reads the CT or MR series of ``folder`` that ``choice`` selects (SEG and DICOMDIR files
    are skipped): single-frame slices, or one enhanced multi-frame file (its frames placed by
    the per-frame functional groups).

    Args:
        folder: one imaging study's folder.
        choice: a ``clinfed.data.study.SeriesChoice`` (modality, description pattern, body
            part); None takes the folder's only CT or MR series.

    Raises:
        DicomInputError: naming the offending file, or the folder when no single file is to
            blame, if no single complete, regular series is selected. A series whose slices
            disagree on patient, study or frame of reference is refused naming the slice.
    """
    folder = Path(folder)
    images: list[tuple[Path, Dataset]] = []
    for path in _candidate_files(folder):
        ds = _read_file(path)
        if _is_seg(ds) or _is_dicomdir(ds):
            continue
        images.append((path, ds))
    if not images:
        raise DicomInputError(folder, "holds no CT or MR image files")
    images = _choose_series(folder, images, choice)

    first_path, first = images[0]
    for path, ds in images:
        for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID"):
            if not ds.get(keyword):
                raise DicomInputError(path, f"missing {keyword}")
        if "PixelData" not in ds:
            raise DicomInputError(path, "has no pixel data (7FE0,0010)")
        if int(ds.get("SamplesPerPixel") or 1) != 1:
            raise DicomInputError(path, "is not a greyscale image (SamplesPerPixel != 1)")
        for keyword in ("Modality", "StudyInstanceUID", "Rows", "Columns"):
            _check_same(path, keyword, ds.get(keyword), first.get(keyword), first_path)
        # Identity and frame of reference: a slice of another patient or scan inside a series
        # must refuse the series, not be attributed to the majority (values are not shown).
        for keyword in ("PatientID", "FrameOfReferenceUID"):
            if str(ds.get(keyword, "")) != str(first.get(keyword, "")):
                raise DicomInputError(path, f"{keyword} differs from the one in {first_path.name}: a series must "
                                            "come from one patient and one frame of reference; the series is refused")

    multi_frame = [(p, ds) for p, ds in images if int(ds.get("NumberOfFrames") or 1) > 1]
    if multi_frame and len(images) > 1:
        raise DicomInputError(multi_frame[0][0], "is a multi-frame image in a series of several files; expected "
                                                 "either single-frame slices or one enhanced multi-frame file")
    if multi_frame:
        slices = _frames_of(*multi_frame[0])
    else:
        slices = [_Slice(path, ds, _floats(ds, "ImagePositionPatient", 3, path),
                         _floats(ds, "ImageOrientationPatient", 6, path), _floats(ds, "PixelSpacing", 2, path),
                         rescale=(float(ds.get("RescaleSlope") or 1.0), float(ds.get("RescaleIntercept") or 0.0)),
                         distinguishing=_distinguishing(ds)) for path, ds in images]

    # Geometry, all in LPS millimetres.
    orientation, pixel_spacing = slices[0].orientation, slices[0].pixel_spacing
    row_cos, col_cos = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row_cos) - 1) > _COSINE_TOL
        or abs(np.linalg.norm(col_cos) - 1) > _COSINE_TOL
        or abs(row_cos @ col_cos) > _COSINE_TOL
    ):
        raise DicomInputError(
            slices[0].path, f"ImageOrientationPatient {_fmt(orientation)} is not two orthogonal unit vectors"
        )
    if np.any(pixel_spacing <= 0):
        raise DicomInputError(slices[0].path, f"PixelSpacing {_fmt(pixel_spacing)} is not positive")
    normal = np.cross(row_cos, col_cos)

    seen_uids: dict[str, Path] = {}
    for s in slices:
        _check_same(s.path, "ImageOrientationPatient", s.orientation, orientation, slices[0].path, _COSINE_TOL)
        _check_same(s.path, "PixelSpacing", s.pixel_spacing, pixel_spacing, slices[0].path, _MM_TOL)
        if s.frame is None:
            if s.uid in seen_uids:
                raise DicomInputError(
                    s.path, f"duplicate slice: SOP Instance UID {s.uid} is also in {seen_uids[s.uid].name}"
                )
            seen_uids[s.uid] = s.path

    slices.sort(key=lambda s: float(s.position @ normal))
    depth = np.array([s.position @ normal for s in slices])
    for prev, cur, d_prev, d_cur in zip(slices, slices[1:], depth, depth[1:]):
        if d_cur - d_prev <= _MM_TOL:
            differing = [a for (a, v1), (_, v2) in zip(prev.distinguishing, cur.distinguishing) if v1 != v2]
            if differing:
                raise DicomInputError(
                    cur.path, f"the series holds several volumes at the same positions ({cur.name} and {prev.name} "
                    f"lie at {d_cur:g} mm but differ in {', '.join(differing)}: a diffusion, perfusion or "
                    "multi-echo acquisition); export the one volume to train on as its own series")
            raise DicomInputError(
                cur.path, f"duplicate slice: same position {d_cur:g} mm along the slice normal as {prev.name}"
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
            between = f"between {slices[i].name} and {slices[i + 1].name}"
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

    decoded: dict[Path, np.ndarray] = {}
    arrays = []
    for s in slices:
        if s.path not in decoded:
            try:
                decoded[s.path] = s.ds.pixel_array
            # Decoders raise assorted errors for truncated or corrupt pixel data.
            except Exception as exc:  # noqa: BLE001
                raise DicomInputError(
                    s.path, f"pixel data cannot be decoded (transfer syntax "
                    f"{s.ds.file_meta.get('TransferSyntaxUID', 'unknown')}: {exc})"
                ) from exc
        pixels = decoded[s.path] if s.frame is None else decoded[s.path][s.frame]
        if pixels.shape != (first.Rows, first.Columns):
            raise DicomInputError(
                s.path, f"pixel data has shape {pixels.shape}, expected ({first.Rows}, {first.Columns})"
            )
        slope, intercept = s.rescale
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
        sop_uids=[s.uid for s in slices],
        files=[s.path for s in slices],
        frames=[s.frame for s in slices],
    )


def read_seg(seg_path: Path, volume: ImageVolume, label=None) -> np.ndarray:
    """Reads a DICOM SEG as a label array aligned with ``volume``.

    Frames are placed by the source instance (and frame, for a multi-frame source) they
    reference, never by their order in the file. With ``label`` (a
    ``clinfed.data.study.LabelChoice``) the result is binary: 1 where the chosen segment (by
    its label, or its segmented property type code) is, 0 elsewhere; without it voxels carry
    the segment number.

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
    z_of = volume.slice_index()
    segment_numbers = {int(s.SegmentNumber) for s in segments}
    chosen = _chosen_segments(seg_path, segments, label) if label is not None else None
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
            frame = source.get("ReferencedFrameNumber")
            key = (uid, int(frame) if frame is not None and volume.frames and volume.frames[0] is not None else None)
        except (AttributeError, IndexError, TypeError) as exc:
            raise DicomInputError(
                seg_path, f"frame {i} lacks its segment number or source image reference"
            ) from exc
        if segment not in segment_numbers:
            raise DicomInputError(seg_path, f"frame {i} refers to undefined segment {segment}")
        if key not in z_of:
            raise DicomInputError(
                seg_path, f"frame {i} references SOP instance {uid}, which is not in the image "
                f"series {volume.series_uid}"
            )
        placements.append((z_of[key], segment))

    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001  (see read_series)
        raise DicomInputError(seg_path, f"pixel data cannot be decoded ({exc})") from exc
    pixels = pixels.reshape(n_frames, n_y, n_x)
    if seg_type == "FRACTIONAL":
        present = pixels >= (float(ds.get("MaximumFractionalValue") or 255) / 2)
    else:
        present = pixels != 0
    result = np.zeros((n_x, n_y, n_z), dtype=np.uint8)
    for (z, segment), mask in zip(placements, present):
        if chosen is None:
            result[:, :, z][mask.T] = segment
        elif segment in chosen:
            result[:, :, z][mask.T] = 1
    return result


def _chosen_segments(seg_path: Path, segments, label) -> set[int]:
    """Numbers of the segments the study's label choice names; refuses a SEG without one."""
    chosen = set()
    for item in segments:
        if label.segment_label is not None:
            if str(item.get("SegmentLabel", "")).strip().lower() == label.segment_label.lower():
                chosen.add(int(item.SegmentNumber))
        else:
            prop = (item.get("SegmentedPropertyTypeCodeSequence") or [Dataset()])[0]
            if (str(prop.get("CodingSchemeDesignator", "")), str(prop.get("CodeValue", ""))) == label.property_code:
                chosen.add(int(item.SegmentNumber))
    if not chosen:
        wanted = (f"label {label.segment_label!r}" if label.segment_label is not None
                  else f"segmented property type {label.property_code[0]} {label.property_code[1]}")
        raise DicomInputError(seg_path, f"has no segment with {wanted} (the study's label choice); its segments: "
                                        + ", ".join(str(s.get("SegmentLabel", "?")) for s in segments))
    return chosen


def seg_references_series(seg_path: Path, series_uid: str) -> bool:
    """Whether a SEG's ReferencedSeriesSequence names the series (header only)."""
    ds = _read_file(seg_path, header_only=True)
    return series_uid in {str(item.get("SeriesInstanceUID")) for item in ds.get("ReferencedSeriesSequence") or []}


def seg_files(folder: Path) -> list[Path]:
    """The DICOM SEG files in a study folder (unreadable files are left to read_series)."""
    found = []
    for path in _candidate_files(folder):
        try:
            if _is_seg(_read_file(path, header_only=True)):
                found.append(path)
        except DicomInputError:
            continue
    return found


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
