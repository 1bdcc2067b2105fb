"""The benchmarks' cohort cache gives back the cases ingestion gave: what training reads of a case
(orientation and spacing through the affine, the modality that picks CT windowing or MR z-scoring,
a missing outcome) survives the cache, and a folder holding another cohort is refused."""

from __future__ import annotations

import numpy as np
import pytest

from clinfed.data.ingest import ingest_site
from clinfed.evaluation.cohorts import synthetic_sites

SHAPE = (16, 16, 16)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    return folder, synthetic_sites(folder, n_sites=3, n_patients=6, shape=SHAPE, seed=0)


def test_cached_cases_equal_freshly_ingested_ones(cohort):
    folder, first = cohort
    again = synthetic_sites(folder, n_sites=3, n_patients=6, shape=SHAPE, seed=0)  # read from the cache
    assert {c.modality for cases in again.values() for c in cases} == {"CT", "MR"}  # the MR site stays MR
    for site, cases in again.items():
        fresh = {c.pseudonym: c for c in ingest_site(folder / site).cases}
        assert [c.pseudonym for c in cases] == [c.pseudonym for c in first[site]] and set(fresh) == {
            c.pseudonym for c in cases}
        for case in cases:
            want = fresh[case.pseudonym]
            assert case.modality == want.modality
            assert case.outcome == want.outcome
            np.testing.assert_allclose(case.affine, want.affine)
            np.testing.assert_array_equal(case.image, want.image)
            np.testing.assert_array_equal(case.label, want.label)
            np.testing.assert_array_equal(case.ehr, want.ehr)


def test_a_folder_holding_another_cohort_is_refused(cohort):
    folder, _ = cohort
    with pytest.raises(FileExistsError, match="holds another cohort"):
        synthetic_sites(folder, n_sites=3, n_patients=7, shape=SHAPE, seed=0)
