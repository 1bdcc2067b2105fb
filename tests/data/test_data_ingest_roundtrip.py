"""Generated sites read back through ``ingest_site`` exactly as they were generated."""

from __future__ import annotations

import numpy as np
import pytest
from data_helpers import CONSENT_REASON, active_indices, pseudonyms

from clinfed.data.ingest import ingest_site
from clinfed.data.study import load_study
from clinfed.data.profiles import profile_for_site

SITES = ("site-1", "site-2", "site-3")


STUDY = load_study("clinfed-tumour-seg")
EHR_FEATURES = STUDY.feature_names + tuple(f"{n}_missing" for n in STUDY.feature_names)


def _expected_ehr(patient) -> dict[str, float]:
    """The liver study's scaling (provisioning/studies/clinfed-tumour-seg.yml); nothing missing."""
    return {
        "age": (patient.age_at_study - 60.0) / 10.0,
        "sex_female": float(patient.sex == "female"),
        "glucose": (patient.glucose_mmol_l - 6.0) / 1.6,
        "creatinine": (patient.creatinine_umol_l - 80.0) / 20.0,
        "diabetes": float(patient.has_diabetes),
        "hypertension": float(patient.has_hypertension),
        **{f"{n}_missing": 0.0 for n in STUDY.feature_names},
    }


@pytest.fixture(scope="module")
def ingested(three_sites):
    return {site: ingest_site(three_sites.root / site) for site in SITES}


@pytest.mark.parametrize("site_index", range(len(SITES)))
def test_consented_patients_ingest_voxel_identical_with_profile_spacing_and_ehr(
        three_sites, ingested, site_index):
    site = SITES[site_index]
    truth = three_sites.truth[site]
    result = ingested[site]
    names = pseudonyms(three_sites.root / site, truth)
    cases = {case.pseudonym: case for case in result.cases}
    assert sorted(cases) == sorted(names[i] for i in active_indices(truth))

    spacing = profile_for_site(site_index).spacing_mm
    for i in active_indices(truth):
        case, expected = cases[names[i]], truth[i]
        assert case.image.dtype == np.float32 and case.label.dtype == np.uint8
        assert np.array_equal(case.image, expected.volume)
        assert np.array_equal(case.label, expected.label)
        assert case.label.any()
        assert case.spacing == pytest.approx(spacing, abs=1e-6)
        ehr = dict(zip(EHR_FEATURES, case.ehr.tolist()))
        assert ehr == pytest.approx(_expected_ehr(expected.patient), abs=1e-4)
        assert case.outcome == int(expected.patient.high_grade)
    assert result.fhir_issues == []


def test_consent_exclusions_match_the_ground_truth(three_sites, ingested):
    states = set()
    for site in SITES:
        truth = three_sites.truth[site]
        names = pseudonyms(three_sites.root / site, truth)
        expected = sorted((names[i], CONSENT_REASON[c.patient.consent])
                          for i, c in enumerate(truth) if c.patient.consent != "active")
        assert sorted((e.subject, e.reason) for e in ingested[site].exclusions) == expected
        report = ingested[site].report()
        assert report["usable"] + report["excluded"] == len(truth)
        states |= {c.patient.consent for c in truth}
    assert states == {"active", "revoked", "none"}, "the seed must produce every consent state"
