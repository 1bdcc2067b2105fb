"""Generated files pass David Clunie's dciodvfy (dicom3tools) without errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from dicom_helpers import edit


def dciodvfy(path: Path) -> str:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy not found: install dicom3tools (apt-get install -y dicom3tools)")
    result = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr  # it reports on stderr


def error_lines(report: str) -> list[str]:
    return [line for line in report.splitlines() if "Error" in line]


@pytest.mark.parametrize(
    ("study_fixture", "iod"), [("ct_study", "CTImage"), ("mr_study", "MRImage")]
)
def test_generated_slices_and_seg_pass_dciodvfy(request, study_fixture, iod):
    study = request.getfixturevalue(study_fixture)

    slice_report = dciodvfy(study.files[len(study.files) // 2])
    seg_report = dciodvfy(study.seg)

    assert iod in slice_report  # it recognised and checked the right IOD
    assert error_lines(slice_report) == []
    assert "Segmentation" in seg_report
    assert error_lines(seg_report) == []


def test_dciodvfy_check_detects_a_broken_slice(ct_series):
    # Control for the test above: a missing Type 1 attribute must show up as an error line.
    path = ct_series.files[0]
    edit(path, ImageOrientationPatient=None)
    assert "ImageOrientationPatient" not in pydicom.dcmread(path)

    assert error_lines(dciodvfy(path)) != []
