"""Real DICOM files written by other software (pydicom's bundled test data)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from dicom_helpers import copy_testdata

from clinfed.data.dicom_io import read_seg, read_series
from clinfed.errors import DicomInputError


@pytest.mark.parametrize(
    ("name", "modality", "shape"),
    [("CT_small.dcm", "CT", (128, 128, 1)), ("MR_small.dcm", "MR", (64, 64, 1))],
)
def test_read_series_reads_real_single_slice(tmp_path, name, modality, shape):
    path = copy_testdata(name, tmp_path / "series")
    ds = pydicom.dcmread(path)

    volume = read_series(tmp_path / "series")

    expected = ds.pixel_array.T.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0)
    )
    assert volume.modality == modality
    assert volume.array.shape == shape
    np.testing.assert_array_equal(volume.array[:, :, 0], expected)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    assert volume.spacing[:2] == pytest.approx((col_spacing, row_spacing))
    assert volume.patient_id == ds.PatientID
    assert volume.sop_uids == [ds.SOPInstanceUID]
    position = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(volume.affine[:3, 3], position * [-1, -1, 1])


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_other_encodings_decode_to_the_same_pixels_as_uncompressed(tmp_path, name):
    reference = read_series(copy_testdata("MR_small.dcm", tmp_path / "plain").parent)
    path = copy_testdata(name, tmp_path / "encoded")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID != pydicom.dcmread(
        tmp_path / "plain" / "MR_small.dcm"
    ).file_meta.TransferSyntaxUID

    volume = read_series(path.parent)

    np.testing.assert_array_equal(volume.array, reference.array)
    np.testing.assert_array_equal(volume.affine, reference.affine)


def test_compressed_encodings_are_really_compressed():
    # Guards the test above against pydicom shipping these files decompressed some day.
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        path = get_testdata_file(name)
        assert path is not None, name
        assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed


def test_real_truncated_file_is_refused_naming_it(tmp_path):
    path = copy_testdata("MR_truncated.dcm", tmp_path / "series")

    with pytest.raises(DicomInputError) as caught:
        read_series(tmp_path / "series")

    assert caught.value.path == str(path)
    assert "truncated" in caught.value.problem


def test_real_seg_of_another_series_is_refused_naming_it(ct_series, tmp_path):
    liver = copy_testdata("liver_1frame.dcm", tmp_path / "other")
    volume = read_series(ct_series.folder)

    with pytest.raises(DicomInputError) as caught:
        read_seg(liver, volume)

    assert caught.value.path == str(liver)
    assert "liver_1frame.dcm" in str(caught.value)
    assert "references series" in caught.value.problem
    assert volume.series_uid in caught.value.problem
