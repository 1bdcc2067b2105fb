"""What the synthetic scanner writes is read back unchanged, and agrees with MONAI.

MONAI's axis convention (``monai.data.PydicomReader`` with its defaults ``swap_ij=True``,
``affine_lps_to_ras=True``), checked by these tests: each DICOM frame (rows, columns) is
transposed to (columns, rows), slices are stacked on the last axis in InstanceNumber order,
so the array is (X, Y, Z) like ours; the affine is in RAS, i.e. for an axial series
``diag(-sx, -sy, sz)`` plus the first slice's position with x and y negated. MONAI orders
slices by InstanceNumber, while ``read_series`` orders them by position along the slice
normal; the two agree whenever InstanceNumber increases along the normal, as it does in
what ``write_series`` writes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import (
    CT_PROFILE,
    MR_PROFILE,
    SHAPE,
    asymmetric_label,
    make_patient,
    write_study,
)
from monai.data import PydicomReader

from clinfed.data.dicom_io import read_seg, read_series, read_study
from clinfed.data.synth_dicom import write_seg, write_series


def monai_read(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    reader = PydicomReader()
    array, meta = reader.get_data(reader.read(str(folder)))
    return np.asarray(array), np.asarray(meta["affine"], dtype=np.float64)


def series_only(study, tmp_path: Path) -> Path:
    # MONAI reads every DICOM file in a folder, the SEG included, so give it the slices only.
    folder = tmp_path / "series_only"
    folder.mkdir()
    for f in study.files:
        shutil.copy(f, folder)
    return folder


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_series_and_seg_round_trip_exactly(tmp_path, modality):
    study = write_study(tmp_path / modality, modality=modality, with_seg=True)

    volume, label = read_study(study.folder)

    assert volume.array.dtype == np.float32
    assert volume.array.shape == SHAPE
    np.testing.assert_array_equal(volume.array, study.volume)
    np.testing.assert_array_equal(label, study.label)
    assert label.dtype == np.uint8
    assert volume.spacing == pytest.approx(study.profile.spacing_mm)
    assert volume.modality == modality
    assert volume.patient_id == study.patient.mrn
    assert volume.study_uid == study.patient.study_uid
    assert volume.series_uid == study.patient.series_uid
    assert volume.files == study.files
    assert volume.sop_uids == [pydicom.dcmread(f).SOPInstanceUID for f in study.files]


def test_axial_affine_is_negated_x_y_spacing_in_ras(ct_series):
    volume = read_series(ct_series.folder)
    sx, sy, sz = CT_PROFILE.spacing_mm
    first = pydicom.dcmread(ct_series.files[0])
    x0, y0, z0 = (float(v) for v in first.ImagePositionPatient)

    expected = np.diag([-sx, -sy, sz, 1.0])
    expected[:3, 3] = [-x0, -y0, z0]
    np.testing.assert_allclose(volume.affine, expected, atol=1e-9)


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_array_and_affine_equal_monai_pydicom_reader(tmp_path, modality):
    study = write_study(tmp_path / modality, modality=modality)
    folder = series_only(study, tmp_path)

    ours = read_series(folder)
    monai_array, monai_affine = monai_read(folder)

    assert monai_array.shape == SHAPE  # MONAI is (columns, rows, slices) too
    np.testing.assert_array_equal(ours.array, monai_array.astype(np.float32))
    np.testing.assert_allclose(ours.affine, monai_affine, atol=1e-6)


def _rotation(ax: float, az: float) -> np.ndarray:
    cx, sx_, cz, sz_ = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx_], [0, sx_, cx]])
    rot_z = np.array([[cz, -sz_, 0], [sz_, cz, 0], [0, 0, 1]])
    return rot_z @ rot_x


def test_oblique_series_affine_equals_monai(ct_series, tmp_path):
    rot = _rotation(0.3, 0.5)
    row, col, normal = rot[:, 0], rot[:, 1], rot[:, 2]
    origin = np.array([10.0, -20.0, 30.0])
    sz = CT_PROFILE.spacing_mm[2]
    for k, path in enumerate(ct_series.files):
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [f"{v:.10f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.8f}" for v in origin + k * sz * normal]
        ds.save_as(path, enforce_file_format=True)

    ours = read_series(ct_series.folder)
    _, monai_affine = monai_read(ct_series.folder)

    np.testing.assert_allclose(ours.affine, monai_affine, atol=1e-5)
    # The third column really is oblique, so this is not the axial case again.
    assert np.count_nonzero(np.abs(ours.affine[:3, 2]) > 0.1) == 3
    assert ours.spacing == pytest.approx(CT_PROFILE.spacing_mm, abs=1e-6)
    np.testing.assert_array_equal(ours.array, ct_series.volume)


def test_read_series_orders_slices_by_position_not_file_name(ct_series):
    # Give the top slice the alphabetically first name and so on, reversing name order.
    n = len(ct_series.files)
    renamed = []
    for k, path in enumerate(ct_series.files):
        renamed.append(path.rename(path.with_name(f"img_{n - k:02d}.dcm")))

    volume = read_series(ct_series.folder)

    np.testing.assert_array_equal(volume.array, ct_series.volume)
    assert volume.files == renamed


def test_read_seg_places_frames_by_referenced_instance_not_frame_order(ct_study):
    seg = pydicom.dcmread(ct_study.seg)
    frame_sources = [
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for item in seg.PerFrameFunctionalGroupsSequence
    ]
    slice_uids = [pydicom.dcmread(f).SOPInstanceUID for f in ct_study.files]
    # highdicom stores frames by descending z: frame order is not slice order.
    assert frame_sources != slice_uids
    assert sorted(frame_sources) == sorted(slice_uids)

    label = read_seg(ct_study.seg, read_series(ct_study.folder))

    np.testing.assert_array_equal(label, ct_study.label)


def test_writers_are_deterministic(tmp_path):
    first = write_study(tmp_path / "one", with_seg=True)
    second = write_study(tmp_path / "two", with_seg=True)

    names = [f.name for f in first.files] + [first.seg.name]
    assert names == [f.name for f in second.files] + [second.seg.name]
    for name in names:
        assert (first.folder / name).read_bytes() == (second.folder / name).read_bytes(), name


def test_series_carries_patient_study_and_geometry_attributes(ct_series):
    patient = ct_series.patient
    datasets = [pydicom.dcmread(f) for f in ct_series.files]
    first = datasets[0]
    sx, sy, sz = CT_PROFILE.spacing_mm

    assert ct_series.files[0].read_bytes()[128:132] == b"DICM"  # Part 10 file with preamble
    assert first.SOPClassUID == pydicom.uid.CTImageStorage
    assert first.PatientID == patient.mrn
    assert str(first.PatientName) == "Müller^Anna"
    assert first.PatientBirthDate == "19610304"
    assert first.PatientSex == "F"
    assert first.StudyDate == "20240506"
    assert first.AccessionNumber
    assert first.Manufacturer == CT_PROFILE.manufacturer
    assert [float(v) for v in first.PixelSpacing] == pytest.approx([sy, sx])
    assert float(first.SliceThickness) == pytest.approx(sz)
    assert float(first.SpacingBetweenSlices) == pytest.approx(sz)
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert (first.Rows, first.Columns) == (SHAPE[1], SHAPE[0])
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert np.diff(z) == pytest.approx([sz] * (len(z) - 1))
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert {ds.FrameOfReferenceUID for ds in datasets} == {first.FrameOfReferenceUID}
    assert {ds.SeriesInstanceUID for ds in datasets} == {patient.series_uid}
    assert {ds.StudyInstanceUID for ds in datasets} == {patient.study_uid}


def test_ct_is_stored_as_int16_with_hu_rescale_and_no_laterality(ct_series):
    ds = pydicom.dcmread(ct_series.files[0])

    assert float(ds.RescaleIntercept) == -1024.0
    assert float(ds.RescaleSlope) == 1.0
    assert ds.RescaleType == "HU"
    assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
    np.testing.assert_array_equal(ds.pixel_array, ct_series.volume[:, :, 0].T + 1024)
    assert "Laterality" not in ds


def test_mr_is_stored_as_uint16_without_rescale(tmp_path):
    study = write_study(tmp_path / "mr", modality="MR")
    ds = pydicom.dcmread(study.files[0])

    assert ds.SOPClassUID == pydicom.uid.MRImageStorage
    assert ds.PixelRepresentation == 0 and ds.BitsAllocated == 16
    assert "RescaleIntercept" not in ds
    np.testing.assert_array_equal(ds.pixel_array, study.volume[:, :, 0].T)


def test_mr_values_are_rounded_and_negative_ones_refused(tmp_path):
    volume = np.full(SHAPE, 100.4)
    files = write_series(volume, tmp_path / "mr", patient=make_patient("mr"), profile=MR_PROFILE)
    assert len(files) == SHAPE[2]
    assert read_series(tmp_path / "mr").array[1, 0, 0] == 100.0

    # uint16 storage would wrap -7 to 65529: a magnitude image has no negative values.
    volume[0, 0, 0] = -7.0
    with pytest.raises(ValueError, match=r"\[0, 65535\]"):
        write_series(volume, tmp_path / "neg", patient=make_patient("neg"), profile=MR_PROFILE)


def test_ct_values_outside_int16_storage_are_refused(tmp_path):
    volume = np.zeros(SHAPE)
    volume[3, 3, 3] = 40000.0
    with pytest.raises(ValueError, match="HU"):
        write_series(volume, tmp_path / "ct", patient=make_patient("big"), profile=CT_PROFILE)


def test_seg_describes_one_binary_tumour_segment_in_snomed(ct_study):
    seg = pydicom.dcmread(ct_study.seg)

    assert seg.Modality == "SEG"
    assert seg.SegmentationType == "BINARY"
    assert len(seg.SegmentSequence) == 1
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Tumour"
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "49755003")
    assert (kind.CodingSchemeDesignator, kind.CodeValue) == ("SCT", "108369006")
    assert seg.StudyInstanceUID == ct_study.patient.study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_study.patient.series_uid


def test_write_seg_refuses_label_of_wrong_shape(ct_series, tmp_path):
    with pytest.raises(ValueError, match="shape"):
        write_seg(asymmetric_label()[:, :, :-1], ct_series.files, tmp_path / "seg.dcm",
                  profile=CT_PROFILE)


def test_read_seg_thresholds_fractional_segmentation_at_one_half(ct_series, tmp_path):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    probability = np.zeros(SHAPE, dtype=np.float32)
    probability[2:6, 3:5, 1:4] = 0.9
    probability[8:10, 6:8, 5] = 0.3  # below one half: not tumour
    sources = [pydicom.dcmread(f) for f in ct_series.files]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.ascontiguousarray(probability.transpose(2, 1, 0)),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        segment_descriptions=[hd.seg.SegmentDescription(
            segment_number=1, segment_label="Tumour",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )],
        series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0",
    )
    seg.save_as(tmp_path / "fractional.dcm")

    label = read_seg(tmp_path / "fractional.dcm", read_series(ct_series.folder))

    np.testing.assert_array_equal(label, (probability > 0.5).astype(np.uint8))
