"""Enhanced multi-frame images (pydicom's real test files, geometry checked against highdicom's
volume API), and series whose slices disagree on who or what they show: refused naming the slice."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_helpers import copy_testdata, edit
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from clinfed.data.dicom_io import read_seg, read_series
from clinfed.data.study import LabelChoice
from clinfed.errors import DicomInputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def refused(call, *args) -> DicomInputError:
    with pytest.raises(DicomInputError) as caught:
        call(*args)
    return caught.value


# --- enhanced multi-frame ---------------------------------------------------------------------


def test_enhanced_ct_frames_read_as_a_volume_with_the_geometry_highdicom_gives(tmp_path):
    path = copy_testdata("eCT_Supplemental.dcm", tmp_path / "series")
    volume = read_series(path.parent)
    reference = hd.imread(str(path)).get_volume()  # (slice, row, column), LPS

    assert volume.modality == "CT" and volume.array.shape == (512, 512, 2)
    assert volume.frames == [1, 0]  # placed by PlanePositionSequence (along the normal), not file order
    assert volume.spacing == pytest.approx((0.388672, 0.388672, 10.0))
    # Every voxel of ours, mapped to the world and back into highdicom's volume, has the same value.
    x, y, z = np.meshgrid(np.arange(0, 512, 37), np.arange(0, 512, 41), np.arange(2), indexing="ij")
    ours = np.stack([x.ravel(), y.ravel(), z.ravel(), np.ones(x.size)])
    world_lps = LPS_TO_RAS @ volume.affine @ ours
    k, r, c = np.rint(np.linalg.inv(reference.affine) @ world_lps)[:3].astype(int)
    np.testing.assert_allclose(np.linalg.inv(reference.affine) @ world_lps, np.stack([k, r, c, np.ones(x.size)]),
                               atol=1e-4)  # lands on voxel centres, not between them
    np.testing.assert_array_equal(volume.array[x.ravel(), y.ravel(), z.ravel()], reference.array[k, r, c])
    # Each of our slices lies where the per-frame functional groups say its frame lies.
    ds = pydicom.dcmread(path)
    for index, frame in enumerate(volume.frames):
        position = [float(v) for v in ds.PerFrameFunctionalGroupsSequence[frame].PlanePositionSequence[0]
                    .ImagePositionPatient]
        np.testing.assert_allclose(LPS_TO_RAS @ volume.affine @ [0, 0, index, 1], [*position, 1])


def test_a_seg_that_highdicom_made_for_the_enhanced_ct_is_placed_by_referenced_frame(tmp_path):
    path = copy_testdata("eCT_Supplemental.dcm", tmp_path / "series")
    source = pydicom.dcmread(path)
    mask = np.zeros((2, 512, 512), dtype=bool)  # (frame, row, column)
    mask[1, 100:140, 200:260] = True  # only the file's second frame
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Tumour", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0", omit_empty_frames=True)
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path)

    volume = read_series(path.parent)
    label = read_seg(seg_path, volume, LabelChoice(property_code=("SCT", "108369006")))
    z = volume.frames.index(1)
    assert label[:, :, 1 - z].sum() == 0
    np.testing.assert_array_equal(label[:, :, z].T, mask[1].astype(np.uint8))


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_RLE.dcm"])
def test_enhanced_mr_without_per_frame_functional_groups_is_refused_naming_the_file(tmp_path, name):
    path = copy_testdata(name, tmp_path / "series")
    error = refused(read_series, path.parent)
    assert error.path == str(path) and name in str(error)
    assert "multi-frame image (10 frames) without per-frame functional groups" in error.problem
    assert "cannot be placed in 3D" in error.problem


def test_an_enhanced_file_among_single_frame_slices_is_refused_naming_it(ct_series, tmp_path):
    enhanced = copy_testdata("eCT_Supplemental.dcm", tmp_path / "other")
    first = pydicom.dcmread(ct_series.files[0])
    edit(enhanced, Rows=12, Columns=16, **{k: first.get(k) for k in (
        "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")})
    moved = Path(shutil.move(enhanced, ct_series.folder / "enhanced.dcm"))
    error = refused(read_series, ct_series.folder)
    assert error.path == str(moved)
    assert "multi-frame image in a series of several files" in error.problem


# --- slices that disagree -----------------------------------------------------------------------


@pytest.mark.parametrize("keyword", ["PatientID", "FrameOfReferenceUID"])
def test_a_slice_of_another_patient_or_frame_of_reference_refuses_the_series_naming_it(ct_series, keyword):
    intruder = ct_series.files[3]
    edit(intruder, **{keyword: "OTHER-123" if keyword == "PatientID" else generate_uid()})
    error = refused(read_series, ct_series.folder)
    assert error.path == str(intruder) and intruder.name in str(error)
    assert f"{keyword} differs from the one in {ct_series.files[0].name}" in error.problem
    assert "the series is refused" in error.problem
    assert "OTHER-123" not in str(error)  # identifiers are named, never shown


def test_a_slice_of_another_study_refuses_the_series_naming_it(ct_series):
    intruder = ct_series.files[5]
    edit(intruder, StudyInstanceUID=generate_uid())
    error = refused(read_series, ct_series.folder)
    assert error.path == str(intruder)
    assert "StudyInstanceUID" in error.problem and ct_series.files[0].name in error.problem


def test_two_echoes_at_the_same_positions_are_refused_naming_the_distinguishing_attribute(ct_series):
    for path in ct_series.files:
        edit(path, EchoTime=10.0)
    for i, path in enumerate(ct_series.files[:3]):
        second = ct_series.folder / f"echo2_{i}.dcm"
        shutil.copy(path, second)
        edit(second, EchoTime=80.0, SOPInstanceUID=generate_uid())
    error = refused(read_series, ct_series.folder)
    assert error.path.startswith(str(ct_series.folder))
    assert "several volumes at the same positions" in error.problem and "differ in EchoTime" in error.problem
    assert "export the one volume to train on as its own series" in error.problem
