"""Fixtures: one freshly written study per test, in the test's own tmp folder."""

from __future__ import annotations

import pytest
from dicom_helpers import Study, write_study


@pytest.fixture
def ct_study(tmp_path) -> Study:
    return write_study(tmp_path / "ct", modality="CT", with_seg=True)


@pytest.fixture
def ct_series(tmp_path) -> Study:
    return write_study(tmp_path / "ct", modality="CT")


@pytest.fixture
def mr_study(tmp_path) -> Study:
    return write_study(tmp_path / "mr", modality="MR", with_seg=True)
