"""Unusable input is refused with a DicomInputError that names the file (or folder) and the fault."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import CT_PROFILE, edit, write_study
from pydicom.uid import generate_uid

from clinfed.data.dicom_io import read_seg, read_series, read_study
from clinfed.errors import DicomInputError


def refused(call, *args) -> DicomInputError:
    with pytest.raises(DicomInputError) as caught:
        call(*args)
    return caught.value


def assert_names(error: DicomInputError, path: Path, *phrases: str) -> None:
    assert error.path == str(path)
    assert path.name in str(error)
    for phrase in phrases:
        assert phrase in error.problem, f"{phrase!r} not in {error.problem!r}"


# --- read_series -----------------------------------------------------------------------------


def test_non_dicom_file_is_refused_naming_it(ct_series):
    junk = ct_series.folder / "notes.txt"
    junk.write_text("scanner export log\n")

    assert_names(refused(read_series, ct_series.folder), junk, "not a readable DICOM file")


def test_truncated_file_is_refused_naming_it(ct_series):
    path = ct_series.files[3]
    path.write_bytes(path.read_bytes()[:-40])

    assert_names(refused(read_series, ct_series.folder), path, "truncated")


def test_file_cut_inside_its_header_is_refused_naming_it(ct_series):
    path = ct_series.files[3]
    path.write_bytes(path.read_bytes()[:400])

    assert_names(refused(read_series, ct_series.folder), path, "truncated")


def test_empty_folder_is_refused_naming_it(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()

    assert_names(refused(read_series, folder), folder, "no CT or MR image files")


def test_folder_with_only_a_seg_is_refused_naming_it(ct_study, tmp_path):
    folder = tmp_path / "seg_only"
    folder.mkdir()
    shutil.copy(ct_study.seg, folder)

    assert_names(refused(read_series, folder), folder, "no CT or MR image files")


def test_missing_folder_is_refused_naming_it(tmp_path):
    folder = tmp_path / "nowhere"

    assert_names(refused(read_series, folder), folder, "is not a folder")


def test_second_series_is_refused_naming_its_file(ct_series, tmp_path):
    other = write_study(tmp_path / "other", key="b")
    intruder = Path(shutil.copy(other.files[0], ct_series.folder / "zz_other.dcm"))

    error = refused(read_series, ct_series.folder)

    assert_names(error, intruder, "exactly one series", other.patient.series_uid)


def test_missing_slice_is_refused_naming_folder_and_neighbours(ct_series):
    ct_series.files[4].unlink()

    error = refused(read_series, ct_series.folder)

    assert_names(error, ct_series.folder, "missing slice", "slice_0004.dcm", "slice_0006.dcm")


def test_duplicate_position_is_refused_naming_both_files(ct_series):
    duplicate = Path(shutil.copy(ct_series.files[2], ct_series.folder / "again.dcm"))
    edit(duplicate, SOPInstanceUID=generate_uid(entropy_srcs=["again"]))

    error = refused(read_series, ct_series.folder)

    assert error.path in {str(duplicate), str(ct_series.files[2])}
    assert "duplicate slice" in error.problem and "same position" in error.problem
    assert "again.dcm" in str(error) and "slice_0003.dcm" in str(error)


def test_duplicate_sop_instance_uid_is_refused_naming_both_files(ct_series):
    shutil.copy(ct_series.files[2], ct_series.folder / "copy.dcm")

    error = refused(read_series, ct_series.folder)

    assert_names(error, ct_series.files[2], "duplicate slice", "SOP Instance UID", "copy.dcm")


def test_inconsistent_slice_spacing_is_refused_naming_the_file(ct_series):
    path = ct_series.files[4]
    position = [float(v) for v in pydicom.dcmread(path).ImagePositionPatient]
    position[2] += 0.4 * CT_PROFILE.spacing_mm[2]
    edit(path, ImagePositionPatient=position)

    assert_names(refused(read_series, ct_series.folder), path, "inconsistent spacing")


def test_inconsistent_orientation_is_refused_naming_the_file(ct_series):
    path = ct_series.files[5]
    edit(path, ImageOrientationPatient=[1, 0, 0, 0, 0, -1])

    assert_names(refused(read_series, ct_series.folder), path, "ImageOrientationPatient", "differs")


def test_non_orthogonal_orientation_is_refused_naming_the_file(ct_series):
    for path in ct_series.files:
        edit(path, ImageOrientationPatient=[1, 0, 0, 0.5, 0.5, 0])

    error = refused(read_series, ct_series.folder)

    assert_names(error, ct_series.files[0], "ImageOrientationPatient", "orthogonal unit vectors")


def test_inconsistent_pixel_spacing_is_refused_naming_the_file(ct_series):
    path = ct_series.files[6]
    edit(path, PixelSpacing=[0.5, 0.5])

    assert_names(refused(read_series, ct_series.folder), path, "PixelSpacing", "differs")


def test_inconsistent_matrix_size_is_refused_naming_the_file(ct_series):
    path = ct_series.files[1]
    ds = pydicom.dcmread(path)
    ds.set_pixel_data(
        np.ascontiguousarray(ds.pixel_array[:, :-2]), photometric_interpretation="MONOCHROME2",
        bits_stored=16, generate_instance_uid=False,
    )
    ds.save_as(path, enforce_file_format=True)

    assert_names(refused(read_series, ct_series.folder), path, "Columns", "differs")


def test_missing_pixel_data_is_refused_naming_the_file(ct_series):
    path = ct_series.files[2]
    edit(path, PixelData=None)

    assert_names(refused(read_series, ct_series.folder), path, "no pixel data")


def test_unsupported_modality_is_refused_naming_the_file(ct_series):
    path = ct_series.files[0]
    edit(path, Modality="US")

    assert_names(refused(read_series, ct_series.folder), path, "unsupported modality", "US")


def test_missing_position_is_refused_naming_the_file(ct_series):
    path = ct_series.files[3]
    edit(path, ImagePositionPatient=None)

    assert_names(refused(read_series, ct_series.folder), path, "missing ImagePositionPatient")


def test_gantry_tilted_stack_is_refused_naming_the_file(ct_series):
    for k, path in enumerate(ct_series.files):
        position = [float(v) for v in pydicom.dcmread(path).ImagePositionPatient]
        position[1] += 0.8 * k  # origins drift within the image plane
        edit(path, ImagePositionPatient=position)

    error = refused(read_series, ct_series.folder)

    assert_names(error, ct_series.files[1], "gantry tilt")


# --- read_seg --------------------------------------------------------------------------------


def test_read_seg_refuses_a_non_seg_file_naming_it(ct_series):
    volume = read_series(ct_series.folder)

    error = refused(read_seg, ct_series.files[0], volume)

    assert_names(error, ct_series.files[0], "not a DICOM SEG", "'CT'")


def test_read_seg_refuses_seg_without_segments_naming_it(ct_study):
    edit(ct_study.seg, SegmentSequence=pydicom.Sequence())

    error = refused(read_seg, ct_study.seg, read_series(ct_study.folder))

    assert_names(error, ct_study.seg, "no segment")


def test_read_seg_refuses_seg_of_another_series_naming_it(ct_study, tmp_path):
    other = write_study(tmp_path / "other", key="b")

    error = refused(read_seg, ct_study.seg, read_series(other.folder))

    assert_names(error, ct_study.seg, "references series", ct_study.patient.series_uid)


def test_read_seg_refuses_seg_of_another_study_naming_it(ct_study):
    edit(ct_study.seg, StudyInstanceUID=generate_uid(entropy_srcs=["another study"]))

    error = refused(read_seg, ct_study.seg, read_series(ct_study.folder))

    assert_names(error, ct_study.seg, "belongs to study")


def test_read_seg_refuses_frames_referencing_unknown_instances_naming_it(ct_study):
    # The SEG was made from the complete series; the site now holds one slice fewer.
    ct_study.files[0].unlink()
    volume = read_series(ct_study.folder)
    assert len(volume.sop_uids) == len(ct_study.files) - 1

    error = refused(read_seg, ct_study.seg, volume)

    assert_names(error, ct_study.seg, "references SOP instance", "not in the image series")


def test_read_seg_refuses_frame_size_different_from_series_naming_it(ct_study):
    volume = read_series(ct_study.folder)
    smaller = dataclasses.replace(volume, array=volume.array[:, :-1, :])

    error = refused(read_seg, ct_study.seg, smaller)

    assert_names(error, ct_study.seg, "frame size")


# --- read_study ------------------------------------------------------------------------------


def test_read_study_refuses_folder_without_seg_naming_it(ct_series):
    assert_names(refused(read_study, ct_series.folder), ct_series.folder, "no SEG file")


def test_read_study_refuses_folder_with_two_segs_naming_it(ct_study):
    shutil.copy(ct_study.seg, ct_study.folder / "second_seg.dcm")

    error = refused(read_study, ct_study.folder)

    assert_names(error, ct_study.folder, "2 SEG files", "second_seg.dcm", "tumour_seg.dcm")


def test_read_study_finds_the_seg_at_any_file_name(ct_study):
    ct_study.seg.rename(ct_study.folder / "0000_first_by_name")

    volume, label = read_study(ct_study.folder)

    np.testing.assert_array_equal(label, ct_study.label)
    np.testing.assert_array_equal(volume.array, ct_study.volume)
