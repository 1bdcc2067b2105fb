"""Synthetic sites: reproducible for a seed, non-IID across sites, and an outcome with signal
in both the image and the EHR."""

from __future__ import annotations

import json
import stat

import numpy as np
import pydicom
import pytest
from clinfed.data import synth_fhir as w
from fhir_adapter import terminology as t
from scipy.stats import chi2
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler

from clinfed.cli import main
from clinfed.data.pseudonym import SECRET_FILE_NAME
from clinfed.data.profiles import profile_for_site
from clinfed.data.synth import synthesise

SITES = ("site-1", "site-2", "site-3")


def _synth_cli(out, seed, sites, capsys):
    argv = ["data", "synth", "--out", str(out), "--sites", str(sites), "--patients", "2",
            "--shape", "16,16,8", "--seed", str(seed), "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(summary["sites"]) == [f"site-{i + 1}" for i in range(sites)]
    return {p.relative_to(out): p for p in out.rglob("*") if p.is_file()}


def _ndjson(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_same_seed_writes_byte_identical_dicom_and_ndjson_but_a_fresh_secret_key(tmp_path, capsys):
    first = _synth_cli(tmp_path / "a", 5, 2, capsys)
    second = _synth_cli(tmp_path / "b", 5, 2, capsys)

    assert first.keys() == second.keys()
    keys = {rel for rel in first if rel.name == SECRET_FILE_NAME}
    assert len(keys) == 2  # one per site
    data = sorted(rel for rel in first if rel not in keys)
    assert sum(rel.suffix == ".dcm" for rel in data) == 2 * 2 * (8 + 1)  # slices + SEG per patient
    assert sum(rel.suffix == ".ndjson" for rel in data) == 2 * 5
    different = [str(rel) for rel in data if first[rel].read_bytes() != second[rel].read_bytes()]
    assert different == []

    for rel in keys:
        # The key is a secret, not a function of the seed: pseudonyms cannot be recomputed.
        assert first[rel].read_bytes() != second[rel].read_bytes()
        for path in (first[rel], second[rel]):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert len(bytes.fromhex(path.read_text().strip())) == 32


def test_another_seed_writes_different_images_and_records(tmp_path, capsys):
    first = _synth_cli(tmp_path / "a", 5, 1, capsys)
    other = _synth_cli(tmp_path / "c", 6, 1, capsys)

    slice_rel = next(rel for rel in first if rel.name == "slice_0004.dcm")
    assert not np.array_equal(pydicom.dcmread(first[slice_rel]).pixel_array,
                              pydicom.dcmread(other[slice_rel]).pixel_array)
    for name in ("Patient.ndjson", "Observation.ndjson"):
        rel = next(rel for rel in first if rel.name == name)
        assert first[rel].read_bytes() != other[rel].read_bytes()


# ---------------------------------------------------------------------------------- non-IID


def _first_study_headers(three_sites, site):
    study = three_sites.truth[site][0].study_dir
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(study.glob("slice_*.dcm"))]


def test_sites_differ_in_modality_and_voxel_spacing_read_back_from_dicom(three_sites):
    geometry = {}
    for index, site in enumerate(SITES):
        profile = profile_for_site(index)
        headers = _first_study_headers(three_sites, site)
        assert {h.Modality for h in headers} == {profile.modality}
        row_spacing, col_spacing = (float(v) for v in headers[0].PixelSpacing)
        z = sorted(float(h.ImagePositionPatient[2]) for h in headers)
        slice_gap = set(np.round(np.diff(z), 6))
        assert len(slice_gap) == 1
        spacing = (col_spacing, row_spacing, slice_gap.pop())
        assert spacing == pytest.approx(profile.spacing_mm)
        geometry[site] = (headers[0].Modality, spacing)
    assert len(set(geometry.values())) == len(SITES), geometry
    assert {modality for modality, _ in geometry.values()} == {"CT", "MR"}


def test_sites_differ_in_intensity_scale_and_noise(three_sites):
    """Background (the volume corners lie outside the organ) mean and spread follow each
    scanner's profile: HU at the CT sites, arbitrary units at the MR site."""
    from clinfed.data.dicom_io import read_series

    corner = [0, 1, -2, -1]
    stats = {}
    for index, site in enumerate(SITES):
        profile = profile_for_site(index)
        corners = np.concatenate([
            read_series(case.study_dir).array[corner][:, corner].ravel()
            for case in three_sites.truth[site]])
        stats[site] = (corners.mean(), corners.std())
        assert corners.mean() == pytest.approx(profile.background, abs=0.2 * profile.noise_std + 2)
        assert corners.std() == pytest.approx(profile.noise_std, rel=0.15)
        rescale = _first_study_headers(three_sites, site)[0].get("RescaleType")
        assert rescale == ("HU" if profile.modality == "CT" else None)
    assert len({round(float(s)) for _, s in stats.values()}) == len(SITES), stats


def test_sites_write_glucose_in_their_own_units(three_sites):
    units = {}
    for index, site in enumerate(SITES):
        observations = _ndjson(three_sites.root / site / "fhir" / "Observation.ndjson")
        glucose = [o for o in observations
                   if {c["code"] for c in o["code"]["coding"]} & {w.GLUCOSE_LOINC_BY_UNIT[u][0] for u in w.GLUCOSE_LOINC_BY_UNIT}]
        assert len(glucose) == len(three_sites.truth[site])
        units[site] = {o["valueQuantity"]["code"] for o in glucose}
        assert units[site] == {profile_for_site(index).glucose_unit}
    assert set().union(*units.values()) == {"mg/dL", "mmol/L"}


def test_sites_code_the_same_diagnosis_in_snomed_or_icd10(three_sites):
    snomed_code, icd10_code, _ = w.DX_LIVER_CANCER
    systems = {}
    for index, site in enumerate(SITES):
        conditions = _ndjson(three_sites.root / site / "fhir" / "Condition.ndjson")
        codings = [c for condition in conditions for c in condition["code"]["coding"]]
        systems[site] = {c["system"] for c in codings}
        expected = w.DIAGNOSIS_SYSTEMS[profile_for_site(index).diagnosis_system]
        assert systems[site] == {expected}
        liver = [c for c in codings if c["code"] == (snomed_code if expected == t.SNOMED else icd10_code)]
        assert len(liver) == len(three_sites.truth[site])  # every patient has the tumour diagnosis
    assert set().union(*systems.values()) == {t.SNOMED, w.DIAGNOSIS_SYSTEMS["icd10"]}


def test_sites_differ_in_share_of_high_grade_outcomes(three_sites):
    """Read from the grade Observations. Site-3's large lesions make high grade common,
    site-2's small ones rare (over 30 seeds at 12 patients/site, site-3 > site-2 in 28)."""
    share = {}
    for site in SITES:
        observations = _ndjson(three_sites.root / site / "fhir" / "Observation.ndjson")
        grades = [{c["code"] for c in o["valueCodeableConcept"]["coding"]} for o in observations
                  if w.TUMOUR_GRADE_LOINC[0] in {c["code"] for c in o["code"]["coding"]}]
        assert len(grades) == len(three_sites.truth[site])
        share[site] = np.mean([w.GRADE_HIGH[0] in codes for codes in grades])
        assert share[site] == pytest.approx(
            np.mean([c.patient.high_grade for c in three_sites.truth[site]]))
    assert share["site-3"] - share["site-2"] >= 0.25, share


# ---------------------------------------------------------------------------------- outcome


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """60 patients at one site (~15 s); the ground truth equals the files (see round-trip tests)."""
    return synthesise(tmp_path_factory.mktemp("cohort"), 1, 60, (16, 16, 8), seed=1)["site-1"]


def _log_likelihood(features, outcome):
    if features is None:
        p = np.full(len(outcome), outcome.mean())
    else:
        x = StandardScaler().fit_transform(features)
        p = LogisticRegression(C=1e4, max_iter=1000).fit(x, outcome).predict_proba(x)[:, 1]
    return -log_loss(outcome, p, normalize=False)


def test_outcome_depends_on_both_lesion_image_and_ehr(cohort):
    """Nested logistic regressions, likelihood-ratio tests at 5%: image features (lesion
    volume and intensity) and EHR features (age, glucose) each predict the outcome, and each
    adds information the other lacks, which is what an image+EHR fusion model needs.
    (With 60 patients this holds for about 10 in 12 seeds; the seed is fixed.)"""
    outcome = np.array([c.patient.high_grade for c in cohort], dtype=int)
    assert 0.2 < outcome.mean() < 0.8
    image = np.array([[c.label.sum(), c.volume[c.label == 1].mean()] for c in cohort])
    ehr = np.array([[c.patient.age_at_study, c.patient.glucose_mmol_l] for c in cohort])

    null = _log_likelihood(None, outcome)
    image_only = _log_likelihood(image, outcome)
    ehr_only = _log_likelihood(ehr, outcome)
    both = _log_likelihood(np.hstack([image, ehr]), outcome)

    def p_value(bigger, smaller):  # two extra parameters in each comparison
        return chi2.sf(2 * (bigger - smaller), df=2)

    assert p_value(image_only, null) < 0.05
    assert p_value(ehr_only, null) < 0.05
    assert p_value(both, image_only) < 0.05  # EHR adds to the image
    assert p_value(both, ehr_only) < 0.05  # the image adds to the EHR


def test_held_out_patients_are_other_patients_of_the_same_sites(three_sites, tmp_path):
    """A site's test set: the same scanner and protocol, none of its training patients."""
    held_out = synthesise(tmp_path, 3, 4, three_sites.truth["site-1"][0].volume.shape, 2, held_out=True)
    for site in SITES:
        train, test = three_sites.truth[site], held_out[site]
        assert not {c.patient.mrn for c in train} & {c.patient.mrn for c in test}
        assert not any(np.array_equal(a.volume, b.volume) for a in train for b in test)
        assert {c.patient.age_at_study for c in train}.isdisjoint({c.patient.age_at_study for c in test})
        headers = pydicom.dcmread(sorted(test[0].study_dir.glob("slice_*.dcm"))[0], stop_before_pixels=True)
        assert headers.Modality == profile_for_site(SITES.index(site)).modality


def test_lesions_are_darker_than_tissue_at_every_site_whatever_the_grade(three_sites):
    """Scanner shifts change the scale, blur and contrast, never the sign of the lesion contrast."""
    for index, site in enumerate(SITES):
        tissue = profile_for_site(index).organ
        for case in three_sites.truth[site]:
            if case.label.any():
                assert case.volume[case.label == 1].mean() < tissue, site
