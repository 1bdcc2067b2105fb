"""Generated sites shared by the data tests. Generation is the slow part, so it runs once per
session; a test that damages a site works on its own copy (``site_copy``)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from clinfed.data.synth import SyntheticCase, synthesise

SHAPE = (16, 16, 8)
# With this seed every consent state occurs (site-1 has a revoked and a no-consent patient).
SEED = 2
PATIENTS = 12


@dataclass
class Sites:
    root: Path
    truth: dict[str, list[SyntheticCase]]


@dataclass
class SiteCopy:
    dir: Path
    truth: list[SyntheticCase]  # study_dir fields point into the original, use study() instead

    def study(self, index: int) -> Path:
        return self.dir / "imaging" / self.truth[index].study_dir.name


@pytest.fixture(scope="session")
def three_sites(tmp_path_factory) -> Sites:
    root = tmp_path_factory.mktemp("three_sites")
    return Sites(root, synthesise(root, 3, PATIENTS, SHAPE, SEED))


@pytest.fixture
def site_copy(three_sites, tmp_path) -> SiteCopy:
    """A private copy of site-1 (CT, SNOMED, mg/dL), key included, for tests that damage it."""
    target = tmp_path / "site-1"
    shutil.copytree(three_sites.root / "site-1", target)
    return SiteCopy(target, three_sites.truth["site-1"])
